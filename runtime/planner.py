"""Sparsity-aware draft tree planning: each step, keep the part of the drafter's candidate tree that maximises the
expected tokens per second of the verification step.

Shape legend: N = candidate nodes proposed, n = nodes kept, T = n + 1 tokens verified, B = expert weight bytes the
verification reads (the union of the experts its tokens use, each read once).

Two online models, both learned from the steps this planner has seen:

    acceptance   node i sits at key(i) = the sibling ranks on its path from the root ((0,), (1,), (0, 0), ...).
                 q(key) = P(node accepted | its parent accepted), estimated as (hits + a q0) / (trials + a) with the
                 prior q0 = 0.5 / (rank + 1); p(i) = p(parent) q(key(i)), so p never grows down a path.
    cost         step time t(T) = c0 + c1 T + c2 B(T): c1 is what one more token costs in attention, LM head and
                 the dense parts, c2 what one more byte of experts costs, and B(T) the bytes of the experts a tree of
                 T tokens reads (mean measured per T, interpolated). For a BlockFFN target the union of active experts
                 grows sublinearly with T (chunk-level sparsity), so a branch costs the bytes of the experts it adds
                 to the union, not of all the experts its token uses; for a dense model B = 0 and the fit is c0 + c1 T.
                 Fitted by non-negative least squares over the last `window` steps.

The plan: nodes in order of p (ties: the earlier node), so every prefix of that order is a subtree; keep the prefix
of n nodes maximising (1 + sum of its p) / t(n + 1), the expected tokens per second of the step. Until the cost fit
has several tree sizes to go on, it verifies small sizes from a fixed schedule (1, 0, 2, 4 nodes: a short chat must
not pay for the widest trees while the planner learns); after that, every `explore_every`-th step verifies a size near the chosen one (twice it, half of
it, 1.5 times it, in turn), so the cost model keeps seeing the neighbourhood it decides in without paying for the
largest trees. What is verified never changes the output: greedy decoding stays exactly plain greedy decoding.

    planner = TreePlanner()
    speculative_tokens(session, prompt, Recycling(V, branching=(4, 2, 2, 1), max_nodes=24), planner=planner)
    print(planner.summary())

Above the planner, a DraftGate (the adaptive drafter's, runtime.drafters.Adaptive) decides whether to draft at all: a
step it does not draft is a plain decoding step (one token evaluated, no draft, no tree, no planner), so drafting
nothing costs what plain decoding costs. It drafts where drafting has measured faster than plain decoding on this
device, under the actual sampling settings, and probes again now and then (see DraftGate).
"""
from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .tree import Draft

Key = tuple[int, ...]


@dataclass
class Plan:
    """The kept draft and, for each kept node, its key (for TreePlanner.observe)."""

    draft: Draft
    keys: list[Key]
    explored: bool       # this step verified a schedule size, not the planned one
    n_candidates: int


def node_keys(parents: list[int]) -> list[Key]:
    """key of each node (1-based batch index i -> keys[i-1]): the sibling ranks along its path from the root."""
    keys: list[Key] = []
    n_children = collections.Counter()
    for par in parents:
        rank = n_children[par]
        n_children[par] += 1
        keys.append((keys[par - 1] if par else ()) + (rank,))
    return keys


