"""Speculative decoding over a native Session: a drafter proposes a token tree, the target model verifies the whole
tree in one forward pass (tree attention mask, per-node positions), and the KV cache keeps exactly the accepted path.

Shape legend: N = draft nodes (<= n_batch - 1), T = N + 1 tokens per verification, V = vocabulary size.

One step (the KV cache holds every token so far except the last one, the "root"):
    batch  = [root, d_1 .. d_N]        node i's parent parents[i-1] < i (0 = the root): topological order
    pos    = n_past + depth(node)      mask[i, j] = 1 iff j is i or an ancestor of i  (a chain needs neither)
    logits = session.eval(batch, pos=pos, mask=mask, logits="all")        # [T, V]: ONE forward pass
    walk from the root: at node u the target chooses x from logits[u] (greedy: argmax; sampling: rejection
    sampling against the children's tokens); if a child of u holds x, go there, else x is the bonus token
    Session.keep(prefix slots + batch slots of the root and the accepted nodes); the bonus is the next root.

Greedy output is exactly plain greedy decoding's (the chosen token at each accepted node is the target's own
argmax, computed as the C sampler does, repetition penalty included). Sampling preserves the target distribution:
for a deterministic draft (q a point mass) each child token c is accepted with probability p(c) under the residual
distribution, which then drops c and renormalises (recursive rejection sampling; exact for distinct siblings); for a
draft model with probabilities q (a chain), the draft token d is accepted with probability min(1, p(d)/q(d)) and on
rejection the token is drawn from norm(max(0, p - q)). For point-mass drafts the target distribution at a node comes
from the C sampler as its tokens of non-zero probability (sp_sampler_candidates, with the node's own history for
the repetition penalty); the dense numpy mirror below serves draft-model chains and is the tests' oracle.

A planner (runtime.planner.TreePlanner, given here or carried by the drafter) prunes each proposal to the part
worth verifying; SpecStats splits the time into draft, verify (attention / FFN / LM head, from Session.timings()),
sampling and accept.

A gate (runtime.planner.DraftGate, given here or carried by the drafter: the adaptive drafter's) decides before each
step whether to draft at all. A step it does not draft is a plain decoding step, as runtime.native.generate_tokens
runs it: the root evaluated alone, the next token drawn by a C sampler that has seen every token so far (its own,
never reset), no draft, no mask, no planner; the drafter only sees the logits (drafter.observe_plain: the adaptive
drafter's Token Recycling learns from one in four); so drafting nothing costs what plain decoding costs.
Greedy output stays exactly plain greedy decoding's, and sampling stays exact: each token, drafted or not, is drawn
from the target's distribution given the tokens before it.

    with Model(path) as model, model.session(n_threads=2) as session:
        for piece in generate_speculative(model, session, "Once upon a time", drafter="recycling"):
            print(piece, end="")
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from .drafters import Drafter, make_drafter
from .native import Model, Sampler, SamplerParams, Session, utf8_pieces
from .planner import gate_summary, planner_dict, planner_summary
from .tree import Draft, TargetSampler, draw

if TYPE_CHECKING:
    from .planner import DraftGate, TreePlanner


@dataclass
class SpecStats:
    """What speculative decoding did: steps (forward passes), of which plain (no draft: the adaptive drafter's gate
    said drafting does not pay there), draft nodes verified, draft tokens accepted, tokens emitted, time split, how
    many tokens each drafting step accepted, and for sparse-expert targets the expert weight bytes its verification
    passes read."""

    steps: int = 0                   # forward passes: drafting steps + plain steps
    plain_steps: int = 0             # steps that drafted nothing by the gate's choice (one token, plain decoding)
    drafted: int = 0                 # draft nodes evaluated (tree size summed over steps)
    accepted: int = 0                # draft tokens accepted (bonus tokens not counted)
    generated: int = 0               # tokens yielded
    prefill_s: float = 0.0
    draft_s: float = 0.0             # drafter.propose
    verify_s: float = 0.0            # the target's forward pass over the tree (wall time of session.eval)
    verify_attention_s: float = 0.0  # ... of which the native passes spent in attention blocks,
    verify_ffn_s: float = 0.0        # ... in FFN blocks (BlockFFN: router + the union of the tree's experts),
    verify_head_s: float = 0.0       # ... in the LM head (logits for every node); the rest is binding/copy overhead
    #                                  (these three count the plain steps' passes too, if any)
    sample_s: float = 0.0            # walking the tree: the target's choice at each node (argmax / rejection sampling)
    accept_s: float = 0.0            # KV compaction and drafter.observe (e.g. Token Recycling's top-k refresh)
    plain_s: float = 0.0             # plain steps: evaluating the root and sampling
    accepted_hist: dict[int, int] = field(default_factory=dict)  # accepted draft tokens in a drafting step -> steps
    expert_bytes: float = 0.0        # sparse-expert weight bytes read by the verification passes (0: dense model)
    dense_expert_bytes_per_token: float = 0.0

    @property
    def draft_steps(self) -> int:
        """Steps that drafted (verified a draft, possibly empty)."""
        return self.steps - self.plain_steps

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per drafting step (the bonus token not counted)."""
        return self.accepted / self.draft_steps if self.draft_steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens each forward pass produced: accepted + the bonus token (1 for a plain step)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def decode_s(self) -> float:
        return self.draft_s + self.verify_s + self.sample_s + self.accept_s + self.plain_s

    @property
    def decode_tok_s(self) -> float:
        return self.generated / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def expert_bytes_per_step(self) -> float:
        return self.expert_bytes / self.steps if self.steps else 0.0

    @property
    def expert_bytes_per_token(self) -> float:
        return self.expert_bytes / self.generated if self.generated else 0.0

    def since(self, earlier: SpecStats) -> SpecStats:
        """What was added after `earlier` (a copy of these statistics taken before, e.g. before one chat answer)."""
        out = SpecStats(dense_expert_bytes_per_token=self.dense_expert_bytes_per_token)
        for f in fields(self):
            if f.name == "accepted_hist":
                hist = {k: v - earlier.accepted_hist.get(k, 0) for k, v in self.accepted_hist.items()}
                out.accepted_hist = {k: v for k, v in hist.items() if v}
            elif f.name != "dense_expert_bytes_per_token":
                setattr(out, f.name, getattr(self, f.name) - getattr(earlier, f.name))
        return out

    def summary(self, *, speed: bool = True) -> str:
        """One line; speed=False leaves out tok/s (for a caller that prints its own, timed end to end)."""
        hist = " ".join(f"{k}:{v}" for k, v in sorted(self.accepted_hist.items()))
        s = (f"{self.steps} steps, {self.generated} tokens, {self.tokens_per_step:.2f} tokens/step "
             f"({self.draft_steps} drafted: mean accepted {self.mean_accepted:.2f} of "
             f"{self.drafted / max(self.draft_steps, 1):.1f} drafted; {self.plain_steps} plain)"
             + (f", {self.decode_tok_s:.1f} tok/s" if speed else "")
             + f"; time draft {self.draft_s:.3f} s, verify {self.verify_s:.3f} s, sampling {self.sample_s:.3f} s, "
             f"accept {self.accept_s:.3f} s, plain steps {self.plain_s:.3f} s (forward passes: attention "
             f"{self.verify_attention_s:.3f}, FFN {self.verify_ffn_s:.3f}, LM head {self.verify_head_s:.3f})"
             + (f"; accepted per drafting step {hist}" if hist else ""))
        if self.expert_bytes:
            s += (f"; experts read {self.expert_bytes_per_step / 1e6:.2f} MB/step, "
                  f"{self.expert_bytes_per_token / 1e6:.2f} MB/token "
                  f"(dense {self.dense_expert_bytes_per_token / 1e6:.2f} MB/token)")
        return s

    def as_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "draft_steps": self.draft_steps, "plain_steps": self.plain_steps,
                "drafted": self.drafted, "accepted": self.accepted,
                "generated": self.generated, "mean_accepted": round(self.mean_accepted, 4),
                "tokens_per_step": round(self.tokens_per_step, 4), "prefill_s": round(self.prefill_s, 6),
                "draft_s": round(self.draft_s, 6), "verify_s": round(self.verify_s, 6),
                "verify_attention_s": round(self.verify_attention_s, 6), "verify_ffn_s": round(self.verify_ffn_s, 6),
                "verify_head_s": round(self.verify_head_s, 6), "sample_s": round(self.sample_s, 6),
                "accept_s": round(self.accept_s, 6), "plain_s": round(self.plain_s, 6),
                "decode_tok_s": round(self.decode_tok_s, 3),
                "accepted_hist": {str(k): v for k, v in sorted(self.accepted_hist.items())},
                "expert_bytes_per_step": self.expert_bytes_per_step,
                "expert_bytes_per_token": self.expert_bytes_per_token}


