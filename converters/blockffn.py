"""BlockFFN (MiniCPM-based, Hugging Face format) checkpoint folder -> GGUF, as specified in docs/gguf-blockffn.md.

Shape legend: H = hidden, L = layers, V = vocabulary, E = experts, F = expert width, NH/NKV = heads/kv heads,
D = head dim; multi-head latent attention (attention_type "mla"): QL/KL = q/kv lora ranks, DN/DR = per-head nope/rope
dims, DK = DN + DR, DV = H / NH. Shapes in comments are numpy order ([rows, cols], row-major); GGUF's ne lists them
reversed.

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
LORA_NORM_EPS = 1e-6  # MLA's q_a_layernorm / kv_a_layernorm: MiniCPMRMSNorm's default eps (not rms_norm_eps)

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
# Multi-head latent attention (official MLAAttention) instead of q/k/v; o_proj as above ([H, NH*DV]).
MLA_LAYER_NAMES = {
    "self_attn.q_a_proj.weight": "attn_q_a.weight",                 # [QL, H]
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",       # [QL]
    "self_attn.q_b_proj.weight": "attn_q_b.weight",                 # [NH*DK, QL], each head's DR rope rows permuted
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",  # [KL+DR, H], the last DR rows permuted
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",     # [KL]
    "self_attn.kv_b_proj.weight": "attn_k_b.weight",                # [NH*(DN+DV), KL] -> k_b [NH, KL, DN]  } split
}                                                                   #                  -> v_b [NH, DV, KL]  }
# The MLA matrices a q4_0 file stores Q8_0 (MLA's value path; the measurement is at _matrix_qtype).
MLA_Q8_IN_Q4_0 = ("attn_kv_a_mqa.weight", "attn_v_b.weight")
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
    attention_type: str = "vanilla"  # "vanilla" (MHA/GQA) | "mla"; the MLA dims below are 0 for "vanilla"
    q_lora_rank: int = 0             # QL
    kv_lora_rank: int = 0            # KL
    qk_nope_head_dim: int = 0        # DN
    qk_rope_head_dim: int = 0        # DR

    @property
    def head_dim(self) -> int:
        """D for MHA/GQA; for MLA, DV (the value head dim, H / NH as the official MLAAttention computes it)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def mla(self) -> bool:
        return self.attention_type == "mla"

    @property
    def key_length(self) -> int:
        """MLA: DK = DN + DR, the per-head length of q and k."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

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

    attention = choice("attention_type", "vanilla", ("vanilla", "mla"),
                       "BlockFFN checkpoints use 'vanilla' (multi-head / grouped-query) or 'mla' (multi-head latent) "
                       "attention.")
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
    mla = {}
    if attention == "mla":
        mla = _parse_mla(config, where, hidden, n_head, get)
        n_head_kv = n_head  # MLAAttention ignores num_key_value_heads: every head has its own k and v
    elif hidden % n_head or n_head % n_head_kv or (hidden // n_head) % 2:
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
        pad_token_id=token_id("pad_token_id", None), attention_type=attention, **mla,
    )


def _parse_mla(config: dict, where: str, hidden: int, n_head: int, get) -> dict[str, int]:
    """The multi-head latent attention keys of an attention_type 'mla' config. All four are required: the released
    configs give them, and MiniCPMConfig's defaults for absent ones (64/32/768/256) are no evidence of what the
    weights were trained with."""
    if hidden % n_head:
        raise ConversionError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {n_head}; "
                              f"MLA's value head dim is hidden_size / num_attention_heads")
    dims = {}
    for key, what in (("q_lora_rank", "the rank of the query compression (q_a_proj)"),
                      ("kv_lora_rank", "the rank of the key/value latent (kv_a_proj_with_mqa)"),
                      ("qk_nope_head_dim", "the per-head query/key dims without RoPE"),
                      ("qk_rope_head_dim", "the per-head query/key dims with RoPE")):
        v = get(key, (int,), None)
        if v is None or v <= 0:
            shown = "missing" if v is None else f"{v}"
            raise ConversionError(f"{where}: attention_type 'mla' needs {key} ({what}) as a positive integer; it is "
                                  f"{shown}. BlockFFN's MLAAttention has no uncompressed-query (q_lora_rank 0) or "
                                  f"RoPE-free variant")
        dims[key] = v
    if dims["qk_rope_head_dim"] % 2:
        raise ConversionError(f"{where}: qk_rope_head_dim = {dims['qk_rope_head_dim']} is odd; RoPE rotates pairs "
                              f"of dims, so it must be even")
    v_head = get("v_head_dim", (int,), None)
    if v_head is not None and v_head != hidden // n_head:
        raise ConversionError(f"{where}: v_head_dim = {v_head}, but MLAAttention's value heads have hidden_size / "
                              f"num_attention_heads = {hidden // n_head} dims (it does not read v_head_dim); the "
                              f"config does not describe the official MLA layout")
    return dims


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from HF's rotate_half layout (pairs (i, i + D/2)) to GGUF's adjacent pairs (2i, 2i + 1).
    w [n_heads*D, H]; the same reordering as llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_rope_rows: GGUF adjacent pairs back to HF rotate_half rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_tail(w: np.ndarray, n_groups: int, n_rope: int) -> np.ndarray:
    """MLA: w [n_groups*G, K] in groups of G rows whose last n_rope rows are RoPE'd (rotate_half pairs (i, i+DR/2));
    those rows of every group go to adjacent pairs as permute_rope_rows does, the others stay. q_b_proj: NH groups
    of DK rows; kv_a_proj_with_mqa: 1 group of KL + DR rows."""
    g = w.reshape(n_groups, -1, *w.shape[1:]).copy()
    tail = g[:, g.shape[1] - n_rope:]
    g[:, g.shape[1] - n_rope:] = permute_rope_rows(tail.reshape(-1, *w.shape[1:]), n_groups).reshape(tail.shape)
    return g.reshape(w.shape)


def split_kv_b(kv_b: np.ndarray, c: BlockFFNConfig) -> tuple[np.ndarray, np.ndarray]:
    """MLA kv_b_proj [NH*(DN+DV), KL] -> (k_b [NH, KL, DN], v_b [NH, DV, KL]): head h's first DN rows are W_UK[h]
    (k_nope = W_UK c), stored transposed so that the absorbed query q_lat = k_b[h] q_nope is a plain matmul; the
    other DV rows are W_UV[h] (v = W_UV c). As llama.cpp's deepseek2 attn_k_b / attn_v_b."""
    NH, DN = c.num_attention_heads, c.qk_nope_head_dim
    kv = kv_b.reshape(NH, DN + c.head_dim, c.kv_lora_rank)
    return np.ascontiguousarray(kv[:, :DN].transpose(0, 2, 1)), np.ascontiguousarray(kv[:, DN:])


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
    if c.mla:
        NH, QL, KL, DR = c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim
        attention = {
            "self_attn.q_a_proj.weight": (QL, H),
            "self_attn.q_a_layernorm.weight": (QL,),
            "self_attn.q_b_proj.weight": (NH * c.key_length, QL),
            "self_attn.kv_a_proj_with_mqa.weight": (KL + DR, H),
            "self_attn.kv_a_layernorm.weight": (KL,),
            "self_attn.kv_b_proj.weight": (NH * (c.qk_nope_head_dim + D), KL),
        }
    else:
        attention = {
            "self_attn.q_proj.weight": (c.num_attention_heads * D, H),
            "self_attn.k_proj.weight": (c.num_key_value_heads * D, H),
            "self_attn.v_proj.weight": (c.num_key_value_heads * D, H),
        }
    layer = {
        "input_layernorm.weight": (H,),
        **attention,
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
                              f"The weights are incomplete or do not match config.json (attention_type "
                              f"{c.attention_type!r}, ffn_type {c.ffn_type!r}, norm_after_router "
                              f"{c.norm_after_router!r}, tie_word_embeddings {c.tie_word_embeddings}).")
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


