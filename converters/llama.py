"""Llama-family Hugging Face checkpoint folder -> GGUF (architecture "llama", the layout llama.cpp and Sparrow read).

Shape legend: H = hidden, L = layers, V = vocabulary, F = FFN width, NH/NKV = heads/kv heads, D = H / NH.

Takes config.json with model_type "llama" (LlamaForCausalLM: Llama 2, TinyLlama, SmolLM2, ... without RoPE scaling
or biases), safetensors weights (F32/F16/BF16, one file or sharded) and a SentencePiece tokenizer.model. Checkpoints
that only have a byte-level BPE tokenizer.json are refused with a message: their GGUF vocabulary needs the
tokenizer's pre-tokenizer identity, which this converter does not derive. Q and K rows are permuted from Hugging
Face's rotate_half layout to GGUF's adjacent pairs (blockffn.permute_rope_rows). Everything is checked before the
output is opened and the file appears only when complete, as in converters/blockffn.py.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quant_shape_to_byte_shape, quantize

from . import ConversionError
from .blockffn import FILE_TYPES, QTYPES, _parse_qtype, permute_rope_rows
from .gguf_out import streamed_gguf
from .hf import SafetensorsCheckpoint, load_config
from .spm import UNUSED, load_spm

Q = gguf.GGMLQuantizationType
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {  # under model.layers.{N}. / blk.{N}.
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight"}
IGNORED = ("self_attn.rotary_emb.inv_freq",)


def is_llama(config: dict) -> bool:
    return config.get("model_type") == "llama" or "LlamaForCausalLM" in (config.get("architectures") or [])


def _int(config: dict, key: str, where: str, default: int | None = None) -> int:
    v = config.get(key, default)
    if type(v) is not int or v <= 0:
        raise ConversionError(f"{where}: {key} = {v!r} must be a positive integer")
    return v


def convert(src_dir: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "q8_0",
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the llama checkpoint folder src_dir to the GGUF file out_path (qtype as converters.blockffn.convert:
    f32, f16, q8_0 or q4_0 for the matrices; norms stay F32)."""
    from tqdm import tqdm

    src, out = Path(src_dir), Path(out_path)
    q = _parse_qtype(qtype)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise ConversionError(f"the output folder {out.parent} does not exist; create it first")
    c = load_config(src)
    where = str(src / "config.json")
    if not is_llama(c):
        raise ConversionError(f"{where}: model_type {c.get('model_type')!r} is not a llama-family checkpoint")
    for key in ("rope_scaling",):
        if c.get(key):
            raise ConversionError(f"{where}: {key} {c[key]!r} is not supported; only plain RoPE")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConversionError(f"{where}: biases on the attention or MLP projections are not supported")
    H, L, NH = (_int(c, k, where) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    NKV, F, V = _int(c, "num_key_value_heads", where, NH), _int(c, "intermediate_size", where), \
        _int(c, "vocab_size", where)
    if H % NH or NH % NKV:
        raise ConversionError(f"{where}: hidden_size {H}, {NH} heads and {NKV} kv heads do not divide")
    D = H // NH
    tied = bool(c.get("tie_word_embeddings", False))
    if not (src / "tokenizer.model").is_file():
        has_json = (src / "tokenizer.json").is_file()
        raise ConversionError(f"{src} has no SentencePiece tokenizer.model" + (
            " (only a tokenizer.json: byte-level BPE vocabularies are not converted here; use llama.cpp's "
            "convert_hf_to_gguf.py for this checkpoint, then `sparrow convert MODEL.gguf OUT.onnx`)" if has_json
            else ""))
    spm = load_spm(src / "tokenizer.model")
    if len(spm.tokens) > V:
        raise ConversionError(f"tokenizer.model has {len(spm.tokens)} pieces but vocab_size is {V}")

    ckpt = SafetensorsCheckpoint(src)
    expected = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not tied:
        expected["lm_head.weight"] = (V, H)
    shapes = {"input_layernorm.weight": (H,), "self_attn.q_proj.weight": (H, H),
              "self_attn.k_proj.weight": (NKV * D, H), "self_attn.v_proj.weight": (NKV * D, H),
              "self_attn.o_proj.weight": (H, H), "post_attention_layernorm.weight": (H,),
              "mlp.gate_proj.weight": (F, H), "mlp.up_proj.weight": (F, H), "mlp.down_proj.weight": (H, F)}
    for l in range(L):
        expected |= {f"model.layers.{l}.{k}": v for k, v in shapes.items()}
    for name, shape in expected.items():
        if name not in ckpt:
            raise ConversionError(f"{src}: tensor {name} is missing")
        if tuple(ckpt.shape(name)) != shape:
            raise ConversionError(f"{src}: tensor {name} has shape {ckpt.shape(name)}, config.json implies {shape}")
    extra = [n for n in ckpt.names if n not in expected and not n.endswith(IGNORED)
             and not (tied and n == "lm_head.weight")]
    if extra:
        raise ConversionError(f"{src}: unexpected tensors {extra[:5]}: not a plain llama checkpoint")

    w = gguf.GGUFWriter(None, "llama")
    w.add_name(src.resolve().name)
    w.add_file_type(FILE_TYPES[q])
    if q not in (Q.F32, Q.F16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(_int(c, "max_position_embeddings", where, 2048))
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_dimension_count(D)
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    w.add_vocab_size(V)
    tokens, scores, types = list(spm.tokens), list(spm.scores), list(spm.types)
    for i in range(len(tokens), V):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for what, add, fallback in (("bos", w.add_bos_token_id, spm.bos_id), ("eos", w.add_eos_token_id, spm.eos_id)):
        i = c.get(f"{what}_token_id", fallback)
        if isinstance(i, int) and 0 <= i < V:
            add(i)
    if spm.unk_id is not None:
        w.add_unk_token_id(spm.unk_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(spm.add_dummy_prefix)
    w.add_remove_extra_whitespaces(spm.remove_extra_whitespaces)
    tc = src / "tokenizer_config.json"
    if tc.is_file():
        try:
            template = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            template = None
        if isinstance(template, str):
            w.add_chat_template(template)

    plan: list[tuple[str, str, tuple[int, ...], gguf.GGMLQuantizationType]] = []  # (hf, gguf, shape, type)
    for hf_name, gg in GLOBAL_NAMES.items():
        if hf_name in expected:
            plan.append((hf_name, gg, expected[hf_name], Q.F32 if len(expected[hf_name]) == 1 else q))
    for l in range(L):
        for k, gg in LAYER_NAMES.items():
            shape = shapes[k]
            ty = Q.F32 if len(shape) == 1 else q if shape[-1] % 32 == 0 or q in (Q.F32, Q.F16) else Q.F16
            plan.append((f"model.layers.{l}.{k}", f"blk.{l}.{gg}", shape, ty))
    for _, gg, shape, ty in plan:
        if ty in (Q.F32, Q.F16):
            dt = np.dtype(np.float32 if ty == Q.F32 else np.float16)
            w.add_tensor_info(gg, shape, dt, dt.itemsize * math.prod(shape))
        else:
            byte_shape = quant_shape_to_byte_shape(shape, ty)
            w.add_tensor_info(gg, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=ty)
    with streamed_gguf(w, out):
        for hf_name, gg, _, ty in tqdm(plan, desc=f"{src.name} -> {out.name}", unit="tensor", disable=not progress):
            data = ckpt.get(hf_name)
            if gg.endswith("attn_q.weight"):
                data = permute_rope_rows(data, NH)
            elif gg.endswith("attn_k.weight"):
                data = permute_rope_rows(data, NKV)
            if not np.isfinite(data).all():
                raise ConversionError(f"{src}: {hf_name} holds NaN or infinity; the checkpoint is damaged")
            if ty == Q.F32:
                w.write_tensor_data(np.ascontiguousarray(data, dtype=np.float32))
            elif ty == Q.F16:
                w.write_tensor_data(np.ascontiguousarray(data, dtype=np.float16))
            else:
                w.write_tensor_data(quantize(np.ascontiguousarray(data, dtype=np.float32), ty))
    return out


__all__ = ["QTYPES", "convert", "is_llama"]