def _expert_bytes(session: Session) -> tuple[float, float]:
    st = session.sparsity()
    if st is None or not st.n_tokens:
        return 0.0, 0.0 if st is None else st.dense_bytes_per_token
    return st.expert_bytes_per_token * st.n_tokens, st.dense_bytes_per_token


# ---- the loop ----

class _Scratch:
    """Buffers reused by every step: the tree mask, float32 logits scratch, float64 distributions."""

    def __init__(self, n_batch: int, n_vocab: int, params: SamplerParams):
        self.mask = np.zeros(n_batch * n_batch, dtype=np.uint8)  # [T, T] views of the first T*T bytes
        self.depth = np.zeros(n_batch, dtype=np.int32)            # [T]
        self.logits = np.empty((n_batch, n_vocab), dtype=np.float32)  # [T, V] views: every verification's logits
        self.p = np.empty(n_vocab, dtype=np.float64)              # target distribution at a node
        # The C sampler gives the target's choice and distribution at each node (its repetition history set to the
        # node's); built for greedy decoding too, so the speculative path refuses the parameters plain decoding
        # refuses (NaN or negative penalties, top-p > 1, ...).
        self.target = TargetSampler(n_vocab, params)

    def tree_mask(self, parents: Sequence[int]) -> np.ndarray:
        """[T, T] ancestor-or-self mask and node depths for a root plus nodes with these parents."""
        T = len(parents) + 1
        m = self.mask[:T * T].reshape(T, T)
        m.fill(0)
        m[0, 0] = 1
        self.depth[0] = 0
        for i, par in enumerate(parents, start=1):
            m[i, :i] = m[par, :i]
            m[i, i] = 1
            self.depth[i] = self.depth[par] + 1
        return m