def nnls_small(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns: the best unconstrained fit over every subset of columns
    whose coefficients come out non-negative (2^k subsets; k <= 3 here)."""
    k = X.shape[1]
    best, best_err = np.zeros(k), float(np.sum(y * y))
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            c, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if np.all(c >= 0):
                err = float(np.sum((X[:, cols] @ c - y) ** 2))
                if err < best_err:
                    best_err, best = err, np.zeros(k)
                    best[list(cols)] = c
    return best


class TreePlanner:
    """Chooses, per step, how much of a drafter's candidate tree to verify (see the module docstring)."""

    def __init__(self, *, window: int = 256, explore_every: int = 16, prior_weight: float = 2.0,
                 min_sizes: int = 3):
        if window < 8 or explore_every < 2 or prior_weight <= 0 or min_sizes < 2:
            raise ValueError("TreePlanner: window >= 8, explore_every >= 2, prior_weight > 0, min_sizes >= 2")
        self.window, self.explore_every, self.prior_weight, self.min_sizes = (window, explore_every, prior_weight,
                                                                              min_sizes)
        self.trials: dict[Key, int] = collections.defaultdict(int)  # node verified while its parent was accepted
        self.hits: dict[Key, int] = collections.defaultdict(int)    # node accepted
        self.obs: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=window)  # (T, B, seconds)
        self.coef = np.zeros(3)   # c0 [s], c1 [s/token], c2 [s/byte]
        self.steps = 0
        self.kept = 0
        self.candidates = 0
        self._schedule = itertools.cycle((1, 0, 2, 4))                 # node counts while warming up
        self._around = itertools.cycle((2.0, 0.5, 1.5))                 # multiples of (chosen size + 1), later
        self.last_choice = 0
        self._union = (np.zeros(0), np.zeros(0))  # sizes seen, mean expert bytes at each (updated by fit)

    # ---- the acceptance model ----

    def q(self, key: Key) -> float:
        q0 = 0.5 / (key[-1] + 1)
        return (self.hits[key] + self.prior_weight * q0) / (self.trials[key] + self.prior_weight)

    def node_p(self, parents: list[int], keys: list[Key]) -> np.ndarray:
        p = np.empty(len(parents))
        for i, (par, key) in enumerate(zip(parents, keys)):
            p[i] = (p[par - 1] if par else 1.0) * self.q(key)
        return p

    # ---- the cost model ----

    def sizes_seen(self) -> set[int]:
        return {T for T, _, _ in self.obs}

    def union_bytes(self, T: np.ndarray) -> np.ndarray:
        """Expected expert bytes of a verification of T tokens: the measured mean per size (as of the last fit),
        linearly interpolated; beyond the largest size seen, extended along the last measured slope (the union's
        growth only slows with T, so this errs on the side of cost)."""
        xs, ys = self._union
        if xs.size == 0:
            return np.zeros_like(T, dtype=float)
        out = np.interp(T, xs, ys)
        if xs.size >= 2:
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            out = np.where(T > xs[-1], ys[-1] + slope * (T - xs[-1]), out)
        return out

    def fit(self) -> None:
        """Refit the cost model (and the union curve) to the observations in the window."""
        if len(self.sizes_seen()) < 2:
            return
        obs = np.array(self.obs)  # [S, 3]
        xs, inv = np.unique(obs[:, 0], return_inverse=True)
        self._union = (xs, np.bincount(inv, weights=obs[:, 1]) / np.bincount(inv))
        X = np.column_stack([np.ones(len(obs)), obs[:, 0], obs[:, 1]])
        if not np.any(obs[:, 1] > 0):
            X = X[:, :2]
        # Scale columns to comparable magnitudes before solving (bytes are ~1e6 times seconds per token).
        scale = np.maximum(np.abs(X).max(axis=0), 1e-30)
        c = nnls_small(X / scale, obs[:, 2]) / scale
        self.coef = np.concatenate([c, np.zeros(3 - len(c))])

    def step_time(self, T: np.ndarray) -> np.ndarray:
        return self.coef[0] + self.coef[1] * T + self.coef[2] * self.union_bytes(T)

    @property
    def ready(self) -> bool:
        return self._union[0].size >= self.min_sizes and self.coef[0] + self.coef[1] > 0

    # ---- planning ----

    def plan(self, draft: Draft) -> Plan:
        """The part of `draft` to verify this step."""
        N = len(draft)
        keys = node_keys(draft.parents)
        if N == 0:
            return Plan(draft, keys, False, 0)
        p = self.node_p(draft.parents, keys)
        order = np.lexsort((np.arange(N), -p))  # by p descending, then index: every prefix is a subtree
        warm = not self.ready
        explore = warm or self.steps % self.explore_every == self.explore_every - 1
        if warm:
            n = min(N, next(self._schedule))
        elif explore:
            n = min(N, round(next(self._around) * (self.last_choice + 1)) - 1)
        else:
            n_all = np.arange(N + 1)
            gain = 1.0 + np.concatenate([[0.0], np.cumsum(p[order])])
            n = self.last_choice = int(np.argmax(gain / self.step_time(n_all + 1.0)))
        keep = np.sort(order[:n])
        return Plan(subtree(draft, keep), [keys[i] for i in keep], explore, N)

    def observe(self, plan: Plan, path: list[int], n_tokens: int, expert_bytes: float, seconds: float) -> None:
        """What the verification of plan.draft did: path = accepted batch indices (0 = root first), the tokens
        verified, the expert bytes read and the step's wall time (draft + verify + choose + compact)."""
        accepted = set(path)
        for i, (par, key) in enumerate(zip(plan.draft.parents, plan.keys), start=1):
            if par in accepted:
                self.trials[key] += 1
                self.hits[key] += i in accepted
        self.obs.append((n_tokens, float(expert_bytes), float(seconds)))
        self.steps += 1
        self.kept += len(plan.draft)
        self.candidates += plan.n_candidates
        if not self.ready or self.steps % 8 == 0:
            self.fit()

    def summary(self) -> str:
        return planner_summary(self.steps, self.kept, self.candidates, tuple(self.coef))

    def as_dict(self) -> dict[str, object]:
        return planner_dict(self.steps, self.kept, self.candidates, tuple(self.coef))


