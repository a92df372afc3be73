"""BlockFFN (MiniCPM-based, Hugging Face format) checkpoint folder -> GGUF, as specified in docs/gguf-blockffn.md.

Shape legend: H = hidden, L = layers, V = vocabulary, E = experts, F = expert width, NH/NKV = heads/kv heads,
D = head dim. Shapes in comments are numpy order ([rows, cols], row-major); GGUF's ne lists them reversed.

Everything is checked before the output is opened (config values, every tensor's presence and shape, the
tokenizer); the file is written to a temporary name in the destination folder and renamed into place only when
complete, so a failed conversion never leaves a partial file and never touches an existing one.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quant_shape_to_byte_shape, quantize

from . import ConversionError
from .gguf_out import streamed_gguf
from .hf import SafetensorsCheckpoint, load_config
from .spm import UNUSED, USER_DEFINED, load_spm

ARCH = "blockffn"
Q = gguf.GGMLQuantizationType
QTYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}
SUM_NORM_EPS = 1e-5  # hard-coded in the official BlockMLP: r / (sum(r) * norm_scale + 1e-5)

# Hugging Face name -> GGUF name. Per-layer names live under `model.layers.{N}.` / `blk.{N}.`.
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",  # [V, H]
    "model.norm.weight": "output_norm.weight",         # [H]
    "lm_head.weight": "output.weight",                 # [V, H]; absent from the GGUF when tie_word_embeddings
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",           # [H]
    "self_attn.q_proj.weight": "attn_q.weight",             # [NH*D, H], rows permuted for adjacent-pair RoPE
    "self_attn.k_proj.weight": "attn_k.weight",             # [NKV*D, H], rows permuted for adjacent-pair RoPE
    "self_attn.v_proj.weight": "attn_v.weight",             # [NKV*D, H]
    "self_attn.o_proj.weight": "attn_output.weight",        # [H, NH*D]
    "post_attention_layernorm.weight": "ffn_norm.weight",   # [H]
    "mlp.router_proj.weight": "ffn_router.weight",          # [E, H]
    "mlp.router_norm.weight": "ffn_router_norm.weight",     # [E]; only for norm_after_router == "rms"
    "mlp.up_proj": "ffn_experts.weight",                    # block [E, F, H] | block_linear [E*F, H]   } merged
    "mlp.down_proj": "ffn_experts.weight",                  # block [E, H, F] | block_linear [H, E*F]   } [E, 2F, H]
}
# Tensors a checkpoint may carry that the model does not use.
IGNORED_LAYER_NAMES = ("self_attn.rotary_emb.inv_freq",)


class ConversionWarning(UserWarning):
    """Something converted differently from what was asked (e.g. a tensor kept F16 instead of quantized)."""


@dataclass(frozen=True)
class BlockFFNConfig:
    """The config.json values the model depends on, with the official MiniCPMConfig defaults for absent keys."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    num_experts: int
    expert_size: int
    ffn_type: str               # "block" | "block_linear"
    norm_after_router: str      # "rms" | "sum" | "none"
    norm_scale: float
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    scale_emb: float
    dim_model_base: float
    scale_depth: float
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        return self.dim_model_base / self.hidden_size

    @property
    def router_norm_eps(self) -> float:
        return {"rms": self.rms_norm_eps, "sum": SUM_NORM_EPS, "none": 0.0}[self.norm_after_router]