def speculative_tokens(session: Session, prompt_tokens: Sequence[int], drafter: Drafter, *, max_tokens: int = 128,
                       params: SamplerParams | None = None, stats: SpecStats | None = None,
                       max_nodes: int | None = None, stop_at_eog: bool = True,
                       planner: TreePlanner | None = None, gate: DraftGate | None = None) -> Iterator[int]:
    """Like runtime.native.generate_tokens (same tokens for greedy params; the same distribution when sampling),
    verifying the drafter's proposals. The KV cache is reused when the session already holds a prefix of the
    prompt. max_nodes caps the draft tree (default and upper bound: session.n_batch - 1). planner: a
    runtime.planner.TreePlanner that prunes each proposal to the part worth verifying (it learns across calls);
    default: the drafter's own (drafter.planner), if any. gate: a runtime.planner.DraftGate that decides per step
    whether to draft at all (the other steps run plain); default: the drafter's own (drafter.gate), if any."""
    model = session.model
    V = model.info.n_vocab
    params = params or SamplerParams.greedy()
    greedy = params.temperature <= 0
    rng = np.random.default_rng(params.seed)
    stats = stats if stats is not None else SpecStats()
    prompt = list(prompt_tokens)
    if not prompt:
        raise ValueError("speculative decoding needs at least one prompt token")
    planner = planner if planner is not None else drafter.planner
    gate = gate if gate is not None else drafter.gate
    node_cap = session.n_batch - 1 if max_nodes is None else max(0, min(max_nodes, session.n_batch - 1))
    buf = _Scratch(session.n_batch, V, params)

    # Cache reuse: keep the common prefix, but never the last prompt token (it is the first root).
    t0 = time.perf_counter()
    common = session.reuse_prefix(prompt)
    for i in range(common, len(prompt) - 1, session.n_batch):
        session.eval(prompt[i:min(i + session.n_batch, len(prompt) - 1)], logits="none")
    stats.prefill_s += time.perf_counter() - t0
    bytes0, stats.dense_expert_bytes_per_token = _expert_bytes(session)
    times0 = session.timings()

    ctx = prompt  # every token so far; the cache holds ctx[:-1], ctx[-1] is the root
    drafter.begin(ctx, params, rng)
    penalty = params.repeat_penalty != 1.0 and params.repeat_last_n > 0
    if gate is not None:
        gate.begin(ctx)
        # Plain steps sample as generate_tokens does: with a C sampler of their own (never reset: its RNG runs on)
        # whose repetition-penalty history is every token so far (a ring of the last repeat_last_n).
        plain_sampler = Sampler(V, params)
        for t in ctx[-params.repeat_last_n:] if penalty else ():
            plain_sampler.accept(t)
        row = buf.logits[0]  # [V]: a plain step's logits
    generated = 0
    try:
        while generated < max_tokens:
            room = session.n_ctx - session.n_past  # slots for the root and the draft nodes
            if room <= 0:
                return
            if gate is not None and not gate.drafts():
                # A plain decoding step: the root alone, the next token from the C sampler.
                t0 = time.perf_counter()
                logits = session.eval([ctx[-1]], out=row)
                tok = plain_sampler.sample(logits)
                if penalty:
                    plain_sampler.accept(tok)
                drafter.observe_plain(ctx[-1], logits)
                dt = time.perf_counter() - t0
                gate.plain(dt)
                stats.steps += 1
                stats.plain_steps += 1
                stats.plain_s += dt
                emitted = [tok]
            else:
                emitted = _drafting_step(session, ctx, drafter, planner, gate, min(node_cap, room - 1), params,
                                         greedy, rng, buf, stats)
                if gate is not None and penalty:
                    for tok in emitted:
                        plain_sampler.accept(tok)
            for tok in emitted:
                if stop_at_eog and model.is_eog(tok):
                    return
                ctx.append(tok)
                generated += 1
                stats.generated += 1
                if gate is not None:
                    gate.push(ctx)
                yield tok
                if generated >= max_tokens or len(ctx) - 1 >= session.n_ctx:
                    return
    finally:
        b1, _ = _expert_bytes(session)
        stats.expert_bytes += max(0.0, b1 - bytes0)
        times1 = session.timings()
        stats.verify_attention_s += times1.attention_s - times0.attention_s
        stats.verify_ffn_s += times1.ffn_s - times0.ffn_s
        stats.verify_head_s += times1.head_s - times0.head_s
        drafter.end()


