"""A draft token tree and the target's processed distribution: the pieces drafters, the planner and the speculative
loop (runtime.speculative) share. Shape legend: N = draft nodes, V = vocabulary size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .native import Sampler, SamplerParams

# ---- the target's processed distribution: the C sampler's (native/src/sampler.c, oracle tests/reference/sampler.py) ----

def penalized(logits: np.ndarray, params: SamplerParams, history: Sequence[int], out: np.ndarray) -> np.ndarray:
    """logits [V] with the repetition penalty of the last repeat_last_n history tokens applied (float32, as in C),
    written to out [V] (float32): how a drafter ranks its candidates. Returns out, or logits itself when the penalty
    is off."""
    if params.repeat_penalty == 1.0 or params.repeat_last_n <= 0 or not history:
        return logits
    np.copyto(out, logits)
    recent = np.unique(np.asarray(history[-params.repeat_last_n:], dtype=np.int64))
    recent = recent[(recent >= 0) & (recent < out.shape[0])]
    pen = np.float32(params.repeat_penalty)
    vals = out[recent]
    out[recent] = np.where(vals > 0, vals / pen, vals * pen)
    return out


class TargetSampler:
    """The distribution the C sampler draws from at a node (repetition penalty -> top-k -> temperature -> top-p ->
    min-p), with the node's own repetition history: the C sampler itself (sp_sampler_candidates), its history set to
    the node's before each use, so the speculative paths decide exactly as plain decoding does."""

    def __init__(self, n_vocab: int, params: SamplerParams):
        self.sampler = Sampler(n_vocab, params)  # validates params exactly as plain decoding does
        self.n_last = params.repeat_last_n if params.repeat_penalty != 1.0 else 0

    def candidates(self, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [K], probabilities float32 [K]) of the K tokens of non-zero probability."""
        if self.n_last > 0:
            self.sampler.reset()
            for t in history[-self.n_last:]:
                self.sampler.accept(t)
        return self.sampler.candidates(logits)

    def greedy(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """The token greedy decoding picks (params with temperature <= 0): the penalised argmax, ties to the lowest
        id."""
        ids, _ = self.candidates(logits, history)
        return int(ids[0])

    def probs(self, logits: np.ndarray, history: Sequence[int], out: np.ndarray) -> np.ndarray:
        """The distribution, dense, into out [V] (float64)."""
        ids, p = self.candidates(logits, history)
        out.fill(0.0)
        out[ids] = p
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
