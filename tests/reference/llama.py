"""A numpy reference of the llama architecture as GGUF stores it: the oracle for the native forward pass.

Shape legend: T = tokens, H = hidden, NH/NKV = heads/kv heads, D = head dim, F = ffn width, V = vocabulary.
Weights are dequantized with the `gguf` package and all arithmetic is float64, so this is the exact function the
quantized file describes; the native runtime differs from it only by its 8-bit activation quantization.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


@dataclass
class LlamaRef:
    weights: dict[str, np.ndarray]  # name -> float64 array, shape [rows, cols] as the math uses it (W @ x)
    n_layer: int
    n_head: int
    n_head_kv: int
    n_rot: int
    eps: float
    rope_base: float

    @classmethod
    def from_gguf(cls, path: str) -> LlamaRef:
        r = GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
        w = {}
        for t in r.tensors:
            shape = [int(d) for d in reversed(t.shape)]  # GGUF ne[0] is the contiguous axis
            w[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
        n_head = f["llama.attention.head_count"]
        return cls(w, f["llama.block_count"], n_head, f.get("llama.attention.head_count_kv", n_head),
                   f.get("llama.rope.dimension_count", f["llama.embedding_length"] // n_head),
                   f["llama.attention.layer_norm_rms_epsilon"], f.get("llama.rope.freq_base", 10000.0))

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
            q = (xn @ W[p + "attn_q.weight"].T).reshape(T, self.n_head, -1)  # [T, NH, D]
            k = (xn @ W[p + "attn_k.weight"].T).reshape(T, self.n_head_kv, -1)
            v = (xn @ W[p + "attn_v.weight"].T).reshape(T, self.n_head_kv, -1)
            q, k = self.rope(q, pos), self.rope(k, pos)
            group = self.n_head // self.n_head_kv
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [T, NH, D]
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1]) + mask
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            att = np.einsum("hts,shd->thd", a, v).reshape(T, -1)
            x = x + att @ W[p + "attn_output.weight"].T
            xn = self.rmsnorm(x, W[p + "ffn_norm.weight"])
            g, u = xn @ W[p + "ffn_gate.weight"].T, xn @ W[p + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
        head = W.get("output.weight", W["token_embd.weight"])
        return self.rmsnorm(x, W["output_norm.weight"]) @ head.T
