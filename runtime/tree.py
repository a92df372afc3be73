"""A draft token tree and the target's processed distribution: the pieces drafters, the planner and the speculative
loop (runtime.speculative) share. Shape legend: N = draft nodes, V = vocabulary size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .native import SamplerParams

# ---- the target's processed distribution (mirror of native/src/sampler.c, see tests/reference/sampler.py) ----

def penalized(logits: np.ndarray, params: SamplerParams, history: Sequence[int], out: np.ndarray) -> np.ndarray:
    """logits [V] with the repetition penalty of the last repeat_last_n history tokens applied (float32, as in C),
    written to out [V] (float32). Returns out, or logits itself when the penalty is off."""
    if params.repeat_penalty == 1.0 or params.repeat_last_n <= 0 or not history:
        return logits
    np.copyto(out, logits)
    recent = np.unique(np.asarray(history[-params.repeat_last_n:], dtype=np.int64))
    recent = recent[(recent >= 0) & (recent < out.shape[0])]
    pen = np.float32(params.repeat_penalty)
    vals = out[recent]
    out[recent] = np.where(vals > 0, vals / pen, vals * pen)
    return out


def greedy_token(logits: np.ndarray, params: SamplerParams, history: Sequence[int], scratch: np.ndarray) -> int:
    """The token the C sampler's greedy mode picks: argmax of the penalised logits, ties to the lowest id."""
    return int(np.argmax(penalized(logits, params, history, scratch)))


def target_probs(logits: np.ndarray, params: SamplerParams, history: Sequence[int], scratch: np.ndarray,
                 out: np.ndarray) -> np.ndarray:
    """The distribution the C sampler draws from for these logits, into out [V] float64: repetition penalty ->
    top-k -> temperature softmax -> top-p -> min-p -> renormalise; ties in the order go to the lower id."""
    x = penalized(logits, params, history, scratch)
    V = x.shape[0]
    out.fill(0.0)
    if params.temperature <= 0:
        out[int(np.argmax(x))] = 1.0
        return out
    k = params.top_k
    if 0 < k < V:
        part = np.argpartition(-x, k - 1)[:k]
        thr = x[part].min()
        above = np.nonzero(x > thr)[0]
        ties = np.nonzero(x == thr)[0][: k - above.size]  # ties at the boundary: the lowest ids, as in C
        cand = np.concatenate([above, ties])
    else:
        cand = np.arange(V)
    order = cand[np.lexsort((cand, -x[cand].astype(np.float64)))]  # [K] largest first, ties -> lower id
    lk = x[order].astype(np.float64)
    p = np.exp((lk - lk[0]) / params.temperature)
    p /= p.sum()
    keep = p.size
    if params.top_p < 1.0:
        hit = np.nonzero(np.cumsum(p) >= params.top_p)[0]
        if hit.size:
            keep = min(keep, int(hit[0]) + 1)
    if params.min_p > 0.0:
        keep = min(keep, int(np.sum(p >= params.min_p * p[0])))
    out[order[:keep]] = p[:keep] / p[:keep].sum()
    return out


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from the distribution p [V] (need not be normalised)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), p.shape[0] - 1))


# ---- drafts and statistics ----

@dataclass
class Draft:
    """A token tree below the root. Node i (1-based batch index) holds tokens[i-1]; its parent is parents[i-1]
    (0 = the root), always < i. q: for drafts sampled from a distribution, q[i-1] is the [V] distribution node i's
    token was drawn from (chains only); None for deterministic drafts (q is then a point mass)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: np.ndarray | None = None

    @classmethod
    def chain(cls, tokens: Sequence[int], q: np.ndarray | None = None) -> Draft:
        return cls(list(tokens), list(range(len(tokens))), q)

    def __len__(self) -> int:
        return len(self.tokens)
