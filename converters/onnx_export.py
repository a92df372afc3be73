"""Sparrow GGUF files (llama, blockffn) -> ONNX for onnxruntime: a decoder with a KV cache and a tree-mask input.

Shape legend: B = batch, T = new tokens, P = cached tokens, S = P + T, H = hidden, NH/NKV = heads/kv heads,
D = head dim, G = NH / NKV, V = vocabulary, E = experts, F = expert width; a matmul maps K inputs to N outputs.

The graph's interface follows onnxruntime-genai's decoder conventions, plus two inputs of Sparrow's own that have
defaults (initializers listed as graph inputs), so a caller that does not know them, such as onnxruntime-genai,
gets ordinary causal decoding:
    inputs   input_ids [B, T] int64, attention_mask [B, S] int64 (1 = a real token), position_ids [B, T] int64,
             past_key_values.{l}.key / .value [B, NKV, P, D] float32 (RoPE applied to the keys),
             attention_bias [B|1, 1, T, S] float32, added to the scores (default zeros [1, 1, 1, 1]): a draft tree's
                 -inf for a node's non-ancestors, so one pass verifies a whole tree at depth positions,
             logits_keep int64 [] (default 0 = every token): logits for the last logits_keep tokens only
    outputs  logits [B, T', V] float32, present.{l}.key / .value [B, NKV, S, D]
Query t (cache slot P + t) sees key s iff s <= P + t and attention_mask[s] == 1, plus attention_bias.

Attention is the standard Attention operator (opset 23) over the cache, RoPE the standard RotaryEmbedding (adjacent
pairs, as GGUF stores q/k), norms RMSNormalization. Multi-head latent attention (the released BlockFFN checkpoints)
is exported expanded: each head's key [k_nope | k_pe] (DK) and value (DV) are computed from the latent and cached
per head (NKV = NH), so the cache is larger than the native runtime's latent one, and onnxruntime runs it as
ordinary multi-head attention.

Layers (the function docs/gguf-blockffn.md and tests/reference/ define):
    llama     x += attn(rmsnorm(x));  x += down(silu(gate(xn)) * up(xn))
    blockffn  x = embed * embedding_scale;  x += residual_scale * attn(..);  x += residual_scale * ffn(..);
              logits = rmsnorm(x) * logit_scale @ head.  The FFN (ffn="moe", the default) is onnxruntime's
              com.microsoft.MoE with r = router_norm(relu(router x)) fed as log(r) over all E experts: its softmax
              gives r / sum(r), experts with r = 0 get weight 0 and are not run, tokens are grouped per expert (each
              active expert's weights are read once per pass: chunk sparsity), and the output is scaled by sum(r).
              ffn="dense" computes every expert (the baseline the sparsity is measured against).
    Fewer nodes a layer (each costs a dispatch and a thread-pool sync a decode step): q, k and v come from one
    matmul (a llama FFN's gate and up too), and each residual add is fused with the norm after it
    (com.microsoft.SkipSimplifiedLayerNormalization).

Weights: "f32" (MatMul / Gemm), "int8" or "int4" (com.microsoft.MatMulNBits, blocks of 32 along K, accuracy_level 4:
int8 activations where onnxruntime has that kernel). Q4_0 and Q8_0 sources map bit for bit (Q4_0's nibble order
repacked; int8 stores q + 128); other sources are quantized from their values: int4 asymmetric per block with integer
zero points (a Q4_1 file's minimum is no multiple of its scale, and onnxruntime's float zero points run ~14x slower),
int8 as Q8_0. The LM head is int8 in an int4 export too (as 4-bit llama.cpp files keep theirs at 6-8 bits). The
experts of an int8 / int4 MoE export are com.microsoft.QMoE blocks of 32 along each matrix's input axis (the down
halves requantized along F). Embedding tables, norms and routers stay float32; so does a matrix whose rows are not
blocks of 32 (with a ConversionWarning).
The residual scale (BlockFFN) is folded into attn_output's and the experts' down weights.

The tokenizer travels inside the file: metadata_props["sparrow.vocab_gguf"] holds a vocab-only GGUF (every metadata
key of the source, no tensors), base64, which the onnxruntime backend opens with the native tokenizer.
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

from . import ConversionError

Q = gguf.GGMLQuantizationType
WEIGHT_TYPES = ("f32", "int8", "int4")
FFN_KINDS = ("moe", "dense")
OPSET = 23  # RMSNormalization, RotaryEmbedding and Attention (with a KV cache) are standard ops
MS_DOMAIN = "com.microsoft"
MAX_PROTO_BYTES = 1_800_000_000  # larger models keep their weights in OUT.data beside OUT (protobuf's 2 GB limit)
GENAI_CONFIG = "genai_config.json"
MIN_POSITIONS = 32768


@dataclass(frozen=True)
class Shape:
    """What the graph is built from: the GGUF's hyperparameters."""
    arch: str               # "llama" or "blockffn"
    n_layer: int
    n_embd: int             # H
    n_head: int             # NH
    n_head_kv: int          # NKV
    head_dim: int           # D
    n_rot: int
    n_vocab: int
    n_ctx_train: int
    eps: float
    rope_base: float
    # multi-head latent attention (blockffn files with attention.type "mla"; docs/gguf-blockffn.md)
    mla: bool = False
    kv_lora: int = 0        # KL
    key_length: int = 0     # DK = DN + DR
    value_length: int = 0   # DV
    lora_eps: float = 0.0
    # blockffn only
    n_expert: int = 0
    expert_width: int = 0
    router_norm: str = "none"
    router_norm_eps: float = 0.0
    router_norm_scale: float = 1.0
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0


