"""A numpy float64 reference of BlockFFN: the oracle for the converter and the native runtime.

Shape legend: T = tokens, H = hidden, V = vocabulary, L = layers, E = experts, F = expert width,
NH/NKV = heads/kv heads, D = head dim; multi-head latent attention: QL/KL = q/kv lora ranks, DN/DR = per-head
nope/rope dims, DK = DN + DR, DV = H / NH.

Two readings of the same model:
- `BlockFFNRef.from_hf(folder)`: the Hugging Face checkpoint as the official MiniCPM-based modeling code
  (thunlp/BlockFFN, pretrain/bmt_to_hf/modeling_minicpm.py: BlockMLP, VanillaAttention, MiniCPMDecoderLayer) defines
  it, on the unconverted weights: RoPE in HF's rotate_half convention, experts as `ffn_type` stores them. It knows
  nothing about GGUF, so it checks the converter rather than repeating it.
- `BlockFFNGGUFRef.from_gguf(path)`: the function a converted GGUF file describes (docs/gguf-blockffn.md): weights
  dequantized with the `gguf` package, RoPE on adjacent pairs, experts read from their [E, 2F, H] slabs. This is the
  oracle for the native runtime on quantized files; on an F32 file it equals the HF reading to float64 rounding.
  `from_gguf(path, runtime_rounding=True)` rounds as the runtime does: the activations entering a quantized matmul to
  8-bit blocks (reference.llama.q8a: attention projections, the experts' up rows, the head; the experts' down rows
  take float coefficients) and q, k, v after RoPE to F16 (the KV cache), so that what is left is float32 arithmetic.
  With `down_i8=True` too (the runtime's int8 down path: Q4_0 experts on a tier with kernels.h accum_packed_i8) the
  down rows take each token's coefficients times the rows' block scales quantized to int8 per 16-row group and column
  block (`down_i8` below).

Multi-head latent attention (config attention_type "mla", the released checkpoints; official MLAAttention): the HF
reading computes it as the official code does (keys and values expanded per head, rotate_half RoPE over the DR rope
dims); the GGUF reading as docs/gguf-blockffn.md defines it, in either of its two forms (`mla_absorbed`):
  absorbed (default, the runtime's form): scores from q_lat = k_b q_nope against the cached latent c, and
      o = v_b (sum_s p_s c_s); with runtime_rounding the cache (c, rotated k_pe) is rounded to F16 (the query stays
      float32, as in the runtime: there is no llama.cpp result to match, and rounding it would double the error),
      and q_nope / sum_s p_s c_s enter k_b / v_b through q8a where those are quantized;
  expanded: k_nope = k_b^T c and v = v_b c per head, then ordinary attention; with runtime_rounding only the cache
      (c, k_pe) is rounded to F16 and the q_a/q_b/kv_a/output inputs to q8a (it is an oracle for the absorbed form's
      arithmetic only at float64).

The block, per layer (x [T, H]):
    x = x + s_res * attn(rmsnorm(x))                       s_res = scale_depth / sqrt(L)
    x = x + s_res * ffn(rmsnorm(x))
  ffn(x):  r = relu(x @ W_router.T)                        [T, E]
           r = router_norm(r)                              rms: r / sqrt(mean_E(r^2) + rms_norm_eps) * w_norm
                                                           sum: r / (sum_E(r) * norm_scale + 1e-5);  none: r
           y = sum_e r[:, e] * silu(x @ up[e].T) @ down[e].T      up[e] [F, H], down[e] [H, F]
  embeddings are multiplied by scale_emb; logits = rmsnorm(x) / (H / dim_model_base) @ W_head.T
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .llama import ACT_Q8_TYPES, q8a

# MiniCPMConfig defaults for keys a config.json may leave out.
DEFAULTS = {"num_key_value_heads": None, "norm_after_router": "sum", "norm_scale": 1.0, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "scale_emb": 1.0, "dim_model_base": 1.0,
            "scale_depth": 1.0, "attention_type": "vanilla", "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
            "q_lora_rank": 768, "kv_lora_rank": 256}
SUM_NORM_EPS = 1e-5
LORA_NORM_EPS = 1e-6  # MLAAttention's q_a_layernorm / kv_a_layernorm: MiniCPMRMSNorm(n) with its default eps


def down_i8(c: np.ndarray, down_t: np.ndarray) -> np.ndarray:
    """c [F] @ down_t [F, H] (Q4_0 rows, dequantized) as kernels.h accum_packed_i8 computes it: per group of 16 rows and
    block of 32 columns, a = c * d (float32; d the row's block scale, |d| = max |w| / 8 of a reference-quantized block,
    and w / d = q - 8 -- a negative d flips a and q - 8 together), quantized with s = max |a| / 127, q = rint(a *
    (127 / max)), and summed as s * (q . (w / d)) per group."""
    F, H = down_t.shape
    w = down_t.reshape(F, H // 32, 32)
    d = np.abs(w).max(-1) / 8                                                      # [F, nb]
    w8 = np.rint(np.divide(w, d[..., None], out=np.zeros_like(w), where=d[..., None] > 0))
    out = np.zeros((H // 32, 32))
    for g in range(0, F, 16):
        a = (c[g:g + 16, None].astype(np.float32) * d[g:g + 16].astype(np.float32)).astype(np.float32)
        mx = np.abs(a).max(0)
        live = mx >= np.float32(2.0 ** -100)
        inv = np.where(live, np.float32(127) / np.where(live, mx, 1), 0).astype(np.float32)
        q = np.rint((a * inv).astype(np.float32))
        s = np.where(live, mx / np.float32(127), 0).astype(np.float32).astype(np.float64)
        out += s[:, None] * np.einsum("fb,fbj->bj", q, w8[g:g + 16])
    return out.reshape(H)


def f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float64)


def rmsnorm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:  # x [..., N] over the last axis
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def router_norm(r: np.ndarray, kind: str, w: np.ndarray | None, eps: float, scale: float) -> np.ndarray:
    """r [T, E] after ReLU -> the normalised scores; zeros stay exactly zero in every variant."""
    if kind == "rms":
        return rmsnorm(r, w, eps)
    if kind == "sum":
        return r / (r.sum(axis=-1, keepdims=True) * scale + eps)
    if kind == "none":
        return r
    raise ValueError(f"unknown router norm {kind!r}")


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q [T, NH, D], k/v [T, NKV, D] (RoPE applied) -> [T, NH*D]; GQA by repeating each kv head NH/NKV times."""
    T, NH, D = q.shape
    group = NH // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)    # [T, NH, D]
    s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D)                 # [NH, T, T]
    s = s + np.triu(np.full((T, T), -np.inf), k=1)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", a, v).reshape(T, NH * D)