def _drafting_step(session: Session, ctx: list[int], drafter: Drafter, planner: TreePlanner | None,
                   gate: DraftGate | None, budget: int, params: SamplerParams, greedy: bool, rng: np.random.Generator,
                   buf: _Scratch, stats: SpecStats) -> list[int]:
    """One speculative step (module docstring): draft, plan, verify the tree in one pass, walk it, keep the accepted
    path in the KV cache, let the drafter, the planner and the gate learn. Returns the tokens it emits: the accepted
    drafts and the bonus token."""
    arm = gate.arm if gate is not None else 0
    t0 = time.perf_counter()
    bytes_prev = _expert_bytes(session)[0] if planner is not None else 0.0  # plain steps move the counters too
    draft = drafter.propose(ctx, budget) if budget > 0 else Draft()
    if len(draft) > budget:
        draft = Draft(draft.tokens[:budget], draft.parents[:budget], None if draft.q is None else draft.q[:budget])
    plan = None
    if planner is not None:
        plan = planner.plan(draft)
        draft = plan.draft
    t1 = time.perf_counter()
    N = len(draft)
    T = N + 1
    parents = draft.parents
    chain = all(par == i for i, par in enumerate(parents))
    batch = [ctx[-1]] + draft.tokens
    n_past0 = session.n_past
    if chain:
        logits = session.eval(batch, logits="all", out=buf.logits[:T])  # [T, V]
    else:
        mask = buf.tree_mask(parents)
        pos = (buf.depth[:T] + n_past0).tolist()
        logits = session.eval(batch, pos=pos, mask=mask, logits="all", out=buf.logits[:T])  # [T, V]
    t2 = time.perf_counter()

    # Walk the tree from the root, the target choosing at each node.
    children: list[list[int]] = [[] for _ in range(T)]
    for i, par in enumerate(parents, start=1):
        children[par].append(i)
    path = [0]
    emitted: list[int] = []
    hist_base = ctx[-params.repeat_last_n:] if params.repeat_penalty != 1.0 else None
    while True:
        u = path[-1]
        history = hist_base + emitted if hist_base is not None else ()
        kids = children[u]
        if greedy:
            x = buf.target.greedy(logits[u], history)
            nxt = next((v for v in kids if batch[v] == x), None)
        else:
            x, nxt = _sample_at_node(logits[u], params, history, buf, kids, batch, draft.q, rng)
        emitted.append(x)
        if nxt is None:
            break
        path.append(nxt)
    n_acc = len(path) - 1
    t25 = time.perf_counter()
    if chain:
        session.truncate(n_past0 + len(path))
    else:
        session.keep(list(range(n_past0)) + [n_past0 + i for i in path])
    drafter.observe(batch, parents, logits, path)
    t3 = time.perf_counter()
    if planner is not None:  # the counters move only in verification passes
        planner.observe(plan, path, T, _expert_bytes(session)[0] - bytes_prev, t3 - t0)

    stats.steps += 1
    stats.drafted += N
    stats.accepted += n_acc
    stats.accepted_hist[n_acc] = stats.accepted_hist.get(n_acc, 0) + 1
    stats.draft_s += t1 - t0
    stats.verify_s += t2 - t1
    stats.sample_s += t25 - t2
    stats.accept_s += t3 - t25
    if gate is not None:
        gate.observe(arm, len(emitted), time.perf_counter() - t0, explored=plan is not None and plan.explored)
    return emitted