def max_positions(s: Shape) -> int:
    """Positions the RoPE tables cover: the training context, and at least MIN_POSITIONS (the native runtime, which
    computes RoPE, runs past the training context too)."""
    return max(s.n_ctx_train, MIN_POSITIONS)


def _shape(fields: dict[str, object], n_vocab: int) -> Shape:
    arch = str(fields.get("general.architecture", ""))
    if arch not in ("llama", "blockffn"):
        raise ConversionError(f"ONNX export takes llama and blockffn GGUF files; this one is {arch or 'unlabelled'!r}")
    mla = fields.get(f"{arch}.attention.type") == "mla"

    def get(key: str, default: object = None) -> object:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ConversionError(f"the GGUF file has no {arch}.{key}")
        return value

    H, NH = int(get("embedding_length")), int(get("attention.head_count"))
    NKV = int(get("attention.head_count_kv", NH))
    if NH <= 0 or H % NH or NKV <= 0 or NH % NKV:
        raise ConversionError(f"inconsistent heads: hidden {H}, heads {NH}, kv heads {NKV}")
    D = H // NH
    n_rot = int(get("rope.dimension_count", D))
    if n_rot != D and not mla:
        raise ConversionError(f"RoPE over {n_rot} of {D} head dimensions is not supported by the ONNX export")
    s = Shape(arch, int(get("block_count")), H, NH, NKV, D, n_rot, n_vocab, int(get("context_length", 4096)),
              float(get("attention.layer_norm_rms_epsilon")), float(get("rope.freq_base", 10000.0)))
    if mla:  # the cache holds every head's key [DK] and value [DV], expanded from the latent (module docstring)
        DK, DV = int(get("attention.key_length")), int(get("attention.value_length"))
        if not 0 < n_rot < DK or n_rot % 2:
            raise ConversionError(f"MLA: RoPE over {n_rot} of the key's {DK} dimensions")
        s = Shape(**{**s.__dict__, "mla": True, "n_head_kv": NH, "kv_lora": int(get("attention.kv_lora_rank")),
                     "key_length": DK, "value_length": DV, "lora_eps": float(get("attention.lora_norm_epsilon"))})
    if arch == "blockffn":
        s = Shape(**{**s.__dict__, "n_expert": int(get("expert_count")), "expert_width": int(get("expert_width")),
                     "router_norm": str(get("router_norm")), "router_norm_eps": float(get("router_norm_eps")),
                     "router_norm_scale": float(get("router_norm_scale")),
                     "embedding_scale": float(get("embedding_scale")), "residual_scale": float(get("residual_scale")),
                     "logit_scale": float(get("logit_scale"))})
        if s.router_norm not in ("rms", "sum", "none"):
            raise ConversionError(f"unknown router norm {s.router_norm!r}")
    return s


# ---- weight encodings ----