def softmax_causal(s: np.ndarray) -> np.ndarray:
    """s [..., T, T] scores -> attention weights, token t seeing tokens 0..t."""
    T = s.shape[-1]
    s = s + np.triu(np.full((T, T), -np.inf), k=1)
    a = np.exp(s - s.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


def rope_freqs(T: int, D: int, base: float) -> np.ndarray:
    """theta [T, D/2]: position t times base^(-2i/D)."""
    return np.arange(T, dtype=np.float64)[:, None] * base ** (-np.arange(0, D, 2, dtype=np.float64) / D)


@dataclass
class BlockFFNRef:
    config: dict                   # config.json with MiniCPMConfig defaults filled in
    weights: dict[str, np.ndarray]  # HF name -> float64 array in the checkpoint's own shape

    @classmethod
    def from_hf(cls, folder: str | Path) -> BlockFFNRef:
        from safetensors.numpy import load_file

        folder = Path(folder)
        config = {**DEFAULTS, **json.loads((folder / "config.json").read_text())}
        if config["num_key_value_heads"] is None:
            config["num_key_value_heads"] = config["num_attention_heads"]
        weights = {k: v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()}
        return cls(config, weights)

    def rope(self, x: np.ndarray) -> np.ndarray:
        """x [T, heads, D]: HF rotate_half RoPE, dimension i pairs with i + D/2."""
        T, _, D = x.shape
        theta = rope_freqs(T, D, self.config["rope_theta"])
        cos = np.concatenate([np.cos(theta)] * 2, axis=-1)[:, None, :]  # [T, 1, D]
        sin = np.concatenate([np.sin(theta)] * 2, axis=-1)[:, None, :]
        rotated = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], axis=-1)
        return x * cos + rotated * sin

    def mla(self, x: np.ndarray, p: str) -> np.ndarray:
        """x [T, H] (normed) -> attention output [T, H], as the official MLAAttention.forward computes it."""
        c, W, T = self.config, self.weights, x.shape[0]
        NH, KL = c["num_attention_heads"], c["kv_lora_rank"]
        DN, DR, DV = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["hidden_size"] // NH   # v_head_dim = H / NH
        a = p + "self_attn."
        cq = rmsnorm(x @ W[a + "q_a_proj.weight"].T, W[a + "q_a_layernorm.weight"], LORA_NORM_EPS)    # [T, QL]
        q = (cq @ W[a + "q_b_proj.weight"].T).reshape(T, NH, DN + DR)
        q_nope, q_pe = q[..., :DN], q[..., DN:]
        compressed = x @ W[a + "kv_a_proj_with_mqa.weight"].T                                       # [T, KL + DR]
        latent, k_pe = compressed[:, :KL], compressed[:, KL:].reshape(T, 1, DR)
        kv = (rmsnorm(latent, W[a + "kv_a_layernorm.weight"], LORA_NORM_EPS) @ W[a + "kv_b_proj.weight"].T)
        kv = kv.reshape(T, NH, DN + DV)
        k_nope, v = kv[..., :DN], kv[..., DN:]
        q_pe, k_pe = self.rope(q_pe), self.rope(k_pe)                                               # over DR dims
        query = np.concatenate([q_nope, q_pe], axis=-1)                                             # [T, NH, DK]
        key = np.concatenate([k_nope, np.broadcast_to(k_pe, (T, NH, DR))], axis=-1)
        p_att = softmax_causal(np.einsum("thd,shd->hts", query, key) * (DN + DR) ** -0.5)         # [NH, T, T]
        o = np.einsum("hts,shd->thd", p_att, v).reshape(T, NH * DV)
        return o @ W[a + "o_proj.weight"].T

    def ffn(self, x: np.ndarray, p: str) -> tuple[np.ndarray, np.ndarray]:
        """x [T, H] (normed) -> (y [T, H], router scores r [T, E]); computed over all experts, as BlockMLP does."""
        c, W = self.config, self.weights
        E, F = c["num_experts"], c["expert_size"]
        T = x.shape[0]
        r = np.maximum(x @ W[p + "mlp.router_proj.weight"].T, 0.0)                       # [T, E]
        eps = c["rms_norm_eps"] if c["norm_after_router"] == "rms" else SUM_NORM_EPS
        r = router_norm(r, c["norm_after_router"], W.get(p + "mlp.router_norm.weight"), eps, c["norm_scale"])
        up, down = W[p + "mlp.up_proj"], W[p + "mlp.down_proj"]
        if c["ffn_type"] == "block":
            h = silu(np.einsum("th,efh->tef", x, up)) * r[:, :, None]                    # up [E, F, H] -> [T, E, F]
            y = np.einsum("tef,ehf->th", h, down)                                        # down [E, H, F]
        elif c["ffn_type"] == "block_linear":
            h = silu(x @ up.T).reshape(T, E, F) * r[:, :, None]                          # up [E*F, H]
            y = h.reshape(T, E * F) @ down.T                                             # down [H, E*F]
        else:
            raise ValueError(f"unknown ffn_type {c['ffn_type']!r}")
        return y, r

    def forward(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Logits [T, V] and router scores [L, T, E] for a prompt evaluated from position 0 (causal)."""
        c, W, T = self.config, self.weights, len(tokens)
        L, NH, NKV, eps = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
        D = c["hidden_size"] // NH
        s_res = c["scale_depth"] / math.sqrt(L)
        x = W["model.embed_tokens.weight"][tokens] * c["scale_emb"]                      # [T, H]
        routers = []
        for l in range(L):
            p = f"model.layers.{l}."
            xn = rmsnorm(x, W[p + "input_layernorm.weight"], eps)
            if c["attention_type"] == "mla":
                x = x + s_res * self.mla(xn, p)
            else:
                q = self.rope((xn @ W[p + "self_attn.q_proj.weight"].T).reshape(T, NH, D))   # [T, NH, D]
                k = self.rope((xn @ W[p + "self_attn.k_proj.weight"].T).reshape(T, NKV, D))  # [T, NKV, D]
                v = (xn @ W[p + "self_attn.v_proj.weight"].T).reshape(T, NKV, D)
                x = x + s_res * (causal_attention(q, k, v) @ W[p + "self_attn.o_proj.weight"].T)
            y, r = self.ffn(rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps), p)
            x = x + s_res * y
            routers.append(r)
        head = W["model.embed_tokens.weight"] if c["tie_word_embeddings"] else W["lm_head.weight"]
        h = rmsnorm(x, W["model.norm.weight"], eps) / (c["hidden_size"] / c["dim_model_base"])
        return h @ head.T, np.stack(routers)


@dataclass
class BlockFFNGGUFRef:
    meta: dict                      # blockffn.* keys without the prefix
    weights: dict[str, np.ndarray]  # GGUF name -> float64, numpy order (GGUF ne reversed)
    q8_inputs: frozenset[str] = frozenset()  # weights whose matmul input q8a rounds (runtime_rounding=True)
    kv_f16: bool = False                     # q, k, v rounded to F16 after RoPE (runtime_rounding=True)
    mla_absorbed: bool = True                # MLA files: the absorbed form (else the expanded one)
    down_i8: bool = False                    # Q4_0 experts' down rows as the int8 down path rounds (runtime_rounding)

    @classmethod
    def from_gguf(cls, path: str | Path, runtime_rounding: bool = False, mla_absorbed: bool = True,
                  down_i8: bool = False) -> BlockFFNGGUFRef:
        from gguf import GGMLQuantizationType, GGUFReader
        from gguf.quants import dequantize

        r = GGUFReader(str(path))
        meta = {k[len("blockffn."):]: v.contents() for k, v in r.fields.items() if k.startswith("blockffn.")}
        w = {}
        for t in r.tensors:
            shape = [int(d) for d in reversed(t.shape)]
            w[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
        q4_0_experts = any(t.name.endswith("ffn_experts.weight") and t.tensor_type == GGMLQuantizationType.Q4_0
                           for t in r.tensors)
        return cls(meta, w, frozenset(t.name for t in r.tensors if runtime_rounding and t.tensor_type in ACT_Q8_TYPES),
                   runtime_rounding, mla_absorbed, runtime_rounding and down_i8 and q4_0_experts)

    def q8(self, x: np.ndarray, name: str) -> np.ndarray:
        """x as the matmul with weight `name` sees it."""
        return q8a(x) if name in self.q8_inputs else x

    def rope(self, x: np.ndarray) -> np.ndarray:
        """x [T, heads, D]: adjacent pairs (2i, 2i+1) rotate by theta_i (GGUF/llama.cpp 'normal' RoPE)."""
        T = x.shape[0]
        theta = rope_freqs(T, self.meta["rope.dimension_count"], self.meta["rope.freq_base"])
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = x.copy()
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def gqa(self, xn: np.ndarray, p: str) -> np.ndarray:
        """xn [T, H] (normed) -> attention output [T, H] (after attn_output): multi-head / grouped-query."""
        m, W, T = self.meta, self.weights, xn.shape[0]
        NH, NKV = m["attention.head_count"], m["attention.head_count_kv"]
        D = m["embedding_length"] // NH
        q = self.rope((self.q8(xn, p + "attn_q.weight") @ W[p + "attn_q.weight"].T).reshape(T, NH, D))
        k = self.rope((self.q8(xn, p + "attn_k.weight") @ W[p + "attn_k.weight"].T).reshape(T, NKV, D))
        v = (self.q8(xn, p + "attn_v.weight") @ W[p + "attn_v.weight"].T).reshape(T, NKV, D)
        if self.kv_f16:
            q, k, v = f16(q), f16(k), f16(v)
        return self.q8(causal_attention(q, k, v), p + "attn_output.weight") @ W[p + "attn_output.weight"].T

    def mla(self, xn: np.ndarray, p: str) -> np.ndarray:
        """xn [T, H] (normed) -> attention output [T, H]: multi-head latent attention, docs/gguf-blockffn.md."""
        m, W, T = self.meta, self.weights, xn.shape[0]
        NH, KL, DK = m["attention.head_count"], m["attention.kv_lora_rank"], m["attention.key_length"]
        DR, DV, eps = m["rope.dimension_count"], m["attention.value_length"], m["attention.lora_norm_epsilon"]
        DN = DK - DR
        cq = rmsnorm(self.q8(xn, p + "attn_q_a.weight") @ W[p + "attn_q_a.weight"].T, W[p + "attn_q_a_norm.weight"],
                     eps)                                                                        # [T, QL]
        q = (self.q8(cq, p + "attn_q_b.weight") @ W[p + "attn_q_b.weight"].T).reshape(T, NH, DK)
        q_nope, q_pe = q[..., :DN], self.rope(q[..., DN:])                                       # [T, NH, DN|DR]
        kv = self.q8(xn, p + "attn_kv_a_mqa.weight") @ W[p + "attn_kv_a_mqa.weight"].T            # [T, KL + DR]
        c = rmsnorm(kv[:, :KL], W[p + "attn_kv_a_norm.weight"], eps)                              # [T, KL]
        k_pe = self.rope(kv[:, None, KL:])[:, 0]                                                  # [T, DR]
        if self.kv_f16:                                                                           # the F16 cache
            c, k_pe = f16(c), f16(k_pe)
        k_b, v_b = W[p + "attn_k_b.weight"], W[p + "attn_v_b.weight"]                            # [NH,KL,DN] [NH,DV,KL]
        if self.mla_absorbed:
            q_lat = np.einsum("hld,thd->thl", k_b, self.q8(q_nope, p + "attn_k_b.weight"))        # [T, NH, KL]
            s = np.einsum("thl,sl->hts", q_lat, c) + np.einsum("thr,sr->hts", q_pe, k_pe)         # [NH, T, T]
            o_lat = np.einsum("hts,sl->thl", softmax_causal(s / math.sqrt(DK)), c)                # [T, NH, KL]
            o = np.einsum("hvl,thl->thv", v_b, self.q8(o_lat, p + "attn_v_b.weight"))             # [T, NH, DV]
        else:
            k_nope = np.einsum("hld,sl->shd", k_b, c)                                             # [T, NH, DN]
            v = np.einsum("hvl,sl->shv", v_b, c)                                                  # [T, NH, DV]
            s = np.einsum("thd,shd->hts", q_nope, k_nope) + np.einsum("thr,sr->hts", q_pe, k_pe)
            o = np.einsum("hts,shv->thv", softmax_causal(s / math.sqrt(DK)), v)
        return self.q8(o.reshape(T, NH * DV), p + "attn_output.weight") @ W[p + "attn_output.weight"].T

    def ffn(self, x: np.ndarray, p: str) -> tuple[np.ndarray, np.ndarray]:
        """x [T, H] -> (y [T, H], r [T, E]), visiting only the experts each token uses."""
        m, W = self.meta, self.weights
        F = m["expert_width"]
        r = np.maximum(x @ W[p + "ffn_router.weight"].T, 0.0)                            # [T, E]
        r = router_norm(r, m["router_norm"], W.get(p + "ffn_router_norm.weight"), m["router_norm_eps"],
                        m["router_norm_scale"])
        slabs = W[p + "ffn_experts.weight"]                                             # [E, 2F, H]
        xq = self.q8(x, p + "ffn_experts.weight")
        y = np.zeros_like(x)
        for t, e in zip(*np.nonzero(r)):
            up, down_t = slabs[e, :F], slabs[e, F:]                                      # [F, H] each
            c = r[t, e] * silu(up @ xq[t])
            y[t] += down_i8(c, down_t) if self.down_i8 else c @ down_t
        return y, r

    def forward(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Logits [T, V] and router scores [L, T, E] for a prompt evaluated from position 0 (causal)."""
        m, W = self.meta, self.weights
        eps = m["attention.layer_norm_rms_epsilon"]
        attention = self.mla if m.get("attention.type", "gqa") == "mla" else self.gqa
        x = W["token_embd.weight"][tokens] * m["embedding_scale"]
        routers = []
        for l in range(m["block_count"]):
            p = f"blk.{l}."
            x = x + m["residual_scale"] * attention(rmsnorm(x, W[p + "attn_norm.weight"], eps), p)
            y, r = self.ffn(rmsnorm(x, W[p + "ffn_norm.weight"], eps), p)
            x = x + m["residual_scale"] * y
            routers.append(r)
        head = "output.weight" if "output.weight" in W else "token_embd.weight"
        xn = rmsnorm(x, W["output_norm.weight"], eps) * m["logit_scale"]
        return self.q8(xn, head) @ W[head].T, np.stack(routers)


def tls(router: np.ndarray) -> float:
    """Token-level sparsity: the fraction of (token, expert) pairs with score exactly 0. router [..., T, E]."""
    return float(np.mean(router == 0))


def cls(router: np.ndarray, k: int) -> float:
    """Chunk-level sparsity CLS-k: split the T tokens into consecutive non-overlapping chunks of k (a trailing
    partial chunk is left out) and take the fraction of (chunk, expert) pairs where the expert is inactive for every
    token of the chunk. router [..., T, E] (leading axes, e.g. layers, are averaged over). NaN if T < k."""
    T, E = router.shape[-2:]
    n = T // k
    if n == 0:
        return float("nan")
    active = router[..., : n * k, :].reshape(*router.shape[:-2], n, k, E) != 0      # [..., chunks, k, E]
    return float(np.mean(~active.any(axis=-2)))