# What a planner has learned, in words and as a record: TreePlanner's, and the C generator's (sp_generator_stats).

def planner_summary(steps: int, kept: int, candidates: int, coef: tuple[float, float, float]) -> str:
    c0, c1, c2 = coef
    s = (f"planner: {steps} steps, kept {kept / max(steps, 1):.1f} of {candidates / max(steps, 1):.1f} candidate "
         f"nodes per step; step time = {1e3 * c0:.2f} ms + {1e3 * c1:.3f} ms/token")
    if c2 > 0:
        s += f" + {1e3 * c2 * 1e6:.3f} ms/MB of experts"
    return s


def planner_dict(steps: int, kept: int, candidates: int, coef: tuple[float, float, float]) -> dict[str, object]:
    return {"steps": steps, "kept_per_step": kept / max(steps, 1), "candidates_per_step": candidates / max(steps, 1),
            "cost_s": {"per_step": coef[0], "per_token": coef[1], "per_expert_byte": coef[2]}}


def subtree(draft: Draft, keep: np.ndarray) -> Draft:
    """The nodes `keep` (sorted batch-order indices, 0-based, closed under parents) of draft, renumbered."""
    new_index = {0: 0}
    tokens, parents = [], []
    for j, i in enumerate(keep.tolist(), start=1):
        par = draft.parents[i]
        if par not in new_index:
            raise ValueError("subtree: the kept nodes must include every kept node's parent")
        new_index[i + 1] = j
        tokens.append(draft.tokens[i])
        parents.append(new_index[par])
    q = None if draft.q is None else draft.q[keep]
    return Draft(tokens, parents, q)