def _sample_at_node(logits: np.ndarray, params: SamplerParams, history: Sequence[int], buf: _Scratch,
                    kids: list[int], batch: list[int], q: np.ndarray | None,
                    rng: np.random.Generator) -> tuple[int, int | None]:
    """Speculative sampling at one node (params sample: temperature > 0): returns (the token the target emits here,
    the child holding it or None)."""
    if q is None:  # point-mass children: the target distribution, sparse
        return _sample_deterministic_kids(*buf.target.candidates(logits, history), kids, batch, rng)
    # A sampled chain: one child with draft distribution q[child - 1], against the dense target distribution.
    if len(kids) > 1:
        raise ValueError("drafts with probabilities q must be chains")
    p = buf.target.probs(logits, history, buf.p)
    if kids:
        v = kids[0]
        d = batch[v]
        qv = q[v - 1]
        if qv[d] > 0 and rng.random() * qv[d] < p[d]:  # accept with probability min(1, p(d)/q(d))
            return d, v
        np.subtract(p, qv, out=p)
        np.maximum(p, 0.0, out=p)
        if p.sum() <= 0:  # p == q up to rounding: the rejection had probability ~0; fall back to p
            p = buf.target.probs(logits, history, buf.p)
    return draw(p, rng), None


def _sample_deterministic_kids(ids: np.ndarray, probs: np.ndarray, kids: list[int], batch: list[int],
                               rng: np.random.Generator) -> tuple[int, int | None]:
    """Recursive rejection over point-mass children, on the target distribution given sparsely (the K tokens of
    non-zero probability): each child is accepted with its probability under the residual distribution, which then
    drops it; if none is, the token is drawn from what remains."""
    p = probs.astype(np.float64)
    where = {int(t): i for i, t in enumerate(ids.tolist())}
    mass = 1.0
    for v in kids:
        i = where.get(batch[v])
        if i is None or p[i] <= 0:
            continue
        if rng.random() * mass < p[i]:
            return batch[v], v
        mass -= p[i]
        p[i] = 0.0
        if mass <= 1e-12:
            mass = float(p.sum())
            if mass <= 0:
                break
    if not p.sum() > 0:  # every candidate was a rejected child: unreachable with exact arithmetic; the last resort
        return int(ids[int(np.argmax(probs))]), None
    return int(ids[draw(p, rng)]), None


# ---- Python API ----

