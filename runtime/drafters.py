"""Drafters for speculative decoding (runtime.speculative): each proposes a token tree below the last token.

Shape legend: V = vocabulary size, K = candidates kept per token, N = draft nodes, T = N + 1 verified tokens.

    prompt-lookup   the continuation of the latest earlier occurrence of the context's last n tokens (a chain)
    recycling       Token Recycling: adjacency matrix [V, K] of the target's top-K next tokens last seen after each
                    token (refreshed from every verification), draft tree grown breadth-first from the last token
    hybrid          prompt lookup's chain merged with the recycling tree (each where it is strong)
    adaptive        the hybrid where drafting measures faster than plain decoding, plain decoding steps elsewhere
                    (the default: speculation never makes decoding slower)
    draft-model     a smaller model with the same vocabulary drafting a chain from its own session

DRAFTERS (at the end) is the registry: each drafter's --draft name, class and the options tuned settings may set; the
store, the CLI and `sparrow bench --tune` read it. Any other name is a draft model (DRAFT_MODEL).

A drafter's life: begin(ctx, params, rng) once per generation, then per step propose(ctx, max_nodes) -> Draft and
observe(batch, parents, logits, path) with the verification's results (logits is a view of a buffer the next step
overwrites: copy what must outlive the call), or, on a step its gate ran plain, observe_plain(root, logits); end()
after the generation, close() once.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _sparrow
from .native import Model, SamplerParams, Session
from .planner import DraftGate, TreePlanner
from .tree import Draft, TargetSampler, draw, penalized


class Drafter:
    """Base class: no draft, nothing learned."""

    name = "none"
    planner: TreePlanner | None = None  # prunes each proposal (runtime.planner) unless the caller passes its own
    gate: DraftGate | None = None       # decides whether a step drafts at all (runtime.planner), likewise

    def begin(self, ctx: list[int], params: SamplerParams, rng: np.random.Generator) -> None:
        pass

    def propose(self, ctx: list[int], max_nodes: int) -> Draft:
        return Draft()

    def observe(self, batch: list[int], parents: list[int], logits: np.ndarray, path: list[int]) -> None:
        pass

    def observe_plain(self, root: int, logits: np.ndarray) -> None:
        """A plain step (no draft: the gate's choice) evaluated root and got logits [V] (a view, as in observe)."""

    def end(self) -> None:
        pass

    def close(self) -> None:
        pass


class PromptLookup(Drafter):
    """Finds the latest earlier occurrence of the context's last n tokens (n from ngram down to min_ngram) and
    proposes the up to k tokens that followed it. Defaults: the best measured by bench_device/bench_speculative.py on
    SmolLM2 on the 2-core dev machine (single-token matches mostly propose wrong drafts; rejected drafts cost)."""

    name = "prompt-lookup"

    def __init__(self, *, ngram: int = 3, min_ngram: int = 2, k: int = 4):
        if not 1 <= min_ngram <= ngram or k < 1:
            raise ValueError("prompt lookup needs 1 <= min_ngram <= ngram and k >= 1")
        self.ngram, self.min_ngram, self.k = ngram, min_ngram, k

    def propose(self, ctx: list[int], max_nodes: int) -> Draft:
        arr = np.asarray(ctx, dtype=np.int32)  # [L]
        L = arr.size
        k = min(self.k, max_nodes)
        for n in range(min(self.ngram, L - 1), self.min_ngram - 1, -1):
            tail = arr[L - n:]
            hits = arr[:L - n] == tail[0]  # hits[j]: window arr[j:j+n] == tail, for j < L - n
            for i in range(1, n):
                hits &= arr[i:L - n + i] == tail[i]
            found = np.flatnonzero(hits)
            if found.size:
                j = int(found[-1]) + n
                return Draft.chain(arr[j:j + k].tolist())
        return Draft()


class Recycling(Drafter):
    """Token Recycling (Luo et al. 2024): adj[t] holds the K tokens the target ranked highest after token t the last
    time t was verified; the draft tree is grown breadth-first from the last token, node at depth d getting
    branching[d] children (the last entry repeats), up to max_nodes nodes. int32 [V, K]: 1.5 MiB for V=49152, K=8.
    update: refresh from every tree node's logits ("all", as in the paper) or only the accepted path's ("path").
    Default shape: a chain of 4, the fastest measured on SmolLM2 on the 2-core dev machine, where a verification
    pass of T tokens costs ~1.2x (T=5) to ~2.9x (T=25) one decode step; the paper's wide trees (e.g. branching
    (4, 2, 2, 1), 24 nodes) accept more per step but lose there. Pick a wider tree where small batches are cheap."""

    name = "recycling"

    def __init__(self, n_vocab: int, *, k: int = 8, branching: Sequence[int] = (1,), max_nodes: int = 4,
                 update: str = "all", plan: bool = False):
        if k < max(branching) or k < 1:
            raise ValueError("recycling: k must be >= every branching factor")
        if update not in ("all", "path"):
            raise ValueError("recycling: update must be 'all' (every tree node's logits) or 'path'")
        self.k, self.branching, self.max_nodes, self.update = k, tuple(branching), max_nodes, update
        self.adj = np.full((n_vocab, k), -1, dtype=np.int32)  # [V, K], -1 = not seen yet; kept across generations
        self.planner = TreePlanner() if plan else None

    def propose(self, ctx: list[int], max_nodes: int) -> Draft:
        cap = min(self.max_nodes, max_nodes)
        adj = self.adj
        tokens: list[int] = []
        parents: list[int] = []
        level = [(0, ctx[-1])]  # (batch index, token) of the nodes at this depth
        depth = 0
        while level and len(tokens) < cap:
            b = self.branching[min(depth, len(self.branching) - 1)]
            nxt = []
            for idx, tok in level:
                for c in adj[tok, :b].tolist():
                    if c < 0 or len(tokens) >= cap:
                        break
                    tokens.append(c)
                    parents.append(idx)
                    nxt.append((len(tokens), c))
            level = nxt
            depth += 1
        return Draft(tokens, parents)

    def observe(self, batch: list[int], parents: list[int], logits: np.ndarray, path: list[int]) -> None:
        rows = np.asarray(path if self.update == "path" else range(len(batch)))
        self.adj[np.asarray(batch)[rows]] = top_k_rows(logits[rows], self.k)

    def observe_plain(self, root: int, logits: np.ndarray) -> None:
        self.adj[root] = top_k_rows(logits[None, :], self.k)[0]

    # The adjacency matrix is what Token Recycling has learned about a model; chat keeps it in the model store
    # between sessions (runtime.launch), so a new conversation does not start cold.

    def save_state(self, path: Path) -> None:
        """Write the adjacency matrix to path (.npy), atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, self.adj, allow_pickle=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_state(self, path: Path) -> str | None:
        """Take the adjacency matrix saved at path if it fits this drafter (same vocabulary size and k, valid token
        ids). Returns None when loaded, else why not (the matrix is then left as it was)."""
        if not Path(path).is_file():  # a FIFO or device would block or never end
            return f"{path} is not a regular file"
        try:  # memory-mapped: a header claiming a huge shape allocates nothing, and a short file is refused
            adj = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError, MemoryError) as e:
            return f"{path} could not be read ({e})"
        if adj.dtype != np.int32 or adj.shape != self.adj.shape:
            return f"{path} holds a {adj.dtype} {adj.shape} matrix, this drafter needs int32 {self.adj.shape}"
        if adj.size and (adj.min() < -1 or adj.max() >= adj.shape[0]):
            return f"{path} holds token ids outside the vocabulary"
        self.adj[...] = adj
        return None


class Hybrid(Drafter):
    """Prompt lookup and Token Recycling in one tree: the lookup's chain first (where the context repeats itself it
    is often accepted whole), then the recycling tree's nodes, merged into it where they propose the same token
    under the same parent. lookup_k, ngram, min_ngram: the lookup's; k, branching, max_nodes: the recycling tree's
    (max_nodes bounds the recycling part; the whole tree is bounded by what speculative_tokens allows). plan: prune
    each step's tree with the sparsity-aware planner (on by default: the wide tree is only a candidate list).
    Defaults: the fastest measured by bench_device/bench_speculative.py on the 2-core dev machine."""

    name = "hybrid"

    def __init__(self, n_vocab: int, *, lookup_k: int = 8, ngram: int = 3, min_ngram: int = 2, k: int = 8,
                 branching: Sequence[int] = (4, 2, 2, 1), max_nodes: int = 24, plan: bool = True):
        self.lookup = PromptLookup(ngram=ngram, min_ngram=min_ngram, k=lookup_k)
        self.recycling = Recycling(n_vocab, k=k, branching=branching, max_nodes=max_nodes)
        self.planner = TreePlanner() if plan else None

    def begin(self, ctx: list[int], params: SamplerParams, rng: np.random.Generator) -> None:
        self.lookup.begin(ctx, params, rng)
        self.recycling.begin(ctx, params, rng)

    def propose(self, ctx: list[int], max_nodes: int) -> Draft:
        first = self.lookup.propose(ctx, max_nodes)
        tokens, parents = list(first.tokens), list(first.parents)
        where = {(par, tok): i for i, (par, tok) in enumerate(zip(parents, tokens), start=1)}
        rec = self.recycling.propose(ctx, max_nodes)
        new_index = {0: 0}  # recycling batch index -> merged batch index
        for i, (par, tok) in enumerate(zip(rec.parents, rec.tokens), start=1):
            if par not in new_index:
                continue  # its parent did not fit
            key = (new_index[par], tok)
            if key not in where:
                if len(tokens) >= max_nodes:
                    continue
                tokens.append(tok)
                parents.append(key[0])
                where[key] = len(tokens)
            new_index[i] = where[key]
        return Draft(tokens, parents)

    def observe(self, batch: list[int], parents: list[int], logits: np.ndarray, path: list[int]) -> None:
        self.recycling.observe(batch, parents, logits, path)

    def observe_plain(self, root: int, logits: np.ndarray) -> None:
        self.recycling.observe_plain(root, logits)

    def end(self) -> None:
        self.lookup.end()
        self.recycling.end()


class Adaptive(Hybrid):
    """The hybrid drafter behind a DraftGate (runtime.planner): each step drafts only where drafting has measured
    faster than plain decoding on this device under the actual sampling settings (where the text repeats itself,
    mostly), and runs a plain decoding step elsewhere, probing again now and then. Drafting nothing costs what
    plain decoding costs, so this is the default: no device makes it slower than plain decoding by more than its
    probes. Options: the hybrid's; probe_every, max_probe_every: the gate's probe interval (plain steps) after an
    episode of drafting that paid, and its cap after ones that did not; learn_every: Token Recycling learns from
    plain steps' logits too, from every one whose root it has no candidates for yet and from every learn_every-th
    of the others (one top-k of a logits row: ~35 us for V = 49152 on Zen 4, a fraction of a percent of a decode
    step once the common tokens are known), so that a probe finds candidates, and current ones."""

    name = "adaptive"

    def __init__(self, n_vocab: int, *, lookup_k: int = 8, ngram: int = 3, min_ngram: int = 2, k: int = 8,
                 branching: Sequence[int] = (4, 2, 2, 1), max_nodes: int = 24, plan: bool = True,
                 probe_every: int = 16, max_probe_every: int = 256, learn_every: int = 4):
        super().__init__(n_vocab, lookup_k=lookup_k, ngram=ngram, min_ngram=min_ngram, k=k, branching=branching,
                         max_nodes=max_nodes, plan=plan)
        self.gate = DraftGate(probe_every=probe_every, max_probe_every=max_probe_every)
        self.learn_every = learn_every
        self._plain = 0

    def observe_plain(self, root: int, logits: np.ndarray) -> None:
        self._plain += 1
        if self._plain >= self.learn_every or self.recycling.adj[root, 0] < 0:
            self._plain = 0
            self.recycling.observe_plain(root, logits)


def recycling_part(drafter: Drafter) -> Recycling | None:
    """The Token Recycling state inside a drafter (itself, or the hybrid's), if any."""
    if isinstance(drafter, Recycling):
        return drafter
    return drafter.recycling if isinstance(drafter, Hybrid) else None


def top_k_rows(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries' indices of each row of x [R, V], largest first (ties -> lower index): [R, k] int32.
    Native (sp_top_k, a k-entry heap per row): ~30x faster than np.argpartition on vocabulary-sized rows, which
    matters because Token Recycling refreshes its candidate lists from every verified node."""
    return _sparrow.top_k(np.ascontiguousarray(x, dtype=np.float32), k)


class DraftModel(Drafter):
    """A smaller model sharing the target's vocabulary drafts a chain of up to k tokens from its own session, which
    follows the context through truncation (only the tokens it has not seen are evaluated). With sampling params it
    samples from its own processed distribution and reports it (q) for speculative sampling.

    Tree drafting (alternatives > 0): the chain follows the draft model's greedy choice, and beside each chain node
    its next `alternatives` candidates (the draft's runners-up at that position) are added as leaf siblings, so a
    wrong first guess can still be caught one level down, at no extra draft evaluation. These drafts are
    deterministic, so sampling verifies them by recursive rejection (no q), which keeps the target distribution."""

    name = "draft-model"

    def __init__(self, model: Model, *, k: int = 4, n_ctx: int = 2048, n_threads: int = 0, owns_model: bool = False,
                 alternatives: int = 0):
        if k < 1 or alternatives < 0:
            raise ValueError("draft model: k >= 1 and alternatives >= 0")
        self.model, self.k, self.owns_model, self.alternatives = model, k, owns_model, alternatives
        self.session: Session = model.session(n_ctx=n_ctx, n_threads=n_threads)
        V = model.info.n_vocab
        self.x = np.empty(V, dtype=np.float32)
        self.logits = np.empty(V, dtype=np.float32)  # each draft step's logits, reused
        self.q = np.zeros((k, V), dtype=np.float64)  # [K, V] distributions the draft tokens were drawn from
        self.params = SamplerParams.greedy()
        self.target = TargetSampler(V, self.params)  # the draft model's own processed distribution
        self.rng = np.random.default_rng(0)

    def begin(self, ctx: list[int], params: SamplerParams, rng: np.random.Generator) -> None:
        self.params, self.rng = params, rng
        self.target = TargetSampler(self.model.info.n_vocab, params)

    def propose(self, ctx: list[int], max_nodes: int) -> Draft:
        s = self.session
        k = min(self.k, max_nodes, s.n_ctx - len(ctx))
        if k <= 0:
            return Draft()
        logits = s.prefill(ctx[s.reuse_prefix(ctx):])  # the last token is evaluated again for its logits
        greedy = self.params.temperature <= 0
        penalty = self.params.repeat_penalty != 1.0
        hist = ctx[-self.params.repeat_last_n:] if penalty else []
        if self.alternatives:
            return self._tree(logits, k, max_nodes, hist, penalty)
        tokens: list[int] = []
        for j in range(k):
            history = hist + tokens if penalty else ()
            if greedy:
                t = self.target.greedy(logits, history)
            else:
                t = draw(self.target.probs(logits, history, self.q[j]), self.rng)
            tokens.append(t)
            if j + 1 < k:
                logits = s.eval([t], logits="last", out=self.logits)
        return Draft.chain(tokens, None if greedy else self.q[:k])

    def _tree(self, logits: np.ndarray, k: int, max_nodes: int, hist: list[int], penalty: bool) -> Draft:
        """The greedy chain of k with `alternatives` runner-up leaves beside each chain node (batch order: chain
        node, its alternatives, next chain node, ...; cut at max_nodes, which keeps a subtree)."""
        s, tokens, parents, chain, parent = self.session, [], [], [], 0
        for j in range(k):
            history = hist + chain if penalty else ()
            x = penalized(logits, self.params, history, self.x)  # the penalty only: the ranking is greedy
            top = top_k_rows(x[None, :], 1 + self.alternatives)[0].tolist()  # [greedy, runners-up...]
            for t in top:
                if len(tokens) >= max_nodes:
                    break
                tokens.append(t)
                parents.append(parent)
            if len(tokens) >= max_nodes or j + 1 == k:
                break
            chain.append(top[0])
            parent = len(tokens) - len(top) + 1  # the batch index of this depth's chain node
            logits = s.eval([top[0]], logits="last", out=self.logits)
        return Draft(tokens, parents)

    def close(self) -> None:
        self.session.close()
        if self.owns_model:
            self.model.close()


# ---- the registry: every drafter by name, its class and the options tuned settings may give its constructor ----

@dataclass(frozen=True)
class DrafterKind:
    """A drafter the registry knows: its class, a phrase saying what it drafts (help texts), whether its constructor
    takes the target's vocabulary size first, and the keyword options tuned settings (`sparrow bench --tune`) may
    set, each int (a positive integer) or list (a non-empty list of positive integers)."""

    cls: type[Drafter]
    summary: str
    options: dict[str, type] = field(default_factory=dict)
    takes_vocab: bool = False


# The built-in drafters by --draft name. The store validates tuned settings against this, the CLI lists it in its
# help and errors, and `sparrow bench --tune` tries each of its drafters.
DRAFTERS: dict[str, DrafterKind] = {
    "none": DrafterKind(Drafter, "plain decoding"),
    "prompt-lookup": DrafterKind(PromptLookup, "continues an earlier occurrence of the last tokens",
                                 {"ngram": int, "min_ngram": int, "k": int}),
    "recycling": DrafterKind(Recycling, "Token Recycling", {"k": int, "branching": list, "max_nodes": int},
                             takes_vocab=True),
    "hybrid": DrafterKind(Hybrid, "prompt lookup + a Token Recycling tree pruned each step by the sparsity-aware "
                          "planner", {"lookup_k": int, "ngram": int, "min_ngram": int, "k": int, "branching": list,
                                      "max_nodes": int}, takes_vocab=True),
    "adaptive": DrafterKind(Adaptive, "the hybrid where it measures faster than plain decoding, plain steps elsewhere",
                            {"lookup_k": int, "ngram": int, "min_ngram": int, "k": int, "branching": list,
                             "max_nodes": int, "probe_every": int, "max_probe_every": int, "learn_every": int},
                            takes_vocab=True),
}
# Any other drafter name is a draft model: a store name or a GGUF file sharing the target's vocabulary.
DRAFT_MODEL = DrafterKind(DraftModel, "a draft model sharing the vocabulary (store name or file)",
                          {"k": int, "alternatives": int})


def drafter_kind(name: str) -> DrafterKind:
    """The registry's entry for a drafter name; DRAFT_MODEL for any other name (a draft model's)."""
    return DRAFTERS.get(name, DRAFT_MODEL)


def known_drafters(*, summaries: bool = False) -> str:
    """The drafters a --draft value may name, for help texts and errors: "none, prompt-lookup, ... or a draft model
    sharing the vocabulary (store name or file)"; summaries: each name followed by what it drafts."""
    names = [f"{name} ({k.summary})" if summaries else name for name, k in DRAFTERS.items()]
    return ", ".join(names) + f", or {DRAFT_MODEL.summary}"


def check_options(drafter: str, options: object) -> dict[str, object]:
    """The options for drafter's constructor (drafter_kind(drafter).options) as a new dict, or ValueError saying
    which option is unknown or not a positive integer (a non-empty list of them for list options); TypeError when
    options is not a dict."""
    if not isinstance(options, dict):
        raise TypeError("drafter options must be an object")
    kind = drafter_kind(drafter)
    if options and not kind.options:
        raise ValueError(f"drafter {drafter!r} takes no options")
    out: dict[str, object] = {}
    for key, value in options.items():
        typ = kind.options.get(key)
        if typ is None:
            raise ValueError(f"unknown option {key!r} for drafter {drafter!r} (known: {', '.join(kind.options)})")
        values = value if typ is list else [value]
        if (typ is list and (not isinstance(value, list) or not value)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(f"drafter option {key}={value!r} must be "
                             + ("a non-empty list of positive integers" if typ is list else "a positive integer"))
        out[key] = list(value) if typ is list else value
    if "branching" in out:  # a tree node cannot have more children than the candidates kept per token
        k = out.get("k", inspect.signature(kind.cls).parameters["k"].default)
        if max(out["branching"]) > k:
            raise ValueError(f"{drafter}: every branching factor must be <= k ({k})")
    return out


class UnknownDrafterError(ValueError):
    """A drafter name that is neither in the registry nor a draft model file."""


def make_drafter(name: str, target: Model, *, n_threads: int = 0, n_ctx: int = 2048, **options) -> Drafter:
    """A drafter by registry name (DRAFTERS), or the path of a draft model GGUF (same vocabulary as the target).
    options go to the drafter's constructor (e.g. ngram=, k=, branching=, max_nodes=)."""
    kind = DRAFTERS.get(name)
    if kind is not None:
        return kind.cls(target.info.n_vocab, **options) if kind.takes_vocab else kind.cls(**options)
    path = Path(name).expanduser()
    if not path.is_file():
        raise UnknownDrafterError(f"unknown drafter {name!r}; known: {known_drafters()}")
    draft = Model(path)
    if draft.info.n_vocab != target.info.n_vocab:
        n = draft.info.n_vocab
        draft.close()
        raise ValueError(f"the draft model {path.name} has {n} tokens, the target {target.info.n_vocab}: "
                         "a draft model must share the target's vocabulary")
    return DraftModel(draft, n_ctx=n_ctx, n_threads=n_threads, owns_model=True, **options)