class DraftGate:
    """Whether a speculative step drafts at all, decided per step from what drafting has measured on this device, so
    that speculation never makes decoding slower. A step the gate does not draft runs plain (runtime.speculative:
    one token evaluated, sampled by the C sampler exactly as plain decoding samples).

    Arms. Each step falls into an arm by the cheapest signal there is, how long a suffix of the text occurred earlier
    in it (tracked in O(1) per token: a dict of bigrams and the current match, as prompt lookup would find it):
    arm 0 below `arms[0]` tokens (no match), arm 1 up to `arms[1]` - 1, arm 2 from `arms[1]` on (the text is repeating
    itself: prompt lookup's chain is likely accepted). Each arm keeps its own verdict.

    Verdict. A drafting step that emitted k tokens in t seconds cost c = max(1, t / t_plain) plain steps' time
    (t_plain: the median of the last plain steps; a drafting step evaluates at least the token a plain step does, so
    c < 1 is noise). Each arm keeps exponentially weighted means of k and c over its drafting steps, and drafts while
    mean k > `margin` x mean c; so an arm whose drafts are never accepted (k = 1) never drafts beyond its probes,
    whatever the clock says. The means move slowly while the arm drafts (`alpha`: a step's k is noisy, most steps
    accept nothing even where drafting pays, and a fast mean would stop at the first few) and fast on probes
    (`alpha_probe`: a probe is rare, and its news is what turns drafting back on).

    Probes. An arm that does not draft runs plain and, after `wait` of its plain steps, drafts one step (a probe).
    An episode of drafting (from a probe until the arm stops) that ran faster than plain overall resets the wait to
    `probe_every`; one that did not doubles it, up to `max_probe_every`. So text that starts repeating itself turns
    drafting back on within a few tokens (arm 2 is rarely visited, so rarely backed off), and text where drafting
    does not pay costs one drafting step per up to `max_probe_every` plain steps. Until `min_plain` plain steps have
    been timed nothing is drafted. The gate learns across generations, like the planner. (The settings: driven by the
    accepted-length distributions and step costs the hybrid drafter measured on SmolLM2 (tests/test_planner.py), the
    gate keeps most of the hybrid's gain where drafting pays a little (chat text, greedy: 1.15x where drafting every
    step gives 1.21x) and all of it where it pays a lot, and runs within 1% of plain decoding where drafting loses; a
    mean as fast on drafting steps as on probes kept a tenth of the first gain.)
    """

    def __init__(self, *, probe_every: int = 16, max_probe_every: int = 256, margin: float = 1.03,
                 alpha: float = 0.05, alpha_probe: float = 0.3, arms: tuple[int, int] = (2, 4), min_plain: int = 2,
                 window: int = 32):
        if not (1 <= probe_every <= max_probe_every and margin >= 1.0 and 0 < alpha <= 1 and 0 < alpha_probe <= 1
                and 2 <= arms[0] < arms[1] and min_plain >= 1 and window >= min_plain):
            raise ValueError("DraftGate: 1 <= probe_every <= max_probe_every, margin >= 1, 0 < alpha, alpha_probe <= 1, "
                             "2 <= arms[0] < arms[1], 1 <= min_plain <= window")
        self.probe_every, self.max_probe_every, self.margin = probe_every, max_probe_every, margin
        self.alpha, self.alpha_probe, self.arms, self.min_plain = alpha, alpha_probe, arms, min_plain
        self.plain_times: collections.deque[float] = collections.deque(maxlen=window)  # seconds per plain step
        n = 3
        self.on = [False] * n                  # the arm is drafting (an episode is running)
        self.wait = [0] * n                    # the arm's plain steps left before its next probe
        self.interval = [probe_every] * n      # the wait after an episode that did not pay
        self.tok: list[float | None] = [None] * n  # weighted mean tokens per drafting step (None: none yet)
        self.cost = [0.0] * n                  # ... and cost per drafting step, in plain steps' time
        self.ep = [[0.0, 0.0, 0] for _ in range(n)]  # the episode's total tokens, total cost, steps
        self.probes = [0] * n                  # episodes started (probes)
        self.paid = [0] * n                    # ... that ran faster than plain
        self.arm = 0                           # the current step's arm (set by begin / push)
        self._unjudged = 0                     # drafting steps in a row not judged (the planner explored)
        self._index: dict[tuple[int, int], int] = {}  # bigram -> index of the token after its latest occurrence
        self._run = 0                          # length of the current suffix match (0: none)
        self._next = 0                         # index of the token that followed the matched earlier occurrence

    # ---- the signal: the current suffix match ----

    def begin(self, ctx: list[int]) -> None:
        """A new generation over ctx (every token so far)."""
        index = self._index = {}
        for i in range(2, len(ctx)):
            index[(ctx[i - 2], ctx[i - 1])] = i
        self._run, self.arm = 0, 0
        if len(ctx) >= 2:
            j = index.get((ctx[-2], ctx[-1]))
            if j is not None:
                self._run, self._next = 2, j
                self.arm = 1 if 2 < self.arms[1] else 2

    def push(self, ctx: list[int]) -> None:
        """ctx has grown by one token: index the bigram it completed, extend or find the suffix match, set the arm."""
        n = len(ctx)
        t = ctx[-1]
        if n >= 3:
            self._index[(ctx[-3], ctx[-2])] = n - 1
        if self._run and ctx[self._next] == t:
            self._run += 1
            self._next += 1
        else:
            j = self._index.get((ctx[-2], t)) if n >= 2 else None
            self._run = 0 if j is None else 2
            self._next = j or 0
        self.arm = 0 if self._run < self.arms[0] else 1 if self._run < self.arms[1] else 2

    # ---- the verdict ----

    def drafts(self) -> bool:
        """Whether this step (in arm self.arm) drafts."""
        a = self.arm
        return self.on[a] or (self.wait[a] <= 0 and len(self.plain_times) >= self.min_plain)

    def plain(self, seconds: float) -> None:
        """A plain step ran in the current arm, taking `seconds`."""
        self.wait[self.arm] -= 1
        self.plain_times.append(seconds)

    def observe(self, arm: int, tokens: int, seconds: float, *, explored: bool = False) -> None:
        """A drafting step in `arm` emitted `tokens` tokens in `seconds` (everything it did). explored: the planner
        verified a size of its exploration schedule, not its choice; such a step is not judged (a probe is then
        repeated at the arm's next step), up to 4 in a row."""
        if explored and self._unjudged < 4:
            self._unjudged += 1
            return
        self._unjudged = 0
        times = sorted(self.plain_times)
        c = max(1.0, seconds / times[len(times) // 2])
        ep = self.ep[arm]
        a = self.alpha if self.on[arm] else self.alpha_probe
        if not self.on[arm]:  # a probe: a new episode
            ep[:] = [0.0, 0.0, 0]
            self.probes[arm] += 1
        tok = self.tok[arm]
        if tok is None:
            self.tok[arm], self.cost[arm] = float(tokens), c
        else:
            self.tok[arm] = tok + a * (tokens - tok)
            self.cost[arm] += a * (c - self.cost[arm])
        ep[0] += tokens
        ep[1] += c
        ep[2] += 1
        self.on[arm] = self.tok[arm] > self.margin * self.cost[arm]
        if not self.on[arm]:  # the episode ends
            if ep[0] > self.margin * ep[1]:
                self.paid[arm] += 1
                self.interval[arm] = self.probe_every
            self.wait[arm] = self.interval[arm]
            if ep[0] <= self.margin * ep[1]:
                self.interval[arm] = min(2 * self.interval[arm], self.max_probe_every)

    def summary(self) -> str:
        return gate_summary(self.on, self.probes, self.paid)

    def as_dict(self) -> dict[str, object]:
        return {"drafting": list(self.on), "probes": list(self.probes), "paid": list(self.paid),
                "interval": list(self.interval)}


def gate_summary(on: Sequence[bool], probes: Sequence[int], paid: Sequence[int]) -> str:
    """A gate's verdict per arm in words: DraftGate's, and the C generator's (sp_generator_stats)."""
    names = ("no match", "short match", "repeating")
    return "gate: " + ", ".join(f"{name}: {'drafting' if on[a] else 'plain'}, {probes[a]} probes ({paid[a]} paid)"
                                for a, name in enumerate(names))