def q4_0_to_nbits(raw: np.ndarray, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q4_0 rows [N, K] (blocks of 32: f16 d, 16 bytes; byte j holds element j low and j + 16 high, value
    d * (q - 8)) -> MatMulNBits 4-bit: packed [N, K/32, 16] (byte i holds elements 2i low and 2i + 1 high), scales
    [N, K/32] float32; the default zero point 8 gives the same values."""
    blocks = raw.reshape(N, K // 32, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)            # [N, K/32, 32] elements in order
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), d


def q8_0_to_nbits(raw: np.ndarray, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 rows [N, K] (blocks of 32: f16 d, 32 int8 q, value d * q) -> MatMulNBits 8-bit: [N, K/32, 32]
    uint8 q + 128 (the default zero point 128), scales [N, K/32] float32."""
    blocks = raw.reshape(N, K // 32, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].view(np.int8).astype(np.int16) + 128
    return q.astype(np.uint8), d


def asym4_nbits(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float rows [N, K] -> MatMulNBits 4-bit with integer zero points, per block of 32: scale = (max - min) / 15,
    zp = round(-min / scale) in [0, 15], q = clamp(round(w / scale) + zp); value (q - zp) * scale. Returns (packed
    [N, K/32, 16], scales [N, K/32], zero points packed two blocks a byte [N, ceil(K/64)])."""
    N, K = w.shape
    x = w.reshape(N, K // 32, 32).astype(np.float32)
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)              # the range holds 0: zp in [0, 15]
    scale = ((hi - lo) / 15).astype(np.float32)
    inv = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    zp = np.clip(np.rint(-lo * inv), 0, 15).astype(np.uint8)                   # [N, K/32]
    q = np.clip(np.rint(x * inv[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    nb = K // 32
    zpad = np.zeros((N, nb + nb % 2), dtype=np.uint8)
    zpad[:, :nb] = zp
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scale, (zpad[:, 0::2] | (zpad[:, 1::2] << 4))


class _Tensors:
    """The GGUF's tensors by name: float32 in numpy order, or the raw blocks for a bit-exact MatMulNBits."""

    def __init__(self, reader: gguf.GGUFReader):
        self.t = {t.name: t for t in reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.t[name].shape))

    def f32(self, name: str) -> np.ndarray:
        if name not in self.t:
            raise ConversionError(f"the GGUF file has no tensor {name}")
        t = self.t[name]
        return np.ascontiguousarray(dequantize(t.data, t.tensor_type).reshape(self.shape(name)), dtype=np.float32)

    def nbits(self, name: str, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Weight [N, K] as MatMulNBits blocks (q, scales, packed zero points or None): 4 bits as Q4_0 from a Q4_0
        file, else asymmetric from the values (asym4_nbits); 8 bits as Q8_0."""
        t = self.t[name]
        N, K = self.shape(name)
        if K % 32:
            raise ConversionError(f"{name}: rows of {K} values do not split into blocks of 32")
        if bits == 4 and t.tensor_type != Q.Q4_0:
            return asym4_nbits(self.f32(name))
        want = Q.Q8_0 if bits == 8 else Q.Q4_0
        raw = np.asarray(t.data, dtype=np.uint8).reshape(-1) if t.tensor_type == want else \
            quantize(self.f32(name), want).reshape(-1)
        return (*(q4_0_to_nbits if want == Q.Q4_0 else q8_0_to_nbits)(raw, N, K), None)


# ---- graph building ----

class _Graph:
    """Nodes and initializers with generated names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def const(self, value: np.ndarray | float | list, name: str | None = None, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        if name is None:
            self.n += 1
            name = f"const_{self.n}"
        self.inits.append(self.numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs: list[str] | None = None,
           **attrs) -> str | list[str]:
        """A node; outputs names some of its outputs (graph outputs), "" for a generated name."""
        self.n += 1
        outs = [(outputs[i] if outputs and outputs[i] else f"{op_type.lower()}_{self.n}" + (f"_{i}" if n_out > 1
                                                                                          else "")) for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self.n}",
                                                domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def rename(self, value: str, name: str) -> str:
        self.nodes.append(self.helper.make_node("Identity", [value], [name], name=f"out_{name}"))
        return name


class _Builder:
    """Builds the decoder graph for one model (module docstring)."""

    def __init__(self, s: Shape, w: _Tensors, weights: str, ffn: str, progress: Callable[[], None]):
        self.s, self.w, self.weights, self.ffn, self.tick = s, w, weights, ffn, progress
        self.g = _Graph()
        g = self.g
        self.i64 = lambda *v: g.const(np.array(v, dtype=np.int64))

    # one matmul x [..., K] @ W[N, K]^T in the chosen encoding
    def float_note(self, what: str, K: int) -> None:
        import warnings

        from .blockffn import ConversionWarning

        warnings.warn(f"{what}: rows of {K} values do not split into blocks of 32; kept float32",
                      ConversionWarning, stacklevel=4)

    def linear(self, x: str, name: str, bits: int | None = None, scale: float = 1.0) -> str:
        """x [..., K] @ (scale * W)^T for the GGUF matrix W [N, K] (scale: a residual scale folded into the weights,
        one node fewer per use)."""
        g, (N, K) = self.g, self.w.shape(name)
        if self.weights != "f32" and K % 32:
            self.float_note(name, K)
        if self.weights == "f32" or K % 32:
            return g.op("MatMul", [x, g.const((self.w.f32(name).T * np.float32(scale)).copy(), name)])
        bits = bits or (4 if self.weights == "int4" else 8)
        q, scales, zp = self.w.nbits(name, bits)
        inputs = [x, g.const(q, name + ".q"), g.const((scales * np.float32(scale)).astype(np.float32),
                                                       name + ".scales")]
        if zp is not None:
            inputs.append(g.const(zp, name + ".zero_points"))
        return g.op("MatMulNBits", inputs, domain=MS_DOMAIN,
                    K=K, N=N, bits=bits, block_size=32, accuracy_level=4)

    def linear_rows(self, x: str, names: list[str], fused: str) -> str:
        """x @ [W_1; W_2; ..]^T for GGUF matrices with the same K: their outputs side by side from one node, each
        row encoded as linear encodes it (the same values as separate matmuls)."""
        g, K = self.g, self.w.shape(names[0])[1]
        N = sum(self.w.shape(n)[0] for n in names)
        if self.weights != "f32" and K % 32:
            for n in names:
                self.float_note(n, K)
        if self.weights == "f32" or K % 32:
            return g.op("MatMul", [x, g.const(np.concatenate([self.w.f32(n) for n in names]).T.copy(), fused)])
        bits = 4 if self.weights == "int4" else 8
        parts = [self.w.nbits(n, bits) for n in names]
        q = np.concatenate([pq for pq, _, _ in parts])
        scales = np.concatenate([ps for _, ps, _ in parts]).astype(np.float32)
        inputs = [x, g.const(q, fused + ".q"), g.const(scales, fused + ".scales")]
        if any(zp is not None for _, _, zp in parts):  # the default zero point (8: 0x88 a byte) where a part has none
            nz = (K // 32 + 1) // 2
            inputs.append(g.const(np.concatenate([zp if zp is not None else np.full((pq.shape[0], nz), 0x88, np.uint8)
                                                  for pq, _, zp in parts]), fused + ".zero_points"))
        return g.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=K, N=N, bits=bits, block_size=32, accuracy_level=4)

    def skip_rmsnorm(self, x: str, add: str, weight: str, eps: float) -> tuple[str, str]:
        """(rmsnorm(x + add), x + add) in one node: com.microsoft.SkipSimplifiedLayerNormalization."""
        g = self.g
        g.n += 1
        y, total = f"skipnorm_{g.n}", f"skipnorm_{g.n}_sum"
        g.nodes.append(g.helper.make_node("SkipSimplifiedLayerNormalization", [x, add, g.const(self.w.f32(weight),
                                          weight)], [y, "", "", total], name=f"SkipNorm_{g.n}", domain=MS_DOMAIN,
                                          epsilon=eps))
        return y, total

    def rmsnorm(self, x: str, weight: str, eps: float) -> str:
        return self.g.op("RMSNormalization", [x, self.g.const(self.w.f32(weight), weight)], axis=-1, epsilon=eps)

    def attention_mla(self, l: int, xn: str, cos: str, sin: str, bias: str, scale: float = 1.0) -> str:
        """Multi-head latent attention, expanded: each head's key [k_nope | k_pe] and value computed from the latent
        c and cached as in GQA with NKV = NH. Returns [B, T, H]; adds present.{l}.* outputs."""
        g, s = self.g, self.s
        p, NH, KL, DK, DV, DR = f"blk.{l}.", s.n_head, s.kv_lora, s.key_length, s.value_length, s.n_rot
        DN = DK - DR
        cq = g.op("RMSNormalization", [self.linear(xn, p + "attn_q_a.weight"), g.const(
            self.w.f32(p + "attn_q_a_norm.weight"), p + "attn_q_a_norm.weight")], axis=-1, epsilon=s.lora_eps)
        q = g.op("Reshape", [self.linear(cq, p + "attn_q_b.weight"), self.i64(0, 0, NH, DK)])   # [B, T, NH, DK]
        q_nope, q_pe = g.op("Split", [q, self.i64(DN, DR)], n_out=2, axis=-1)
        q_pe = g.op("RotaryEmbedding", [g.op("Reshape", [q_pe, self.i64(0, 0, NH * DR)]), cos, sin, "position_ids"],
                    interleaved=1, num_heads=NH)
        q = g.op("Reshape", [g.op("Concat", [q_nope, g.op("Reshape", [q_pe, self.i64(0, 0, NH, DR)])], axis=-1),
                             self.i64(0, 0, NH * DK)])
        kv = self.linear(xn, p + "attn_kv_a_mqa.weight")                                      # [B, T, KL + DR]
        c, k_pe = g.op("Split", [kv, self.i64(KL, DR)], n_out=2, axis=-1)
        c = g.op("RMSNormalization", [c, g.const(self.w.f32(p + "attn_kv_a_norm.weight"), p + "attn_kv_a_norm.weight")],
                 axis=-1, epsilon=s.lora_eps)                                                 # [B, T, KL]
        k_pe = g.op("RotaryEmbedding", [k_pe, cos, sin, "position_ids"], interleaved=1, num_heads=1)  # [B, T, DR]
        k_b, v_b = self.w.f32(p + "attn_k_b.weight"), self.w.f32(p + "attn_v_b.weight")     # [NH,KL,DN] [NH,DV,KL]
        k_rows = k_b.transpose(0, 2, 1).reshape(NH * DN, KL)                                  # k_nope = rows @ c
        v_rows = v_b.reshape(NH * DV, KL)
        bits = {"int8": 8, "int4": 4}.get(self.weights)
        k_nope = g.op("Reshape", [self.matmul_rows(c, k_rows, p + "attn_k_b", bits), self.i64(0, 0, NH, DN)])
        k_pe = g.op("Expand", [g.op("Unsqueeze", [k_pe, self.i64(2)]), self.i64(1, 1, NH, 1)])  # [B, T, NH, DR]
        k = g.op("Reshape", [g.op("Concat", [k_nope, k_pe], axis=-1), self.i64(0, 0, NH * DK)])
        v = self.matmul_rows(c, v_rows, p + "attn_v_b", bits)                                 # [B, T, NH*DV]
        o, _, _ = g.op("Attention", [q, k, v, bias, f"past_key_values.{l}.key", f"past_key_values.{l}.value"],
                       n_out=3, outputs=["", f"present.{l}.key", f"present.{l}.value"],
                       q_num_heads=NH, kv_num_heads=NH)                                       # [B, T, NH*DV]
        return self.linear(o, p + "attn_output.weight", scale=scale)

    def attention(self, l: int, xn: str, cos: str, sin: str, bias: str, scale: float = 1.0) -> str:
        """GQA over the cache: returns the attention block's output [B, T, H]; adds present.{l}.* outputs."""
        g, s = self.g, self.s
        p, NH, NKV = f"blk.{l}.", s.n_head, s.n_head_kv

        def rope(x: str, heads: int) -> str:  # [B, T, heads * D], pairs (2i, 2i + 1) rotated
            return g.op("RotaryEmbedding", [x, cos, sin, "position_ids"], interleaved=1, num_heads=heads)

        # q, k and v from one matmul over their rows stacked (one weight stream, one node): then split
        qkv = self.linear_rows(xn, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], p + "attn_qkv")
        q, k, v = g.op("Split", [qkv, self.i64(NH * s.head_dim, NKV * s.head_dim, NKV * s.head_dim)], n_out=3,
                       axis=-1)
        q, k = rope(q, NH), rope(k, NKV)                                                     # [B, T, NH*D], [.., NKV*D]
        o, _, _ = g.op("Attention", [q, k, v, bias, f"past_key_values.{l}.key", f"past_key_values.{l}.value"],
                       n_out=3, outputs=["", f"present.{l}.key", f"present.{l}.value"],
                       q_num_heads=NH, kv_num_heads=NKV)                                      # [B, T, NH*D]
        return self.linear(o, p + "attn_output.weight", scale=scale)

    def dense_ffn(self, l: int, xn: str) -> str:
        g, p = self.g, f"blk.{l}."
        F = self.w.shape(p + "ffn_gate.weight")[0]
        gate, up = g.op("Split", [self.linear_rows(xn, [p + "ffn_gate.weight", p + "ffn_up.weight"], p + "ffn_gate_up"),
                                  self.i64(F, F)], n_out=2, axis=-1)
        h = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        return self.linear(h, p + "ffn_down.weight")

    def router(self, p: str, xn: str) -> str:
        """r [B, T, E]: relu(router x), normalised over the experts; zeros stay zero."""
        g, s = self.g, self.s
        r = g.op("Relu", [g.op("MatMul", [xn, g.const(self.w.f32(p + "ffn_router.weight").T.copy(),
                                                       p + "ffn_router.weight")])])
        if s.router_norm == "rms":
            return self.rmsnorm(r, p + "ffn_router_norm.weight", s.router_norm_eps)
        if s.router_norm == "sum":
            total = g.op("ReduceSum", [r, self.i64(-1)], keepdims=1)
            return g.op("Div", [r, g.op("Add", [g.op("Mul", [total, g.const(np.float32(s.router_norm_scale))]),
                                                g.const(np.float32(s.router_norm_eps))])])
        return r

    def block_ffn(self, l: int, xn: str, scale: float = 1.0) -> str:
        g, s, p = self.g, self.s, f"blk.{l}."
        E, F, H = s.n_expert, s.expert_width, s.n_embd
        bits = {"int8": 8, "int4": 4}.get(self.weights)
        r = self.router(p, xn)                                                      # [B, T, E]
        slabs = self.w.f32(p + "ffn_experts.weight")                               # [E, 2F, H]: up rows, down^T rows
        up, down_t = slabs[:, :F, :], slabs[:, F:, :]
        down = np.ascontiguousarray(down_t.transpose(0, 2, 1)) * np.float32(scale)  # [E, H, F], residual scale in
        if self.ffn == "dense":
            up_all, down_all = up.reshape(E * F, H), down.transpose(1, 0, 2).reshape(H, E * F)
            h = self.matmul_rows(xn, up_all, p + "ffn_up_all", bits)               # [B, T, E*F]
            h = g.op("Mul", [h, g.op("Sigmoid", [h])])
            rf = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [r, self.i64(-1)]), self.i64(1, 1, 1, F)]),
                                  self.i64(0, 0, E * F)])                           # r_e repeated F times
            return self.matmul_rows(g.op("Mul", [h, rf]), down_all, p + "ffn_down_all", bits)
        # MoE: rows = B*T tokens; router_probs = log(r) (-inf where r = 0); a row with every expert off gets
        # [-1e30, -inf, ...] (one expert, whose output the factor sum(r) = 0 then zeroes).
        # max(log r, [-1e30, -inf, ..]) is that row: expert 0 at -1e30 weighs exp(-1e30 - max) = 0 (not run) in any
        # row with an expert on, as Log(0) = -inf does the others.
        if bits is not None and (H % 32 or F % 32):
            self.float_note(p + "ffn_experts.weight", F if F % 32 else H)
            bits = None
        total3 = g.op("ReduceSum", [r, self.i64(-1)], keepdims=1)                  # [B, T, 1]
        floor = g.const(np.array([-1e30] + [-np.inf] * (E - 1), dtype=np.float32))
        logits = g.op("Reshape", [g.op("Max", [g.op("Log", [r]), floor]), self.i64(-1, E)])  # [rows, E]
        attrs = {"k": E, "activation_type": "silu", "normalize_routing_weights": 0}
        if bits is None:
            y = g.op("MoE", [xn, logits, g.const(up.copy(), p + "ffn_up"), "", g.const(down, p + "ffn_down")],
                     domain=MS_DOMAIN, **attrs)                                     # [rows, H]
        else:  # QMoE: blocks of 32 along each matrix's input axis, the MatMulNBits encoding (offset 8 / 128)
            q_up, s_up = self.quant_rows(up.reshape(E * F, H), bits)
            q_dn, s_dn = self.quant_rows(down.reshape(E * H, F), bits)
            y = g.op("QMoE", [xn, logits, g.const(q_up.reshape(E, F, -1), p + "ffn_up.q"),
                              g.const(s_up.reshape(E, F, -1), p + "ffn_up.scales"), "",
                              g.const(q_dn.reshape(E, H, -1), p + "ffn_down.q"),
                              g.const(s_dn.reshape(E, H, -1), p + "ffn_down.scales")], domain=MS_DOMAIN,
                     expert_weight_bits=bits, block_size=32, accuracy_level=4, **attrs)
        return g.op("Mul", [y, total3])                                             # [B, T, H] * sum(r)

    def quant_rows(self, w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """Float rows [N, K] -> (q [N, K/32, 32 * bits / 8], scales [N, K/32]) as Q4_0 / Q8_0 blocks (rows that
        came from blocks of that type along K quantize back to the same blocks)."""
        N, K = w.shape
        want = Q.Q8_0 if bits == 8 else Q.Q4_0
        raw = quantize(np.ascontiguousarray(w, dtype=np.float32), want).reshape(-1)
        return (q8_0_to_nbits if bits == 8 else q4_0_to_nbits)(raw, N, K)

    def matmul_rows(self, x: str, w: np.ndarray, name: str, bits: int | None) -> str:
        """x [..., K] @ w[N, K]^T for a weight built here (not a GGUF tensor): f32 MatMul or MatMulNBits."""
        g, (N, K) = self.g, w.shape
        if bits is not None and K % 32:
            self.float_note(name, K)
            bits = None
        if bits is None:
            return g.op("MatMul", [x, g.const(np.ascontiguousarray(w.T), name)])
        q, scales = self.quant_rows(w, bits)
        return g.op("MatMulNBits", [x, g.const(q, name + ".q"), g.const(scales, name + ".scales")],
                    domain=MS_DOMAIN, K=K, N=N, bits=bits, block_size=32, accuracy_level=4)

    def build(self):
        from onnx import TensorProto, helper

        g, s = self.g, self.s
        H, NKV, D, L = s.n_embd, s.n_head_kv, s.head_dim, s.n_layer
        # Token embeddings (and, tied, the LM head's matrix)
        table = self.w.f32("token_embd.weight")                                    # [V, H]
        embd = g.const(table, "token_embd.weight")
        x = g.op("Gather", [embd, "input_ids"], axis=0)                            # [B, T, H]
        if s.embedding_scale != 1.0:
            x = g.op("Mul", [x, g.const(np.float32(s.embedding_scale))])
        # RoPE tables: cos/sin [positions, R/2], indexed by position_ids in RotaryEmbedding
        R = s.n_rot  # D, or MLA's DR
        theta = np.arange(max_positions(s), dtype=np.float64)[:, None] * \
            s.rope_base ** (-np.arange(0, R, 2, dtype=np.float64) / R)
        cos = g.const(np.cos(theta).astype(np.float32), "rope_cos")
        sin = g.const(np.sin(theta).astype(np.float32), "rope_sin")
        # The mask: key s visible to query t iff s <= P + t and attention_mask[s]; then + attention_bias.
        T = g.op("Gather", [g.op("Shape", ["input_ids"]), self.i64(1)], axis=0)   # [1]
        S = g.op("Gather", [g.op("Shape", ["attention_mask"]), self.i64(1)], axis=0)
        zero, one = g.const(np.int64(0)), g.const(np.int64(1))
        S0, T0 = g.op("Squeeze", [S]), g.op("Squeeze", [T])
        q_slot = g.op("Range", [g.op("Sub", [S0, T0]), S0, one])                    # [T]
        k_slot = g.op("Range", [zero, S0, one])                                     # [S]
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_slot, self.i64(0)]),
                                      g.op("Unsqueeze", [q_slot, self.i64(1)])])    # [T, S]
        real = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", self.i64(1, 2)])], to=TensorProto.BOOL)
        visible = g.op("And", [causal, real])                                       # [B, 1, T, S]
        bias = g.op("Add", [g.op("Where", [visible, g.const(np.float32(0)), g.const(np.float32(-np.inf))]),
                            "attention_bias"])
        # Each residual add is fused with the norm after it (SkipSimplifiedLayerNormalization); the last one's
        # norm comes after the logits_keep slice.
        xn = self.rmsnorm(x, "blk.0.attn_norm.weight", s.eps)
        for l in range(L):
            p = f"blk.{l}."
            attention = self.attention_mla if s.mla else self.attention
            # the residual scale is folded into attn_output's and the experts' down weights
            a = attention(l, xn, cos, sin, bias, s.residual_scale)
            xn, x = self.skip_rmsnorm(x, a, p + "ffn_norm.weight", s.eps)
            f = self.block_ffn(l, xn, s.residual_scale) if s.arch == "blockffn" else self.dense_ffn(l, xn)
            if l + 1 < L:
                xn, x = self.skip_rmsnorm(x, f, f"blk.{l + 1}.attn_norm.weight", s.eps)
            else:
                x = g.op("Add", [x, f])
            self.tick()
        # logits for the last logits_keep tokens (0: all)
        start = g.op("Where", [g.op("Greater", ["logits_keep", zero]), g.op("Sub", [T0, "logits_keep"]), zero])
        x = g.op("Slice", [x, g.op("Unsqueeze", [start, self.i64(0)]), g.op("Unsqueeze", [T0, self.i64(0)]),
                           self.i64(1)])
        xn = self.rmsnorm(x, "output_norm.weight", s.eps)
        if s.logit_scale != 1.0:
            xn = g.op("Mul", [xn, g.const(np.float32(s.logit_scale))])
        head = "output.weight" if "output.weight" in self.w else "token_embd.weight"
        if self.weights == "f32" and head == "token_embd.weight":  # one copy of the table: Gemm reads it transposed
            flat = g.op("Gemm", [g.op("Reshape", [xn, self.i64(-1, H)]), embd], transB=1)
            logits = g.op("Reshape", [flat, g.op("Concat", [g.op("Slice", [g.op("Shape", [xn]), self.i64(0),
                                                                          self.i64(2)]), self.i64(-1)], axis=0)])
        else:
            logits = self.linear(xn, head, bits=8)  # the head stays 8-bit: its error lands on the logits directly
        g.rename(logits, "logits")
        self.tick()

        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "logits_length", s.n_vocab])]
        dims = {"key": s.key_length, "value": s.value_length} if s.mla else {"key": D, "value": D}
        for l in range(L):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{l}.{kv}", f32,
                                                            ["batch_size", NKV, "past_sequence_length", dims[kv]]))
                outputs.append(helper.make_tensor_value_info(f"present.{l}.{kv}", f32,
                                                             ["batch_size", NKV, "total_sequence_length", dims[kv]]))
        # inputs with defaults: initializers that are also graph inputs
        inputs.append(helper.make_tensor_value_info("attention_bias", f32, ["bias_batch", 1, "bias_q", "bias_k"]))
        g.const(np.zeros((1, 1, 1, 1), dtype=np.float32), "attention_bias")
        inputs.append(helper.make_tensor_value_info("logits_keep", i64, []))
        g.const(np.int64(0), "logits_keep")
        graph = helper.make_graph(g.nodes, f"sparrow_{s.arch}", inputs, outputs, g.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                       helper.make_opsetid(MS_DOMAIN, 1)],
                                 producer_name="sparrow", ir_version=10)