def generate_speculative(model: Model, session: Session, prompt: str | Sequence[int], *,
                         drafter: str | Drafter = "recycling", max_tokens: int = 128,
                         params: SamplerParams | None = None, stats: SpecStats | None = None,
                         max_nodes: int | None = None, parse_special: bool = True,
                         planner: TreePlanner | None = None) -> Iterator[str]:
    """Stream the text of a continuation (whole UTF-8 characters), decoding speculatively. drafter: a built-in
    drafter's name ("prompt-lookup", "recycling", "hybrid", "adaptive"), decoded by libsparrow's generator, or a
    Drafter object (or a draft model's GGUF path), decoded by the Python loop (speculative_tokens; so are max_nodes and
    planner). params: sampling settings (default greedy). stats: filled as generation goes."""
    tokens = model.tokenize(prompt, parse_special=parse_special) if isinstance(prompt, str) else list(prompt)
    from .native import C_DRAFTERS, Generator

    if isinstance(drafter, str) and drafter in C_DRAFTERS and drafter not in ("none", "draft-model") \
            and max_nodes is None and planner is None:
        stats = stats if stats is not None else SpecStats()
        with Generator(session, params=params, max_tokens=max_tokens, drafter=drafter) as gen:
            before = gen.stats()
            gen.start(tokens)
            times = session.timings()
            try:
                yield from utf8_pieces(model.token_bytes, iter(gen))
            finally:
                add_c_stats(stats, before, gen.stats(), times, session.timings())
        return
    d = make_drafter(drafter, model, n_threads=0) if isinstance(drafter, str) else drafter
    try:
        yield from utf8_pieces(model.token_bytes, speculative_tokens(session, tokens, d, max_tokens=max_tokens,
                                                                     params=params, stats=stats, max_nodes=max_nodes,
                                                                     planner=planner))
    finally:
        if d is not drafter:
            d.close()


class SpeculativeBackend:
    """A NativeBackend (or OnnxBackend: runtime.backends) whose generate_tokens decodes speculatively with a drafter (everything else delegated), so
    runtime.backends.stream_text and Chat work unchanged. stats accumulates over generations."""

    def __init__(self, backend, drafter: Drafter, *, max_nodes: int | None = None):
        if getattr(backend, "name", None) not in ("native", "onnxruntime"):
            raise ValueError("speculative decoding needs the native or the onnxruntime backend")
        self._backend = backend
        self.drafter = drafter
        self.max_nodes = max_nodes
        self.on_close: Callable[[], None] | None = None  # e.g. save what the drafter learned (runtime.launch)
        self.stats = SpecStats()

    def __getattr__(self, name: str):
        if name == "_backend":
            raise AttributeError(name)
        return getattr(self._backend, name)

    def summary(self, since: SpecStats | None = None, *, speed: bool = True) -> str:
        """The statistics so far (or since a copy of them taken earlier, e.g. one answer's), and what the drafter's
        planner and gate have learned (if it has them)."""
        planner, gate = self.drafter.planner, self.drafter.gate
        stats = self.stats if since is None else self.stats.since(since)
        return (stats.summary(speed=speed) + (f"; {planner.summary()}" if planner is not None else "")
                + (f"; {gate.summary()}" if gate is not None else ""))

    @property
    def n_evaluated(self) -> int:
        """Tokens of the conversation run through the model: draft nodes verified (accepted or not) are left out,
        so prompt-evaluation and KV-reuse statistics mean what they mean without a drafter."""
        return self._backend.n_evaluated - self.stats.drafted

    def generate_tokens(self, prompt_tokens: Sequence[int], *, max_tokens: int,
                        params: SamplerParams) -> Iterator[int]:
        session = self._backend.session
        try:
            yield from speculative_tokens(session, list(prompt_tokens), self.drafter, max_tokens=max_tokens,
                                          params=params, stats=self.stats, max_nodes=self.max_nodes)
        finally:
            session.resync()

    def close(self) -> None:
        try:
            if self.on_close is not None:
                self.on_close()
        finally:
            self.drafter.close()
            self._backend.close()


# ---- the same, in libsparrow: the C generator with a built-in drafter ----

# Registry drafter options (runtime.drafters.DRAFTERS) -> the C generator's keywords (runtime.native.Generator).
_C_OPTION = {"ngram": "ngram", "min_ngram": "min_ngram", "lookup_k": "draft_k", "branching": "branching",
             "max_nodes": "max_nodes", "probe_every": "probe_every", "max_probe_every": "max_probe_every",
             "learn_every": "learn_every"}