def parse_config(config: dict, where: str = "config.json") -> BlockFFNConfig:
    """Validate a BlockFFN config.json; every unsupported or malformed value is a ConversionError."""
    ffn_type = config.get("ffn_type")
    if ffn_type not in ("block", "block_linear"):
        what = "has no ffn_type" if ffn_type is None else f"has ffn_type {ffn_type!r}"
        raise ConversionError(f"{where} {what}: not a BlockFFN checkpoint (expected ffn_type 'block' or "
                              f"'block_linear'). Dense or other MoE MiniCPM models need a different converter.")

    def get(key, kinds, default=None, required=False):
        if key not in config or config[key] is None:
            if required:
                raise ConversionError(f"{where} lacks {key!r}, which every BlockFFN config has; the file is "
                                      f"incomplete")
            return default
        value = config[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ConversionError(f"{where}: {key} = {value!r} has the wrong type")
        return value

    def positive_int(key, default=None, required=True):
        v = get(key, (int,), default, required)
        if v is not None and v <= 0:
            raise ConversionError(f"{where}: {key} = {v} must be a positive integer")
        return v

    def real(key, default, positive=True):
        v = float(get(key, (int, float), default))
        if not math.isfinite(v) or (positive and v <= 0):
            raise ConversionError(f"{where}: {key} = {v} must be a finite {'positive ' if positive else ''}number")
        return v

    def choice(key, default, allowed, what_to_do):
        v = get(key, (str,), default)
        if v not in allowed:
            raise ConversionError(f"{where}: {key} = {v!r} is not supported (supported: "
                                  f"{', '.join(map(repr, allowed))}). {what_to_do}")
        return v

    attention = get("attention_type", (str,), "vanilla")
    if attention == "mla":
        raise ConversionError(f"{where}: attention_type 'mla' (multi-head latent attention, used by the released "
                              f"pre-training checkpoints) is not supported yet; only 'vanilla' multi-head / "
                              f"grouped-query attention converts today")
    choice("attention_type", "vanilla", ("vanilla",), "Only vanilla MHA/GQA attention is supported.")
    choice("router_act", "relu", ("relu",), "BlockFFN routers use ReLU; other activations break exact sparsity.")
    choice("hidden_act", "silu", ("silu",), "The expert activation must be SiLU.")
    norm = choice("norm_after_router", "sum", ("rms", "sum", "none"), "")
    choice("block_implementation", "torch", ("torch", "kernel"),
           "fastmoe/megablocks checkpoints store experts under other names; re-save with block_implementation "
           "'torch'.")
    if get("rope_scaling", (dict,), None) is not None:
        raise ConversionError(f"{where}: rope_scaling {config['rope_scaling']!r} is not supported; only plain RoPE")
    if get("attention_bias", (bool,), False):
        raise ConversionError(f"{where}: attention_bias = true is not supported (q/k/v/o without bias only)")
    if get("pretraining_tp", (int,), 1) != 1:
        raise ConversionError(f"{where}: pretraining_tp = {config['pretraining_tp']} is not supported (the "
                              f"official BlockMLP itself rejects it); set it to 1")

    n_head = positive_int("num_attention_heads")
    n_head_kv = positive_int("num_key_value_heads", n_head, required=False)
    hidden = positive_int("hidden_size")
    if hidden % n_head or n_head % n_head_kv or (hidden // n_head) % 2:
        raise ConversionError(f"{where}: hidden_size {hidden}, num_attention_heads {n_head}, num_key_value_heads "
                              f"{n_head_kv} are inconsistent (need hidden % heads == 0, heads % kv_heads == 0 and an "
                              f"even head dim)")

    def token_id(key, default):
        v = config.get(key, default)
        if isinstance(v, list):  # some configs list several eos ids; the first is the primary one
            v = v[0] if v else None
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConversionError(f"{where}: {key} = {v!r} is not a token id")
        return v

    return BlockFFNConfig(
        hidden_size=hidden, num_hidden_layers=positive_int("num_hidden_layers"), num_attention_heads=n_head,
        num_key_value_heads=n_head_kv, vocab_size=positive_int("vocab_size"),
        num_experts=positive_int("num_experts"), expert_size=positive_int("expert_size"),
        ffn_type=ffn_type, norm_after_router=norm, norm_scale=real("norm_scale", 1.0),
        rms_norm_eps=real("rms_norm_eps", 1e-6), rope_theta=real("rope_theta", 10000.0),
        max_position_embeddings=positive_int("max_position_embeddings", 4096, required=False),
        tie_word_embeddings=get("tie_word_embeddings", (bool,), True),
        scale_emb=real("scale_emb", 1.0), dim_model_base=real("dim_model_base", 1.0),
        scale_depth=real("scale_depth", 1.0),
        bos_token_id=token_id("bos_token_id", 1), eos_token_id=token_id("eos_token_id", 2),
        pad_token_id=token_id("pad_token_id", None),
    )


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from HF's rotate_half layout (pairs (i, i + D/2)) to GGUF's adjacent pairs (2i, 2i + 1).
    w [n_heads*D, H]; the same reordering as llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_rope_rows: GGUF adjacent pairs back to HF rotate_half rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Planned:
    name: str                               # GGUF tensor name
    shape: tuple[int, ...]                  # numpy order
    qtype: gguf.GGMLQuantizationType
    build: Callable[[], np.ndarray]         # -> float32 array of `shape`


def _expected_shapes(c: BlockFFNConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    H, E, F, D = c.hidden_size, c.num_experts, c.expert_size, c.head_dim
    glob = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        glob["lm_head.weight"] = (c.vocab_size, H)
    layer = {
        "input_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (c.num_attention_heads * D, H),
        "self_attn.k_proj.weight": (c.num_key_value_heads * D, H),
        "self_attn.v_proj.weight": (c.num_key_value_heads * D, H),
        "self_attn.o_proj.weight": (H, c.num_attention_heads * D),
        "post_attention_layernorm.weight": (H,),
        "mlp.router_proj.weight": (E, H),
        "mlp.up_proj": (E, F, H) if c.ffn_type == "block" else (E * F, H),
        "mlp.down_proj": (E, H, F) if c.ffn_type == "block" else (H, E * F),
    }
    if c.norm_after_router == "rms":
        layer["mlp.router_norm.weight"] = (E,)
    return glob, layer


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def _check_tensors(ckpt: SafetensorsCheckpoint, c: BlockFFNConfig) -> None:
    # The layer count first, from the weights themselves: config.json is only as big as the numbers in it, and the
    # tables below grow with num_hidden_layers.
    layers = {int(m.group(1)) for n in ckpt.names if (m := _LAYER_NAME.match(n))}
    n_layers = max(layers) + 1 if layers else 0
    if c.num_hidden_layers != n_layers:
        raise ConversionError(f"{ckpt.src}: config.json says num_hidden_layers = {c.num_hidden_layers}, but the "
                              f"weights hold {n_layers} layers; the weights and config.json disagree")
    glob, layer = _expected_shapes(c)
    expected = dict(glob)
    for l in range(c.num_hidden_layers):
        expected.update({f"model.layers.{l}.{k}": v for k, v in layer.items()})
    missing = [n for n in expected if n not in ckpt]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"{ckpt.src}: tensors missing from the checkpoint: {', '.join(missing[:5])}{more}. "
                              f"The weights are incomplete or do not match config.json (ffn_type "
                              f"{c.ffn_type!r}, norm_after_router {c.norm_after_router!r}, "
                              f"tie_word_embeddings {c.tie_word_embeddings}).")
    for name, shape in expected.items():
        if ckpt.shape(name) != shape:
            raise ConversionError(f"{ckpt.src}: tensor {name} has shape {list(ckpt.shape(name))}, but config.json "
                                  f"implies {list(shape)}; the weights and config.json disagree")
    ignorable = {"lm_head.weight"} | {f"model.layers.{l}.{s}" for l in range(c.num_hidden_layers)
                                       for s in IGNORED_LAYER_NAMES}
    unexpected = [n for n in ckpt.names if n not in expected and n not in ignorable]
    if unexpected:
        raise ConversionError(f"{ckpt.src}: unexpected tensors {', '.join(sorted(unexpected)[:5])}: the checkpoint "
                              f"has weights this BlockFFN config does not use (a different architecture, or "
                              f"config.json does not belong to these weights)")


def _storage_type(row_len: int, qtype: gguf.GGMLQuantizationType, name: str, notes: list[str]):
    """The type a weight matrix is stored as: qtype, or F16 when its rows cannot be split into quant blocks."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if row_len % block == 0:
        return qtype
    notes.append(f"{name} kept F16: its rows ({row_len} values) are not a multiple of the {qtype.name} block "
                 f"({block})")
    return Q.F16


def _plan(ckpt: SafetensorsCheckpoint, c: BlockFFNConfig, qtype) -> tuple[list[_Planned], list[str]]:
    """Every GGUF tensor, in file order, with its shape, storage type and how to compute it."""
    H, E, F = c.hidden_size, c.num_experts, c.expert_size
    notes: list[str] = []
    plan: list[_Planned] = []

    def matrix(name: str, shape: tuple[int, ...], build) -> None:
        plan.append(_Planned(name, shape, _storage_type(shape[-1], qtype, name, notes), build))

    def f32(name: str, shape: tuple[int, ...], build) -> None:
        plan.append(_Planned(name, shape, Q.F32, build))

    def hf(name: str):
        return lambda: ckpt.get(name)

    matrix("token_embd.weight", (c.vocab_size, H), hf("model.embed_tokens.weight"))
    f32("output_norm.weight", (H,), hf("model.norm.weight"))
    if not c.tie_word_embeddings:
        matrix("output.weight", (c.vocab_size, H), hf("lm_head.weight"))
    for l in range(c.num_hidden_layers):
        src, dst = f"model.layers.{l}.", f"blk.{l}."
        n = {k: src + k for k in LAYER_NAMES}
        g = {k: dst + v for k, v in LAYER_NAMES.items()}
        nq, nkv = c.num_attention_heads, c.num_key_value_heads
        f32(g["input_layernorm.weight"], (H,), hf(n["input_layernorm.weight"]))
        matrix(g["self_attn.q_proj.weight"], ckpt.shape(n["self_attn.q_proj.weight"]),
               lambda name=n["self_attn.q_proj.weight"], nq=nq: permute_rope_rows(ckpt.get(name), nq))
        matrix(g["self_attn.k_proj.weight"], ckpt.shape(n["self_attn.k_proj.weight"]),
               lambda name=n["self_attn.k_proj.weight"], nkv=nkv: permute_rope_rows(ckpt.get(name), nkv))
        matrix(g["self_attn.v_proj.weight"], ckpt.shape(n["self_attn.v_proj.weight"]),
               hf(n["self_attn.v_proj.weight"]))
        matrix(g["self_attn.o_proj.weight"], ckpt.shape(n["self_attn.o_proj.weight"]),
               hf(n["self_attn.o_proj.weight"]))
        f32(g["post_attention_layernorm.weight"], (H,), hf(n["post_attention_layernorm.weight"]))
        f32(g["mlp.router_proj.weight"], (E, H), hf(n["mlp.router_proj.weight"]))
        if c.norm_after_router == "rms":
            f32(g["mlp.router_norm.weight"], (E,), hf(n["mlp.router_norm.weight"]))
        matrix(g["mlp.up_proj"], (E, 2 * F, H),
               lambda up=n["mlp.up_proj"], down=n["mlp.down_proj"]: expert_slabs(ckpt.get(up), ckpt.get(down), c))
    return plan, notes


def expert_slabs(up: np.ndarray, down: np.ndarray, c: BlockFFNConfig) -> np.ndarray:
    """HF up/down weights -> [E, 2F, H]: per expert, its F up rows then its F down columns as rows."""
    H, E, F = c.hidden_size, c.num_experts, c.expert_size
    if c.ffn_type == "block":
        up_e = up                                               # [E, F, H]
        down_t = down.transpose(0, 2, 1)                        # [E, H, F] -> [E, F, H]
    else:
        up_e = up.reshape(E, F, H)                              # [E*F, H]: unit e*F + f is expert e's f-th
        down_t = down.reshape(H, E, F).transpose(1, 2, 0)       # [H, E*F] -> [E, F, H]
    return np.concatenate([up_e, down_t], axis=1)               # [E, 2F, H]


def _vocab(src: Path, c: BlockFFNConfig):
    """tokens, scores, types (length vocab_size) and the special ids, from tokenizer.model (+ added_tokens.json)."""
    v = load_spm(src / "tokenizer.model")
    n = len(v.tokens)
    if n > c.vocab_size:
        raise ConversionError(f"{src}/tokenizer.model has {n} pieces but config.json vocab_size is "
                              f"{c.vocab_size}: the tokenizer does not belong to this model")
    tokens, scores, types = list(v.tokens), list(v.scores), list(v.types)
    added: dict[int, str] = {}
    added_path = src / "added_tokens.json"
    if added_path.is_file():
        try:
            added = {int(i): str(t) for t, i in json.loads(added_path.read_text(encoding="utf-8")).items()}
        except (json.JSONDecodeError, AttributeError, ValueError, TypeError) as e:
            raise ConversionError(f"{added_path} is not a JSON object of token -> id ({e})") from e
    for i in range(n, c.vocab_size):  # rows of the embedding the tokenizer does not name
        if i in added:
            tokens.append(added[i])
            scores.append(-1000.0)
            types.append(USER_DEFINED)
        else:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(UNUSED)
    special = {"bos": c.bos_token_id if c.bos_token_id is not None else v.bos_id,
               "eos": c.eos_token_id if c.eos_token_id is not None else v.eos_id,
               "unk": v.unk_id, "pad": c.pad_token_id}
    for what, i in special.items():
        if i is not None and i >= c.vocab_size:
            raise ConversionError(f"{src}: the {what} token id {i} is outside the vocabulary ({c.vocab_size})")
    chat_template = None
    tc = src / "tokenizer_config.json"
    if tc.is_file():
        try:
            t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
            chat_template = t if isinstance(t, str) else None
        except (json.JSONDecodeError, AttributeError):
            pass  # optional file; an unreadable one only loses the chat template
    return tokens, scores, types, special, v, chat_template


def _metadata(w: gguf.GGUFWriter, c: BlockFFNConfig, name: str, qtype) -> None:
    w.add_name(name)
    w.add_file_type(FILE_TYPES[qtype])
    if qtype not in (Q.F32, Q.F16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    p = ARCH + "."
    u32 = {
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers,
        "feed_forward_length": c.num_experts * c.expert_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "rope.dimension_count": c.head_dim,
        "vocab_size": c.vocab_size,
        "expert_count": c.num_experts,
        "expert_width": c.expert_size,
    }
    f32 = {
        "attention.layer_norm_rms_epsilon": c.rms_norm_eps,
        "rope.freq_base": c.rope_theta,
        "router_norm_eps": c.router_norm_eps,
        "router_norm_scale": c.norm_scale,
        "embedding_scale": c.scale_emb,
        "residual_scale": c.residual_scale,
        "logit_scale": c.logit_scale,
    }
    for k, v in u32.items():
        w.add_uint32(p + k, v)
    for k, v in f32.items():
        w.add_float32(p + k, v)
    w.add_string(p + "router_norm", c.norm_after_router)
    w.add_string(p + "router_activation", "relu")
    w.add_string(p + "expert_activation", "silu")


def _parse_qtype(qtype) -> gguf.GGMLQuantizationType:
    if isinstance(qtype, gguf.GGMLQuantizationType):
        if qtype in FILE_TYPES:
            return qtype
    elif isinstance(qtype, str) and qtype.lower() in QTYPES:
        return QTYPES[qtype.lower()]
    raise ConversionError(f"unsupported output type {qtype!r}: choose one of {', '.join(QTYPES)}")


def convert(src_dir: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "q8_0",
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the BlockFFN checkpoint folder `src_dir` to the GGUF file `out_path`; returns the output path.

    qtype: "f32", "f16", "q8_0" or "q4_0" for the weight matrices (norms and the router stay F32). Raises
    ConversionError (nothing written) for bad input; an existing `out_path` is replaced only with overwrite=True."""
    from tqdm import tqdm

    src, out = Path(src_dir), Path(out_path)
    q = _parse_qtype(qtype)
    if out.is_dir():
        raise ConversionError(f"{out} is a folder: give the path of the .gguf file to write")
    if not out.parent.is_dir():
        raise ConversionError(f"the output folder {out.parent} does not exist; create it first")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")

    # 1. Check everything before writing anything.
    c = parse_config(load_config(src), where=str(src / "config.json"))
    ckpt = SafetensorsCheckpoint(src)
    _check_tensors(ckpt, c)
    tokens, scores, types, special, spm, chat_template = _vocab(src, c)
    plan, notes = _plan(ckpt, c, q)
    for note in notes:
        warnings.warn(note, ConversionWarning, stacklevel=2)

    # 2. Header, metadata, tensor infos.
    w = gguf.GGUFWriter(None, ARCH)
    _metadata(w, c, src.resolve().name, q)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for what, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
        if special[what] is not None:
            add(special[what])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(spm.add_dummy_prefix)
    w.add_remove_extra_whitespaces(spm.remove_extra_whitespaces)
    if chat_template:
        w.add_chat_template(chat_template)
    for t in plan:
        if t.qtype == Q.F32:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), 4 * math.prod(t.shape))
        elif t.qtype == Q.F16:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float16), 2 * math.prod(t.shape))
        else:
            byte_shape = quant_shape_to_byte_shape(t.shape, t.qtype)
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=t.qtype)

    # 3. Data, into a temporary file renamed into place at the end.
    def refuse_if_out_appeared() -> None:
        if out.exists() and not overwrite:  # appeared while converting
            raise ConversionError(f"{out} appeared during the conversion; not replacing it")

    with streamed_gguf(w, out, before_replace=refuse_if_out_appeared):
        for t in tqdm(plan, desc=f"{src.name} -> {out.name} ({q.name})", unit="tensor", disable=not progress):
            data = t.build()
            if data.shape != t.shape:
                raise AssertionError(f"{t.name}: built {data.shape}, planned {t.shape}")
            if not np.isfinite(data).all():
                raise ConversionError(f"{src}: the weights of {t.name} contain NaN or infinity; the checkpoint is "
                                      f"damaged")
            if t.qtype == Q.F32:
                w.write_tensor_data(np.ascontiguousarray(data, dtype=np.float32))
            elif t.qtype == Q.F16:
                if np.abs(data).max(initial=0.0) > np.finfo(np.float16).max:
                    raise ConversionError(f"{t.name} has values beyond the F16 range; convert with --type f32 or "
                                          f"q8_0 instead")
                w.write_tensor_data(np.ascontiguousarray(data, dtype=np.float16))
            else:
                w.write_tensor_data(quantize(np.ascontiguousarray(data, dtype=np.float32), t.qtype))
    return out
