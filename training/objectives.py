"""BlockFFN's chunk-sparsity objectives and the adaptive factor scheduler, after the official pre-training code
(github thunlp/BlockFFN, pretrain/cpm/dragonfly/activation_context.py: transfer_regularization, chunk_regularization;
pretrain/cpm/dragonfly/blockffn.py: BLockFeedForward.forward; pretrain/cpm/training_utils/value_scheduler.py:
AdaptiveLinearScheduler). Written from scratch to the same formulas.

Shape legend: B = batch, T = tokens, E = experts, L = chunk length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIGMOID_STEEP = 100.0


def transfer_loss(raw: torch.Tensor, valid: torch.Tensor, steep: float = SIGMOID_STEEP) -> torch.Tensor:
    """Activation locality. raw [B, T, E]: router projection before ReLU; valid [B, T-1] bool: pair (t, t+1) lies in
    one document. BCE with logits between the previous token's raw score x steep (input) and sigmoid(current token's
    raw score x steep) (target), mean over valid pairs and experts (F.binary_cross_entropy_with_logits, as official)."""
    left, right = raw[:, :-1][valid], raw[:, 1:][valid]                      # [P, E]
    return F.binary_cross_entropy_with_logits(left * steep, torch.sigmoid(right * steep))


def chunk_probs(raw: torch.Tensor, eps: float) -> torch.Tensor:
    """p [B, T, E]: the official `router_score_scaled` for norm_after_router "rms": the RMS-normalised ReLU score
    (before the learned router_norm weight) divided by its sum over experts (+1e-5), so p >= 0 and sum_e p <= 1."""
    r = F.relu(raw)
    res = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    return res / (res.sum(-1, keepdim=True) + 1e-5)


def chunk_loss(p: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunk sparsification. p [B, T, E] (T a multiple of chunk): for each chunk of `chunk` tokens, P(expert e active
    somewhere in it) = 1 - prod_t (1 - p[t, e]), computed as 1 - exp(sum_t log(1 - p + 1e-5)); mean over chunks and
    experts."""
    B, T, E = p.shape
    g = p.reshape(B, T // chunk, chunk, E)
    return 1.0 - torch.exp(torch.log(1.0 - g + 1e-5).sum(dim=2)).mean()


class LinearValue:
    """Linear from `start` to start * ratio over `span` steps, then constant (the official LinearScheduler)."""

    def __init__(self, start: float, span: int, ratio: float = 1.0):
        self.start, self.span, self.ratio, self.i = start, span, ratio, 0

    @property
    def value(self) -> float:
        progress = min(1.0, self.i / max(1, self.span))
        return self.start * (1.0 + (self.ratio - 1.0) * progress)

    def step(self) -> None:
        self.i += 1


class AdaptiveFactorScheduler:
    """The official AdaptiveLinearScheduler for the chunk-loss factor.

    Constant at `start` for `stable` steps. Then every `window` steps it compares the mean chunk loss of the last
    window (recent) with the window before (previous): ratio = recent / previous. If the chunk loss rose (ratio > 1,
    chunk sparsity falling), the factor ramps linearly over the next window to factor * max(min_factor, ratio); if
    it fell, to factor * ratio. The factor never exceeds start * max_factor (released runs: 1.025 and 4.0).
    Sparrow addition: `floor` (default 0, i.e. the released behaviour) keeps the factor from going below it."""

    def __init__(self, start: float, stable: int, window: int, min_factor: float = 1.025, max_factor: float = 4.0,
                 floor: float = 0.0):
        self.init, self.stable, self.window, self.floor = start, stable, window, floor
        self.min_factor, self.max_factor = min_factor, max_factor
        self.previous: list[float] = []
        self.recent: list[float] = []
        self.cur = LinearValue(start, stable)
        self.iteration = 0

    def step(self, loss: float) -> float:
        """Record this step's chunk loss; return the factor to use for it."""
        self.iteration += 1
        it = self.iteration
        self.recent.append(loss)
        prev_mean = sum(self.previous) / len(self.previous) if self.previous else -1.0
        recent_mean = sum(self.recent) / len(self.recent)
        if it % self.window == 0:
            self.previous, self.recent = self.recent, []
        value = self.cur.value
        if it >= self.stable and it % self.window == 0 and prev_mean > 0 and recent_mean > 0:
            ratio = recent_mean / prev_mean
            ratio = max(self.min_factor, ratio) if ratio > 1 else ratio
            ratio = min(self.init * self.max_factor / value, ratio)
            ratio = max(self.floor / value, ratio)        # Sparrow option (not in the released code): factor floor
            self.cur = LinearValue(value, self.window, ratio)
        self.cur.step()
        return value

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "previous": self.previous, "recent": self.recent,
                "cur": [self.cur.start, self.cur.span, self.cur.ratio, self.cur.i]}

    def load_state_dict(self, s: dict) -> None:
        self.iteration, self.previous, self.recent = s["iteration"], s["previous"], s["recent"]
        self.cur = LinearValue(*s["cur"][:3])
        self.cur.i = s["cur"][3]


@torch.no_grad()
def sparsity(rs: list[torch.Tensor], k: int = 8) -> tuple[float, float]:
    """TLS and CLS-k of normalised router scores rs [L][B, T, E] (T a multiple of k), as tests/reference/blockffn.py
    defines them: fraction of (token, expert) pairs with score 0; fraction of (chunk, expert) pairs off throughout."""
    r = torch.stack(rs)                                                      # [L, B, T, E]
    active = r != 0
    L, B, T, E = active.shape
    tls = 1.0 - active.float().mean().item()
    cls = 1.0 - active.reshape(L, B, T // k, k, E).any(dim=3).float().mean().item()
    return tls, cls