def c_generator_options(drafter: str, options: dict[str, object]) -> dict[str, object] | None:
    """The C generator's keywords for a registry drafter (or "draft-model") and its options, or None when an option
    has no C form (a draft model's `alternatives`): such a drafter runs in the Python loop."""
    out: dict[str, object] = {}
    for key, value in options.items():
        if key == "k":  # the chain length of prompt lookup and draft models, the candidates per token elsewhere
            out["draft_k" if drafter in ("prompt-lookup", "draft-model") else "recycling_k"] = value
        elif key in _C_OPTION:
            out[_C_OPTION[key]] = value
        else:
            return None
    return out


def add_c_stats(st: SpecStats, before, after, times_before=None, times_after=None) -> None:
    """Add what a C generator did between two of its GeneratorStats to st: forward passes (plain steps' included) as
    verify_s, the draft model's passes as draft_s, the rest of the C loop as sample_s (no per-step histogram); and,
    given the session's Timings before and after, the passes' attention / FFN / LM head time."""
    if times_before is not None and times_after is not None:
        st.verify_attention_s += times_after.attention_s - times_before.attention_s
        st.verify_ffn_s += times_after.ffn_s - times_before.ffn_s
        st.verify_head_s += times_after.head_s - times_before.head_s
    st.steps += after.steps - before.steps
    st.plain_steps += after.plain_steps - before.plain_steps
    st.drafted += after.drafted - before.drafted
    st.accepted += after.accepted - before.accepted
    st.generated += after.tokens - before.tokens
    st.verify_s += after.eval_s - before.eval_s
    st.draft_s += after.draft_eval_s - before.draft_eval_s
    st.sample_s += (after.loop_s - after.draft_eval_s) - (before.loop_s - before.draft_eval_s)


@dataclass
class NativeDrafter:
    """What NativeSpeculativeBackend drafts with, for callers that ask (`backend.drafter.name`): the registry name and
    options (readable as attributes, e.g. `.k`); the planner and the gate live in C (no Python objects)."""

    name: str
    options: dict[str, object] = field(default_factory=dict)
    planner: None = None
    gate: None = None

    def __getattr__(self, key: str) -> object:
        if key != "options" and key in self.options:
            return self.options[key]
        raise AttributeError(key)