def vocab_gguf(reader: gguf.GGUFReader) -> bytes:
    """A vocab-only GGUF: every metadata key of the source (tokenizer, template, hyperparameters), no tensors."""
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(None, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    fd, tmp = tempfile.mkstemp(suffix=".gguf")
    os.close(fd)
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


def _fields(reader: gguf.GGUFReader) -> dict[str, object]:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue  # the vocabulary itself: not needed here, slow to read
        out[name] = field.contents()
    return out


def genai_config(s: Shape, fields: dict[str, object], model_file: str) -> dict:
    """onnxruntime-genai's genai_config.json for a dense decoder exported here."""
    eos = fields.get("tokenizer.ggml.eos_token_id", 0)
    bos = fields.get("tokenizer.ggml.bos_token_id", eos)
    return {
        "model": {
            "type": "llama", "context_length": s.n_ctx_train, "vocab_size": s.n_vocab,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos,
            "decoder": {
                "filename": model_file, "hidden_size": s.n_embd, "head_size": s.head_dim,
                "num_attention_heads": s.n_head, "num_key_value_heads": s.n_head_kv, "num_hidden_layers": s.n_layer,
                "session_options": {"log_id": "sparrow", "provider_options": []},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": s.n_ctx_train, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def export_onnx(src: str | os.PathLike, out: str | os.PathLike, *, weights: str = "f32", ffn: str = "moe",
                overwrite: bool = False, progress: bool = True, genai: bool = True,
                draft_model: str | None = None, source_name: str | None = None) -> Path:
    """Export the GGUF file src to the ONNX file out (module docstring). weights: "f32", "int8" or "int4"; ffn
    (BlockFFN only): "moe" or "dense". genai: write genai_config.json beside a dense (llama) export. A BlockFFN export
    carries metadata "sparrow.sparsity" (converters/sparsity.py): the GGUF's measured TLS / CLS-8 (measured here when
    it has none) and the paired draft model (the GGUF's, or draft_model). The result is written to a
    temporary name, checked with onnx.checker, and renamed into place: a failure leaves nothing behind and never
    touches an existing out. A model over MAX_PROTO_BYTES keeps its weights in OUT.data beside OUT. Returns out."""
    import onnx
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if weights not in WEIGHT_TYPES:
        raise ConversionError(f"unknown ONNX weight type {weights!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    if ffn not in FFN_KINDS:
        raise ConversionError(f"unknown FFN form {ffn!r}; choose one of {', '.join(FFN_KINDS)}")
    if out.suffix.lower() != ".onnx":
        raise ConversionError(f"{out}: an ONNX export's file name ends in .onnx")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ConversionError(f"{out.parent} is not a folder")
    try:
        reader = gguf.GGUFReader(str(src))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {src} as GGUF: {e}") from None
    fields = _fields(reader)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
    tensors = _Tensors(reader)
    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{src} has no token_embd.weight")
    n_vocab = n_vocab or tensors.shape("token_embd.weight")[0]
    s = _shape(fields, n_vocab)
    bar = tqdm(total=s.n_layer + 1, desc=f"exporting {out.name}", unit="layer", disable=not progress)
    try:
        model = _Builder(s, tensors, weights, ffn, lambda: bar.update(1)).build()
    finally:
        bar.close()
    props = {"sparrow.vocab_gguf": base64.b64encode(vocab_gguf(reader)).decode("ascii"),
             "sparrow.source": source_name or src.name, "sparrow.architecture": s.arch, "sparrow.weights": weights,
             "sparrow.kv": json.dumps({"layers": s.n_layer, "kv_heads": s.n_head_kv,
                                       "key_dim": s.key_length if s.mla else s.head_dim,
                                       "value_dim": s.value_length if s.mla else s.head_dim,
                                       "attention": "mla (expanded per head)" if s.mla else "gqa",
                                       "context_length": s.n_ctx_train, "max_positions": max_positions(s)})}
    if s.arch == "blockffn":
        props["sparrow.experts"] = json.dumps({
            "ffn": ffn, "expert_count": s.n_expert, "expert_width": s.expert_width, "router": "relu",
            "router_norm": s.router_norm,
            "layout": ("com.microsoft.MoE: fc1 = up [E, F, H], fc2 = down [E, H, F], router_probs = log(r)"
                       if ffn == "moe" else "dense: up [H, E*F], down [E*F, H], h scaled by r per expert")})
    if s.arch == "blockffn":
        from . import sparsity as sp

        carried = sp.from_fields(fields)
        if "tls" not in carried:
            carried |= sp.measure(src)
        if draft_model:
            carried["draft_model"] = draft_model
        props["sparrow.sparsity"] = json.dumps(carried)
    onnx.helper.set_model_props(model, props)

    # Written into a temporary folder beside out, checked, then renamed into place: the weights' file first when the
    # model is too large for one protobuf (OUT.data beside OUT, which onnxruntime finds by the name stored in OUT).
    data = out.with_name(out.name + ".data")
    external = model.ByteSize() > MAX_PROTO_BYTES
    if external and data.exists() and not overwrite:
        raise ConversionError(f"{data} exists; pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        tmp = Path(work) / out.name
        if external:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(model, tmp)
        del model
        try:
            onnx.checker.check_model(str(tmp), full_check=False)
        except onnx.checker.ValidationError as e:  # a bug here, not the user's: say so plainly
            raise ConversionError(f"the exported graph does not pass onnx.checker: {e}") from None
        umask = os.umask(0)
        os.umask(umask)
        for f in Path(work).iterdir():
            os.chmod(f, 0o666 & ~umask)
        if external:
            os.replace(Path(work) / data.name, data)
        os.replace(tmp, out)
    if genai and s.arch == "llama":
        _write_genai_config(out, genai_config(s, fields, out.name))
    return out


def _write_genai_config(out: Path, config: dict) -> None:
    """genai_config.json beside out, unless one there describes another model file (then a warning: it is kept)."""
    import warnings

    from .blockffn import ConversionWarning

    path = out.parent / GENAI_CONFIG
    if path.exists():
        try:
            other = json.loads(path.read_text())["model"]["decoder"]["filename"]
        except (OSError, ValueError, KeyError, TypeError):
            other = None
        if other != out.name:
            warnings.warn(f"{path} exists and describes {other or 'something else'}; kept it, so onnxruntime-genai "
                          f"will not load {out.name} from this folder (export into a folder of its own)",
                          ConversionWarning, stacklevel=3)
            return
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)