def _matrix_qtype(name: str, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type of weight matrix `name` in a file of type qtype: qtype, except MLA's value path in Q4_0 files.

    Measured (logits NMSE against the F32 conversion, 12 random MLA checkpoints of tests/blockffn_fixture.py with
    H 256, 8 heads, QL 256, KL 96, DN 32, DR 16, 16 x 64 experts, means; docs/gguf-blockffn.md, "Quantization of the
    MLA matrices"): quantizing one kind of MLA matrix to Q4_0 and nothing else costs q_a 2.3e-4, q_b 1.5e-4,
    k_b 3.0e-4 (the score path: q and k_nope only move softmax weights), but kv_a_mqa 4.8e-3 and v_b 3.9e-3 (the
    value path, two matrices in series where GQA has attn_v alone, 5.4e-3). The whole Q4_0 file: 0.031 with every
    MLA matrix Q4_0 (a GQA twin: 0.030), 0.025 with kv_a_mqa and v_b Q8_0, 0.025 with all five Q8_0. So the score
    path stays Q4_0 and the value path is Q8_0: at the released 1.2B shapes that is +2% file size and ~5% more bytes
    read per decoded token at 80% TLS, where all five at Q8_0 would be +9% and ~22% for no further gain."""
    if qtype == Q.Q4_0 and name.endswith(MLA_Q8_IN_Q4_0):
        return Q.Q8_0
    return qtype


def _plan(ckpt: SafetensorsCheckpoint, c: BlockFFNConfig, qtype) -> tuple[list[_Planned], list[str]]:
    """Every GGUF tensor, in file order, with its shape, storage type and how to compute it."""
    H, E, F = c.hidden_size, c.num_experts, c.expert_size
    notes: list[str] = []
    plan: list[_Planned] = []

    def matrix(name: str, shape: tuple[int, ...], build) -> None:
        plan.append(_Planned(name, shape, _storage_type(shape[-1], _matrix_qtype(name, qtype), name, notes), build))

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
        if c.mla:
            _plan_mla(ckpt, c, src, dst, matrix, f32)
        else:
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


def _plan_mla(ckpt: SafetensorsCheckpoint, c: BlockFFNConfig, src: str, dst: str, matrix, f32) -> None:
    """One layer's MLA tensors (docs/gguf-blockffn.md, "Multi-head latent attention"), in the table's order."""
    NH, QL, KL, DN, DR, DV = (c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
                              c.qk_rope_head_dim, c.head_dim)
    n = {k: src + k for k in MLA_LAYER_NAMES}
    g = {k: dst + v for k, v in MLA_LAYER_NAMES.items()}

    def hf(name: str):
        return lambda: ckpt.get(n[name])

    kv_b = n["self_attn.kv_b_proj.weight"]
    matrix(g["self_attn.q_a_proj.weight"], (QL, c.hidden_size), hf("self_attn.q_a_proj.weight"))
    f32(g["self_attn.q_a_layernorm.weight"], (QL,), hf("self_attn.q_a_layernorm.weight"))
    matrix(g["self_attn.q_b_proj.weight"], (NH * c.key_length, QL),
           lambda: permute_rope_tail(ckpt.get(n["self_attn.q_b_proj.weight"]), NH, DR))
    matrix(g["self_attn.kv_a_proj_with_mqa.weight"], (KL + DR, c.hidden_size),
           lambda: permute_rope_tail(ckpt.get(n["self_attn.kv_a_proj_with_mqa.weight"]), 1, DR))
    f32(g["self_attn.kv_a_layernorm.weight"], (KL,), hf("self_attn.kv_a_layernorm.weight"))
    matrix(dst + "attn_k_b.weight", (NH, KL, DN), lambda: split_kv_b(ckpt.get(kv_b), c)[0])
    matrix(dst + "attn_v_b.weight", (NH, DV, KL), lambda: split_kv_b(ckpt.get(kv_b), c)[1])


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
    if c.mla:  # docs/gguf-blockffn.md, "Multi-head latent attention"
        u32 |= {"attention.head_count_kv": c.num_attention_heads, "rope.dimension_count": c.qk_rope_head_dim,
                "attention.q_lora_rank": c.q_lora_rank, "attention.kv_lora_rank": c.kv_lora_rank,
                "attention.key_length": c.key_length, "attention.value_length": c.head_dim}
        w.add_string(p + "attention.type", "mla")
    f32 = {
        "attention.layer_norm_rms_epsilon": c.rms_norm_eps,
        "rope.freq_base": c.rope_theta,
        "router_norm_eps": c.router_norm_eps,
        "router_norm_scale": c.norm_scale,
        "embedding_scale": c.scale_emb,
        "residual_scale": c.residual_scale,
        "logit_scale": c.logit_scale,
    }
    if c.mla:
        f32["attention.lora_norm_epsilon"] = LORA_NORM_EPS
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
            overwrite: bool = False, progress: bool = True, draft_model: str | None = None,
            measure_sparsity: bool = True) -> Path:
    """Convert the BlockFFN checkpoint folder `src_dir` to the GGUF file `out_path`; returns the output path.

    qtype: "f32", "f16", "q8_0" or "q4_0" for the weight matrices (norms and the router stay F32). The file carries
    its sparsity measured on a calibration text (converters/sparsity.py; measure_sparsity=False leaves it NaN) and
    the paired draft model's name, if given. Raises ConversionError (nothing written) for bad input; an existing
    `out_path` is replaced only with overwrite=True."""
    from tqdm import tqdm

    from . import sparsity

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
    sparsity.add_placeholders(w, draft_model)
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
    written: list[Path] = []

    def before_replace() -> None:
        if out.exists() and not overwrite:  # appeared while converting
            raise ConversionError(f"{out} appeared during the conversion; not replacing it")
        if measure_sparsity:
            sparsity.fill_in_place(written[0], sparsity.measure(written[0]))

    with streamed_gguf(w, out, before_replace=before_replace) as tmp:
        written.append(tmp)
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