class NativeSpeculativeBackend:
    """A NativeBackend whose generate_tokens runs libsparrow's generator (runtime.native.Generator: drafting,
    verification, acceptance, the planner and the gate all in C) with a built-in drafter: `drafter` is a C drafter
    name (runtime.native.C_DRAFTERS), `options` its keywords (c_generator_options; registry_options: the same as the
    registry names them, for `drafter`), `draft_model` the draft model for "draft-model" (owned: closed with this
    backend). Everything else is delegated, so stream_text and Chat work
    unchanged. One generator serves every call while the sampling settings stay the same; when they change, a new one
    takes over what Token Recycling learned. stats accumulates over generations (from the C statistics: no
    per-step histogram, and the time split is forward passes (verify_s; plain steps' included) / the draft model's
    passes (draft_s) / the rest of the C loop (sample_s))."""

    def __init__(self, backend, drafter: str, options: dict[str, object] | None = None, *,
                 draft_model: Model | None = None, n_ctx: int = 2048, n_threads: int = 0,
                 registry_options: dict[str, object] | None = None):
        from .native import C_DRAFTERS

        if getattr(backend, "name", None) not in ("native", "onnxruntime"):
            raise ValueError("speculative decoding needs the native or the onnxruntime backend")
        if drafter not in C_DRAFTERS or drafter == "none":
            raise ValueError(f"not a C drafter: {drafter!r}")
        self._backend = backend
        self.drafter_name = drafter
        self.options = dict(options or {})
        self.drafter = NativeDrafter(drafter, dict(registry_options or {}))
        self.draft_model = draft_model
        self.draft_session = draft_model.session(n_ctx=n_ctx, n_threads=n_threads) if draft_model else None
        self.on_close: Callable[[], None] | None = None
        self.stats = SpecStats()
        self._gen = None
        self._key = None
        self._tmp = None
        self._live = None  # (generator, its statistics at the start) during a generation

    def __getattr__(self, name: str):
        if name == "_backend":
            raise AttributeError(name)
        return getattr(self._backend, name)

    @property
    def has_state(self) -> bool:
        """Whether the drafter learns a Token Recycling matrix (saved between sessions)."""
        return self.drafter_name in ("recycling", "hybrid", "adaptive")

    def load_state(self, path) -> str | None:
        """Start Token Recycling from the matrix saved at path. Returns None when it fits, else why not: it is loaded
        now, into a generator (greedy) whose matrix the first generation's generator takes over, so a bad file is
        reported at once."""
        from .native import SparrowError

        try:
            self._generator(SamplerParams.greedy(), 1).load_drafter(path)
        except SparrowError as e:
            return str(e)
        return None

    def save_state(self, path) -> None:
        """Write what Token Recycling has learned to path (.npy, atomically); nothing before the first generation."""
        if self._gen is not None:
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._gen.save_drafter(path)

    def _generator(self, params: SamplerParams, max_tokens: int):
        import os
        import tempfile

        from .native import Generator

        key = (params, max_tokens)
        if self._gen is not None and self._key == key:
            return self._gen
        new = Generator(self._backend.session, params=params, max_tokens=max_tokens, drafter=self.drafter_name,
                        draft_session=self.draft_session, **self.options)
        old, self._gen, self._key = self._gen, new, key
        if old is not None:
            if self.has_state:  # what Token Recycling learned moves to the new generator
                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="sparrow-spec-")
                state = os.path.join(self._tmp.name, "recycling.npy")
                old.save_drafter(state)
                new.load_drafter(state)
            old.close()
        return new

    def summary(self, since: SpecStats | None = None, *, speed: bool = True) -> str:
        """The statistics so far (or since a copy taken earlier), and what the C planner and gate have learned."""
        stats = self.stats if since is None else self.stats.since(since)
        parts = [stats.summary(speed=speed)]
        learned = self._learned()
        if "planner" in learned:
            parts.append(planner_summary(*learned["planner"]))
        if "gate" in learned:
            parts.append(gate_summary(*learned["gate"]))
        return "; ".join(parts)

    def _learned(self) -> dict[str, tuple]:
        """The C planner's (steps, kept, candidates, cost) and gate's (drafting, probes, paid) state, for those the
        drafter has; {} before the first generation."""
        if self._gen is None:
            return {}
        g = self._gen.stats()
        out: dict[str, tuple] = {}
        if g.plan_steps:
            out["planner"] = (g.plan_steps, g.plan_kept, g.plan_candidates,
                              (g.cost_step_s, g.cost_token_s, g.cost_expert_byte_s))
        if self.drafter_name == "adaptive":
            out["gate"] = (g.gate_drafting, g.gate_probes, g.gate_paid)
        return out

    def learned(self) -> dict[str, object]:
        """The C planner's and gate's state as records (for --json)."""
        learned = self._learned()
        out: dict[str, object] = {}
        if "planner" in learned:
            out["planner"] = planner_dict(*learned["planner"])
        if "gate" in learned:
            on, probes, paid = learned["gate"]
            out["gate"] = {"drafting": list(on), "probes": list(probes), "paid": list(paid)}
        return out

    @property
    def n_evaluated(self) -> int:
        """Tokens of the conversation run through the model: the prompt's (counted into the session by the C
        generator's start) and each step's root; draft nodes verified (accepted or not) are left out, as in
        SpeculativeBackend."""
        live = 0
        if self._live is not None:
            gen, before = self._live
            live = gen.stats().steps - before.steps
        return self._backend.n_evaluated + self.stats.steps + live

    def generate_tokens(self, prompt_tokens: Sequence[int], *, max_tokens: int,
                        params: SamplerParams) -> Iterator[int]:
        gen = self._generator(params, max_tokens)
        before = gen.stats()
        self._live = (gen, before)
        session = self._backend.session
        times = None
        try:
            gen.start(list(prompt_tokens))
            times = session.timings()  # after the prompt: the decode steps' passes only
            yield from gen
        finally:
            add_c_stats(self.stats, before, gen.stats(), times, session.timings() if times is not None else None)
            self._live = None
            self._backend.session.resync()

    def close(self) -> None:
        try:
            if self.on_close is not None:
                self.on_close()
        finally:
            if self._gen is not None:
                self._gen.close()
            if self.draft_session is not None:
                self.draft_session.close()
            if self.draft_model is not None:
                self.draft_model.close()
            if self._tmp is not None:
                self._tmp.cleanup()
            self._backend.close()
