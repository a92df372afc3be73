"""A numpy reference of the llama architecture as GGUF stores it: the oracle for the native forward pass.

Shape legend: T = tokens, H = hidden, NH/NKV = heads/kv heads, D = head dim, F = ffn width, V = vocabulary.
Weights are dequantized with the `gguf` package and all arithmetic is float64, so this is the exact function the
quantized file describes; the native runtime differs from it by its 8-bit activation quantization and its F16 KV
cache. With runtime_rounding=True the reference rounds as the runtime does: the activations entering a quantized
matmul to 8-bit blocks (q8a below), and q, k, v after RoPE to F16 (the cache, and q for the scores). What is left is
float32 arithmetic: NMSE <= 5e-15 on the tiny quantized test models, where the quantization itself gives ~1e-4.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

# Weight types whose matmul takes 8-bit activation blocks in the runtime (native/src/kernels/types.c: act_q8).
ACT_Q8_TYPES = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0}


def q8a(x: np.ndarray, sums: bool = False):
    """x [..., K] (K a multiple of 32) as the runtime's activation blocks hold it (sp_quantize_q8a_ref): per block of
    32, d = amax / 127 and q = round(x / d) computed in float32, then x ~ q * d with d rounded to F16. With sums, also
    what the block's stored sum s = f16(d * sum(q)) (which Q4_1 weights multiply by their block minimum) differs from
    the sum of the rounded values, [..., K/32]."""
    x32 = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(x32).max(-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(x32 * inv)
    d16 = d.astype(np.float16).astype(np.float64)
    xq = (q * d16).reshape(x.shape)
    if not sums:
        return xq
    qsum = q.sum(-1, keepdims=True, dtype=np.float32)
    s = (d * qsum).astype(np.float16).astype(np.float64)
    return xq, (s - d16 * qsum)[..., 0]


def q4_1_mins(t) -> np.ndarray:
    """The per-block minimums m [N, K/32] of a Q4_1 tensor read by GGUFReader (blocks: f16 d, f16 m, 16 bytes)."""
    raw = np.asarray(t.data, dtype=np.uint8).reshape(-1, 20)
    return raw[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(int(t.shape[-1]), -1)


@dataclass
class LlamaRef:
    weights: dict[str, np.ndarray]  # name -> float64 array, shape [rows, cols] as the math uses it (W @ x)
    n_layer: int
    n_head: int
    n_head_kv: int
    n_rot: int
    eps: float
    rope_base: float
    q8_inputs: set[str]             # weights whose matmul input q8a rounds when runtime_rounding
    runtime_rounding: bool = False
    mins: dict[str, np.ndarray] = field(default_factory=dict)  # Q4_1 weights' block minimums [N, K/32]

    @classmethod
    def from_gguf(cls, path: str, runtime_rounding: bool = False) -> LlamaRef:
        r = GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
        w = {}
        for t in r.tensors:
            shape = [int(d) for d in reversed(t.shape)]  # GGUF ne[0] is the contiguous axis
            w[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
        n_head = f["llama.attention.head_count"]
        return cls(w, f["llama.block_count"], n_head, f.get("llama.attention.head_count_kv", n_head),
                   f.get("llama.rope.dimension_count", f["llama.embedding_length"] // n_head),
                   f["llama.attention.layer_norm_rms_epsilon"], f.get("llama.rope.freq_base", 10000.0),
                   {t.name for t in r.tensors if t.tensor_type in ACT_Q8_TYPES}, runtime_rounding,
                   {t.name: q4_1_mins(t) for t in r.tensors if t.tensor_type == GGMLQuantizationType.Q4_1})

    def mm(self, x: np.ndarray, name: str) -> np.ndarray:  # x [T, K] @ W[name].T
        if not (self.runtime_rounding and name in self.q8_inputs):
            return x @ self.weights[name].T
        if name not in self.mins:
            return q8a(x) @ self.weights[name].T
        xq, ds = q8a(x, sums=True)  # Q4_1: sum_b (d_b q_b . x'_b + m_b * s_b), with the block sum s as stored
        return xq @ self.weights[name].T + ds @ self.mins[name].T

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:  # x [T, H]
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:  # x [T, heads, D]; adjacent pairs rotate
        i = np.arange(0, self.n_rot, 2)
        theta = pos[:, None] * self.rope_base ** (-i / self.n_rot)  # [T, n_rot/2]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = x.copy()
        x0, x1 = x[..., 0:self.n_rot:2], x[..., 1:self.n_rot:2]
        out[..., 0:self.n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:self.n_rot:2] = x0 * sin + x1 * cos
        return out

    def forward(self, tokens: list[int]) -> np.ndarray:
        """Logits [T, V] for a prompt evaluated from position 0 with a causal mask."""
        W, T = self.weights, len(tokens)
        pos = np.arange(T, dtype=np.float64)
        x = W["token_embd.weight"][tokens]                                   # [T, H]
        mask = np.triu(np.full((T, T), -np.inf), k=1)                        # [T, T]
        for l in range(self.n_layer):
            p = f"blk.{l}."
            xn = self.rmsnorm(x, W[p + "attn_norm.weight"])
            q = self.mm(xn, p + "attn_q.weight").reshape(T, self.n_head, -1)  # [T, NH, D]
            k = self.mm(xn, p + "attn_k.weight").reshape(T, self.n_head_kv, -1)
            v = self.mm(xn, p + "attn_v.weight").reshape(T, self.n_head_kv, -1)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if self.runtime_rounding:
                q, k, v = (a.astype(np.float16).astype(np.float64) for a in (q, k, v))
            group = self.n_head // self.n_head_kv
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [T, NH, D]
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1]) + mask
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            att = np.einsum("hts,shd->thd", a, v).reshape(T, -1)
            x = x + self.mm(att, p + "attn_output.weight")
            xn = self.rmsnorm(x, W[p + "ffn_norm.weight"])
            g, u = self.mm(xn, p + "ffn_gate.weight"), self.mm(xn, p + "ffn_up.weight")
            x = x + self.mm(g / (1 + np.exp(-g)) * u, p + "ffn_down.weight")
        head = "output.weight" if "output.weight" in W else "token_embd.weight"
        return self.mm(self.rmsnorm(x, W["output_norm.weight"]), head)


def hf_llama_forward(config: dict, w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits [T, V] of a Hugging Face llama checkpoint as transformers' LlamaForCausalLM defines it, on its own
    unconverted weights (float64): RoPE in the rotate_half convention, dimension i paired with i + D/2."""
    H, NH = config["hidden_size"], config["num_attention_heads"]
    NKV, D, T = config.get("num_key_value_heads", NH), H // NH, len(tokens)
    eps, base = config.get("rms_norm_eps", 1e-6), config.get("rope_theta", 10000.0)
    theta = np.arange(T, dtype=np.float64)[:, None] * base ** (-np.arange(0, D, 2) / D)
    cos = np.concatenate([np.cos(theta)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(theta)] * 2, -1)[:, None, :]

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    def rope(x):  # [T, heads, D]
        return x * cos + np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    x = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for l in range(config["num_hidden_layers"]):
        p = f"model.layers.{l}."
        xn = norm(x, w[p + "input_layernorm.weight"])
        q = rope((xn @ w[p + "self_attn.q_proj.weight"].T).reshape(T, NH, D))
        k = np.repeat(rope((xn @ w[p + "self_attn.k_proj.weight"].T).reshape(T, NKV, D)), NH // NKV, axis=1)
        v = np.repeat((xn @ w[p + "self_attn.v_proj.weight"].T).reshape(T, NKV, D), NH // NKV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, H) @ w[p + "self_attn.o_proj.weight"].T
        xn = norm(x, w[p + "post_attention_layernorm.weight"])
        g = xn @ w[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (xn @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ head.T
