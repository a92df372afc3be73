"""Numpy reference of the token sampler in native/src/sampler.c: the distribution a draw comes from.

Shape legend: V = vocabulary size, K = candidates still in play.

Pipeline, in the same order as the C code: repetition penalty -> (greedy: argmax, stop) -> top-k -> temperature
softmax -> top-p -> min-p (relative to the largest probability) -> renormalise. Ties in the ordering go to the lower id.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sampler_probs(
    logits: np.ndarray,
    *,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.05,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    history: Sequence[int] = (),
) -> np.ndarray:
    """The final probability of each token, float64 [V], summing to 1 (greedy: one-hot)."""
    V = logits.shape[0]
    # 1. Repetition penalty (llama.cpp): each distinct token among the last repeat_last_n accepted, in float32 like C.
    x = np.array(logits, dtype=np.float32)
    if repeat_penalty != 1.0 and repeat_last_n > 0 and len(history):
        recent = np.unique(np.asarray(history, dtype=np.int64)[-repeat_last_n:])
        pen = np.float32(repeat_penalty)
        x[recent] = np.where(x[recent] > 0, x[recent] / pen, x[recent] * pen)
    # 2. Greedy: argmax, ties -> lowest id (np.argmax takes the first).
    if temperature <= 0:
        out = np.zeros(V)
        out[int(np.argmax(x))] = 1.0
        return out
    # 3. Top-k: sort by logit (largest first, ties -> lower id) and keep k.
    order = np.lexsort((np.arange(V), -x.astype(np.float64)))  # [V]
    if 0 < top_k < V:
        order = order[:top_k]  # [K]
    # 4. Temperature-scaled softmax over the K candidates.
    lk = x[order].astype(np.float64)
    p = np.exp((lk - lk[0]) / temperature)
    p /= p.sum()
    keep = len(p)
    # 5. Top-p: the shortest prefix whose mass reaches top_p.
    if top_p < 1.0:
        hit = np.nonzero(np.cumsum(p) >= top_p)[0]
        if hit.size:
            keep = min(keep, int(hit[0]) + 1)
    # 6. Min-p: p >= min_p * p_max, a prefix of the sorted order.
    if min_p > 0.0:
        keep = min(keep, int(np.sum(p >= min_p * p[0])))
    # 7. Renormalise.
    out = np.zeros(V)
    out[order[:keep]] = p[:keep] / p[:keep].sum()
    return out
