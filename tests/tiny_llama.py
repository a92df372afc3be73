"""Tiny random-weight llama GGUF files for tests: every tensor type, GQA or MHA, tied or separate head.

The vocabulary is a small SentencePiece-style ("llama") one: <unk>, <s>, </s>, the 256 byte tokens and a few pieces,
enough for the tokenizer and for llama.cpp to load the file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

PIECES = ["▁the", "▁a", "▁of", "▁and", "▁to", "in", "er", "on", "▁is", "at", "en", "▁s", "▁t", "es", "or", "an"]


@dataclass
class TinyConfig:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 96
    tied: bool = True
    wtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
    rope_base: float = 10000.0
    eps: float = 1e-5
    seed: int = 0


def vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(PIECES))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    return tokens, scores, types


def write_tiny_llama(path: Path, cfg: TinyConfig, *, overrides: dict | None = None,
                     drop: tuple[str, ...] = (), extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write a random llama model. `overrides` replaces metadata values (to make files that lie), `drop` leaves out
    tensors, `extra_tensors` adds tensors."""
    rng = np.random.default_rng(cfg.seed)
    tokens, scores, types = vocab()
    n_vocab = len(tokens)
    head_dim = cfg.n_embd // cfg.n_head
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {
        "llama.context_length": 256, "llama.embedding_length": cfg.n_embd, "llama.block_count": cfg.n_layer,
        "llama.feed_forward_length": cfg.n_ff, "llama.attention.head_count": cfg.n_head,
        "llama.attention.head_count_kv": cfg.n_head_kv, "llama.rope.dimension_count": head_dim,
        "llama.attention.layer_norm_rms_epsilon": cfg.eps, "llama.rope.freq_base": cfg.rope_base,
        "llama.vocab_size": n_vocab,
    }
    meta.update(overrides or {})
    for key, value in meta.items():
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def add(name: str, data: np.ndarray, qtype=None) -> None:
        if name in drop:
            return
        qtype = cfg.wtype if qtype is None else qtype
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    H, F = cfg.n_embd, cfg.n_ff
    add("token_embd.weight", mat(n_vocab, H, 1.0))
    add("output_norm.weight", 1 + 0.1 * rng.standard_normal(H).astype(np.float32))
    if not cfg.tied:
        add("output.weight", mat(n_vocab, H, H ** -0.5))
    for l in range(cfg.n_layer):
        p = f"blk.{l}."
        add(p + "attn_norm.weight", 1 + 0.1 * rng.standard_normal(H).astype(np.float32))
        add(p + "attn_q.weight", mat(cfg.n_head * head_dim, H, H ** -0.5))
        add(p + "attn_k.weight", mat(cfg.n_head_kv * head_dim, H, H ** -0.5))
        add(p + "attn_v.weight", mat(cfg.n_head_kv * head_dim, H, H ** -0.5))
        add(p + "attn_output.weight", mat(H, cfg.n_head * head_dim, H ** -0.5))
        add(p + "ffn_norm.weight", 1 + 0.1 * rng.standard_normal(H).astype(np.float32))
        add(p + "ffn_gate.weight", mat(F, H, H ** -0.5))
        add(p + "ffn_up.weight", mat(F, H, H ** -0.5))
        add(p + "ffn_down.weight", mat(H, F, F ** -0.5))
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
