"""Synthetic large BlockFFN configurations end to end: decode and verification cost, dense vs sparse, at a stated
routing sparsity, through the whole native forward pass.

Shape legend: T = tokens in one forward pass (1 = decode; 2..25 = verifying a drafted chain or tree), E = experts,
A = experts a token uses, U = experts k consecutive positions use, P = cached prefix.

Everything measured here is SYNTHETIC, and every record says so ("synthetic": true, with its routing): the models are
the released BlockFFN shapes with random weights (bench_device/synthetic.py: sources and assumptions), and the
routing is the native synthetic-routing switch (native/src/routing_synth.c): every layer's router matmul runs, then
its scores are replaced by a (layer, position)-keyed pattern with TLS = 1 - A/E and CLS-k = 1 - U/E exactly (the
default is the paper's TLS 80%, CLS-8 70%). Modes, three sessions on one model, same threads:
  - dense: every expert for every token (the baseline that ignores sparsity);
  - token: each token's own experts (decode, T = 1);
  - chunk: the union of the batch's experts, each read once (verification, T > 1).
Before any configuration is timed, its sparse output is checked against dense (logits allclose). Timings alternate
the modes (A B A B ...); reported: medians with min/max. Decode runs `decode_steps` consecutive single-token steps
from a cached prefix (then rolls back); a verification pass evaluates T tokens with all logits after the prefix
(then rolls back): a chain (causal), or a tree (BFS shape `branching`, tree mask, position = P + depth).

`replayed_speculation()` combines the measured verify-step time of a T-token chunk with an accepted-length
distribution measured on the real shipped model into a replayed tok/s (issue 6, benchmark (b)): labelled "replayed".

    python -m sparrow.bench_device.bench_synthetic --out bench_device/results/synthetic.json   # 0.5b and 1.2b
    python -m sparrow.bench_device.bench_synthetic --quick                                        # 0.1b, fewer points
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..runtime import Model, _sparrow
from . import synthetic

SCHEMA = "sparrow.bench.synthetic/1"


@dataclass(frozen=True)
class Routing:
    """A stated synthetic routing: token-level sparsity, chunk-level sparsity over k positions, seed."""

    tls: float = 0.8
    cls: float = 0.7
    k: int = 8
    seed: int = 0


PAPER = Routing()  # the paper's TLS 80%, CLS-8 70%


def tree_parents(n_nodes: int, branching: Sequence[int]) -> list[int]:
    """Parents of a BFS tree of 1 + n_nodes nodes (node 0 the root, parent -1): each node at depth d gets
    branching[d] children (the last entry repeats), as runtime/drafters.py's Recycling builds its draft trees."""
    parents, depth, frontier = [-1], [0], [0]
    while len(parents) < 1 + n_nodes and frontier:
        nxt = []
        for u in frontier:
            for _ in range(branching[min(depth[u], len(branching) - 1)]):
                if len(parents) == 1 + n_nodes:
                    break
                parents.append(u)
                depth.append(depth[u] + 1)
                nxt.append(len(parents) - 1)
        frontier = nxt
    if len(parents) < 1 + n_nodes:
        raise ValueError(f"branching {tuple(branching)} cannot hold {n_nodes} nodes")
    return parents


def tree_layout(parents: Sequence[int]) -> tuple[list[int], np.ndarray]:
    """(depth of each node, [T, T] uint8 tree mask: node i sees itself and its ancestors)."""
    T = len(parents)
    depth, mask = [0] * T, np.zeros((T, T), np.uint8)
    for i, p in enumerate(parents):
        if p >= 0:
            depth[i], mask[i] = depth[p] + 1, mask[p]
        mask[i, i] = 1
    return depth, mask


def _stats(ts: Sequence[float]) -> dict:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class SyntheticBench:
    """One synthetic model and its three sessions (dense, token, chunk), all with the same synthetic routing and the
    same cached prefix of P random tokens. Use as a context manager."""

    MODES = ("dense", "token", "chunk")

    def __init__(self, shape: str | synthetic.Shape, *, qtype: str = "Q4_0", vocab: int | str = "small",
                 seed: int = 0, threads: int = 2, routing: Routing = PAPER, prefix: int = 32, n_ctx: int = 256,
                 progress: bool = True):
        self.shape = (synthetic.SHAPES[shape] if isinstance(shape, str) else shape).with_vocab(vocab)
        self.path = synthetic.ensure(self.shape, qtype, seed, progress=progress)
        self.qtype, self.threads, self.prefix = qtype, threads, prefix
        self.model = Model(self.path)
        self.sessions = {m: self.model.session(n_ctx=n_ctx, n_batch=64, n_threads=threads, ffn_mode=m)
                         for m in self.MODES}
        rng = np.random.default_rng(seed)
        V = self.model.info.n_vocab
        self.prefix_tokens = rng.integers(3, V, prefix).tolist()
        self.tokens = rng.integers(3, V, 64).tolist()  # the tokens of decode runs and verification batches
        self.n_ctx = n_ctx
        self.single: dict = {}  # one-thread sessions for the output check, made when needed (_check)
        self.routing = None
        self.effective: dict = {}
        self.set_routing(routing)

    def __enter__(self) -> SyntheticBench:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for s in [*self.sessions.values(), *self.single.values()]:
            s.close()
        self.model.close()

    def set_routing(self, routing: Routing) -> None:
        """Synthetic routing on every session, and the prefix re-evaluated under it."""
        for s in [*self.sessions.values(), *self.single.values()]:
            self.effective = s.set_synthetic_routing(tls=routing.tls, cls=routing.cls, k=routing.k, seed=routing.seed)
            s.truncate(0)
            s.eval(self.prefix_tokens, logits="none")
        self.routing = routing

    def _single_sessions(self) -> dict:
        if not self.single:
            self.single = {m: self.model.session(n_ctx=self.n_ctx, n_batch=64, n_threads=1, ffn_mode=m)
                           for m in self.MODES}
            self.set_routing(self.routing)
        return self.single

    def routing_record(self) -> dict:
        return {"stated": asdict(self.routing), "effective": self.effective,
                "pattern": "routing_synth.c sliding band: A experts per position, U per any k consecutive positions"}

    # ---- one measured unit of work per kind; each leaves the session at the prefix ----

    def decode(self, mode: str, steps: int, sessions: dict | None = None) -> tuple[list[float], np.ndarray]:
        """`steps` consecutive single-token evaluations; (seconds per step, last logits [steps, V])."""
        s, out, ts = (sessions or self.sessions)[mode], [], []
        for i in range(steps):
            t0 = time.perf_counter()
            out.append(s.eval([self.tokens[i % len(self.tokens)]], logits="last"))
            ts.append(time.perf_counter() - t0)
        s.truncate(self.prefix)
        return ts, np.stack(out)

    def verify(self, mode: str, T: int, parents: Sequence[int] | None = None,
               sessions: dict | None = None) -> tuple[float, np.ndarray]:
        """One pass over T tokens with all logits: a chain (parents None) or a tree; (seconds, logits [T, V])."""
        s, toks = (sessions or self.sessions)[mode], self.tokens[:T]
        if parents is None:
            t0 = time.perf_counter()
            logits = s.eval(toks, logits="all")
        else:
            depth, mask = tree_layout(parents)
            pos = [self.prefix + d for d in depth]
            t0 = time.perf_counter()
            logits = s.eval(toks, pos=pos, mask=mask, logits="all")
        dt = time.perf_counter() - t0
        s.truncate(self.prefix)
        return dt, logits

    # ---- checked, interleaved measurements ----

    def _check(self, run, mode: str, what: str) -> float:
        """Sparse (mode) against dense logits of run(mode, sessions): at most 1e-3 of max |logit| apart with the
        benchmark's threads; else, with one thread, at most 1e-6. Several threads add the FFN's per-thread partial
        sums in another order on each path, and where an 8-bit activation rounding sits on a tie, that last bit flips
        it; the random weights of a synthetic MLA model (three more quantized inputs per layer) carry such a flip to
        ~1e-2 of the logits. With one thread the paths add in the same order, and agree (measured: bit for bit)."""
        def rel(sessions):
            got, want = run(mode, sessions), run("dense", sessions)
            if not (np.isfinite(got).all() and np.isfinite(want).all()):
                raise RuntimeError(f"{what}: non-finite logits")
            return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))

        err = rel(self.sessions)
        if err > 1e-3 and (err1 := rel(self._single_sessions())) > 1e-6:
            raise RuntimeError(f"{what}: sparse output differs from dense by {err:.2e} (relative to max |logit|), "
                               f"{err1:.2e} with one thread")
        return err

    def measure_decode(self, steps: int, repeats: int, modes: Sequence[str] = ("dense", "token")) -> dict[str, dict]:
        """Per-step decode time for each mode; outputs checked against dense first."""
        errs = {m: self._check(lambda mode, ss: self.decode(mode, steps, ss)[1], m, f"decode ({m})") for m in modes
                if m != "dense"}
        s = self.sessions[modes[-1]]
        s.reset_sparsity()
        self.decode(modes[-1], max(steps, 2 * self.routing.k))
        st = s.sparsity()
        measured = {"tls": st.tls, f"cls_{self.routing.k}": st.cls.get(self.routing.k) if self.routing.k <= 16 else None,
                    "expert_bytes_per_token": st.expert_bytes_per_token,
                    "dense_bytes_per_token": st.dense_bytes_per_token}
        times, tims = {m: [] for m in modes}, {m: [] for m in modes}
        for _ in range(repeats):
            for m in modes:
                self.sessions[m].reset_timings()
                times[m] += self.decode(m, steps)[0]
                tims[m].append(self.sessions[m].timings())
        return {m: {**_stats(times[m]), "check_rel_err": errs.get(m, 0.0), "measured_sparsity": measured,
                    "timings": _sum_timings(tims[m])} for m in modes}

    def measure_verify(self, T: int, repeats: int, parents: Sequence[int] | None = None,
                       modes: Sequence[str] = ("dense", "chunk")) -> dict[str, dict]:
        kind = "chain" if parents is None else "tree"
        errs = {m: self._check(lambda mode, ss: self.verify(mode, T, parents, ss)[1], m, f"{kind} T={T} ({m})")
                for m in modes if m != "dense"}
        times, tims = {m: [] for m in modes}, {m: [] for m in modes}
        for _ in range(repeats):
            for m in modes:
                self.sessions[m].reset_timings()
                times[m].append(self.verify(m, T, parents)[0])
                tims[m].append(self.sessions[m].timings())
        s = self.sessions["chunk"]
        s.reset_sparsity()
        self.verify("chunk", T, parents)
        bytes_chunk = s.sparsity().expert_bytes_per_token * T
        return {m: {**_stats(times[m]), "check_rel_err": errs.get(m, 0.0), "timings": _sum_timings(tims[m]),
                    **({"expert_bytes_per_pass": bytes_chunk} if m == "chunk" else {})} for m in modes}


def _sum_timings(ts: Sequence) -> dict:
    """Session.timings() of several measured runs, summed field by field (phases.phase_seconds divides by n_evals)."""
    ds = [asdict(t) for t in ts]
    return {k: sum(d[k] for d in ds) for k in ds[0]}


def _record(b: SyntheticBench, kind: str, T: int, mode: str, r: dict, **extra) -> dict:
    return {"synthetic": True, "shape": b.shape.name, "kind": kind, "T": T, "mode": mode,
            "routing": b.routing_record(), **extra, **r}


def bench_shape(shape: str, *, threads: int = 2, qtype: str = "Q4_0", vocab: int | str = "small",
                routing: Routing = PAPER, Ts: Sequence[int] = (2, 3, 4, 6, 8, 12, 16, 20, 25),
                branching: Sequence[int] = (4, 2, 2, 1), fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
                decode_steps: int = 16, repeats: int = 5, seed: int = 0, log=print) -> list[dict]:
    """All measurements for one shape: decode (T = 1), chain and tree verification for each T, and the active
    fraction sweep (T = 1 at TLS = 1 - a; a chain of 8 whose union is a, each token using 2a/3)."""
    out: list[dict] = []
    with SyntheticBench(shape, qtype=qtype, vocab=vocab, seed=seed, threads=threads, routing=routing) as b:
        log(f"{shape}: {b.path.name} ({b.path.stat().st_size / 1e6:.0f} MB), {threads} threads, routing "
            f"{b.effective}")
        b.verify("dense", max(Ts)), b.decode("dense", 2)  # page the weights in
        dec = b.measure_decode(decode_steps, repeats)
        for mode, r in dec.items():
            out.append(_record(b, "decode", 1, mode, r, tok_s=1.0 / r["median_s"]))
        log(f"  decode: dense {dec['dense']['median_s'] * 1e3:.1f} ms, sparse {dec['token']['median_s'] * 1e3:.1f} ms"
            f" per token")
        for kind in ("chain", "tree"):
            for T in Ts:
                parents = None if kind == "chain" else tree_parents(T - 1, branching)
                res = b.measure_verify(T, repeats, parents)
                for mode, r in res.items():
                    base = dec["dense" if mode == "dense" else "token"]["median_s"]
                    out.append(_record(b, kind, T, mode, r, ratio_to_own_decode=r["median_s"] / base,
                                       ratio_to_dense_decode=r["median_s"] / dec["dense"]["median_s"],
                                       **({"branching": list(branching), "parents": parents} if parents else {})))
                log(f"  {kind} T={T:>2}: dense {res['dense']['median_s'] * 1e3:7.1f} ms, sparse chunk "
                    f"{res['chunk']['median_s'] * 1e3:7.1f} ms ({res['chunk']['median_s'] / dec['dense']['median_s']:.2f}"
                    f"x a dense decode step)")
        for a in fractions:
            b.set_routing(Routing(tls=1 - a, cls=1 - a, k=routing.k, seed=routing.seed))
            r1 = b.measure_decode(4, repeats)
            for mode, r in r1.items():
                out.append(_record(b, "sweep_decode", 1, mode, r, active_fraction=a))
            b.set_routing(Routing(tls=1 - 2 * a / 3, cls=1 - a, k=8, seed=routing.seed))
            r8 = b.measure_verify(8, repeats)
            for mode, r in r8.items():
                out.append(_record(b, "sweep_chain8", 8, mode, r, active_fraction=a))
            log(f"  active {a:.2f}: T=1 sparse/dense {r1['token']['median_s'] / r1['dense']['median_s']:.2f}, "
                f"T=8 chunk/dense {r8['chunk']['median_s'] / r8['dense']['median_s']:.2f}")
    return out


def replayed_speculation(shape: str | synthetic.Shape, accepted_hist: Mapping[int, int], n_nodes: int,
                         branching: Sequence[int] | None = None, *, routing: Routing = PAPER, threads: int = 2,
                         qtype: str = "Q4_0", vocab: int | str = "small", seed: int = 0, repeats: int = 7,
                         draft_s_per_step: float = 0.0, bench: SyntheticBench | None = None) -> dict:
    """Replayed tok/s of sparse + speculation against plain dense decode on a synthetic configuration.

    accepted_hist: {accepted draft tokens in a step: steps}, measured on the real shipped model (SpecStats.accepted_hist)
    with a draft of `n_nodes` nodes: a chain (branching None) or a BFS tree of that shape. Each step verifies
    T = n_nodes + 1 tokens (the root and the draft) in one pass and emits accepted + 1 tokens. Measured here, on the
    synthetic model at `routing`, alternating: the dense decode step, the sparse decode step (token path), the
    sparse verify step (chunk path) and the dense verify step, each after checking sparse == dense. Then
      tok/s = mean(accepted + 1) / (verify step + draft_s_per_step)       (speculation)
      tok/s = 1 / decode step                                               (plain decode)
    draft_s_per_step (the drafter's own time per step, measured with the real drafter) defaults to 0: an upper bound
    for drafters that cost time. Pass `bench` to reuse an open SyntheticBench (its routing is used)."""
    hist = {int(k): int(v) for k, v in accepted_hist.items()}
    if not hist or any(v < 0 for v in hist.values()) or sum(hist.values()) == 0:
        raise ValueError("accepted_hist must map accepted lengths to non-negative step counts, some > 0")
    if n_nodes < 1:
        raise ValueError("n_nodes must be >= 1")
    parents = None if branching is None else tree_parents(n_nodes, branching)
    max_acc = n_nodes if parents is None else max(tree_layout(parents)[0])
    if min(hist) < 0 or max(hist) > max_acc:
        raise ValueError(f"accepted lengths must be 0..{max_acc} for this draft (got {min(hist)}..{max(hist)})")
    T = n_nodes + 1
    steps = sum(hist.values())
    tokens_per_step = sum((k + 1) * v for k, v in hist.items()) / steps
    own = bench is None
    b = bench or SyntheticBench(shape, qtype=qtype, vocab=vocab, seed=seed, threads=threads, routing=routing,
                                progress=False)
    try:
        b.verify("dense", T, parents)  # page the weights in
        dec = b.measure_decode(8, repeats)
        ver = b.measure_verify(T, repeats, parents)
        load = _load()
    finally:
        if own:
            b.close()
    t_dense1, t_sparse1 = dec["dense"]["median_s"], dec["token"]["median_s"]
    t_ver_sparse, t_ver_dense = ver["chunk"]["median_s"], ver["dense"]["median_s"]
    tok_s = {"dense_decode": 1.0 / t_dense1, "sparse_decode": 1.0 / t_sparse1,
             "dense_speculation": tokens_per_step / (t_ver_dense + draft_s_per_step),
             "sparse_speculation": tokens_per_step / (t_ver_sparse + draft_s_per_step)}
    return {"label": "replayed", "synthetic": True, "shape": b.shape.name, "shape_config": asdict(b.shape),
            "qtype": b.qtype, "threads": b.threads, "routing": b.routing_record(),
            "draft": {"kind": "chain" if parents is None else "tree", "n_nodes": n_nodes, "T": T,
                      "branching": None if branching is None else list(branching), "parents": parents},
            "accepted_hist": {str(k): v for k, v in sorted(hist.items())}, "steps": steps,
            "mean_accepted": tokens_per_step - 1, "tokens_per_step": tokens_per_step,
            "draft_s_per_step": draft_s_per_step,
            "step_s": {"dense_decode": dec["dense"], "sparse_decode": dec["token"], "sparse_verify": ver["chunk"],
                       "dense_verify": ver["dense"]},
            "tok_s": tok_s, "speedup_vs_dense_decode": {k: v / tok_s["dense_decode"] for k, v in tok_s.items()},
            "load_avg": load,
            "note": "replayed: verify/decode times measured on a synthetic (random-weight) model with synthetic "
                    "routing; acceptance replayed from the given distribution, not produced by this model"}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "tier": _sparrow.kernel_tier(), "features": _sparrow.cpu_features(), "python": sys.version.split()[0]}


def print_table(records: Sequence[dict]) -> None:
    rows = [r for r in records if r["kind"] in ("decode", "chain", "tree")]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        dd = next(r for r in rows if r["shape"] == shape and r["kind"] == "decode" and r["mode"] == "dense")
        sd = next(r for r in rows if r["shape"] == shape and r["kind"] == "decode" and r["mode"] == "token")
        print(f"\n{shape} (SYNTHETIC: random weights, routing {sd['routing']['effective']}): decode dense "
              f"{1 / dd['median_s']:.1f} tok/s, sparse {1 / sd['median_s']:.1f} tok/s ({dd['median_s'] / sd['median_s']:.2f}x)")
        print(f"{'kind':>5} {'T':>3} {'dense ms':>9} {'sparse ms':>10} {'[min, max]':>17} {'sparse/dense':>12} "
              f"{'sparse/dense T=1':>16}")
        for kind in ("chain", "tree"):
            for T in sorted({r["T"] for r in rows if r["shape"] == shape and r["kind"] == kind}):
                d = next(r for r in rows if r["shape"] == shape and r["kind"] == kind and r["T"] == T and r["mode"] == "dense")
                c = next(r for r in rows if r["shape"] == shape and r["kind"] == kind and r["T"] == T and r["mode"] == "chunk")
                print(f"{kind:>5} {T:>3} {d['median_s'] * 1e3:>9.1f} {c['median_s'] * 1e3:>10.1f} "
                      f"[{c['min_s'] * 1e3:>6.1f}, {c['max_s'] * 1e3:>6.1f}] {c['median_s'] / d['median_s']:>12.3f} "
                      f"{c['ratio_to_dense_decode']:>16.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=None, choices=sorted(synthetic.SHAPES),
                    help="default 0.5b 1.2b (0.1b with --quick); 3b on request")
    ap.add_argument("--quick", action="store_true", help="0.1b, T in 2 4 8 16 25, 3 fractions, 3 repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--type", default="Q4_0", choices=synthetic.QTYPES)
    ap.add_argument("--vocab", default="small", help=f'"small" ({synthetic.SMALL_VOCAB}), "real" '
                    f'({synthetic.REAL_VOCAB}) or a number')
    ap.add_argument("--tls", type=float, default=PAPER.tls)
    ap.add_argument("--cls", type=float, default=PAPER.cls)
    ap.add_argument("--k", type=int, default=PAPER.k, help="chunk length of the stated CLS")
    ap.add_argument("--T", nargs="*", type=int, default=None, help="verification sizes (default 2 3 4 6 8 12 16 20 25)")
    ap.add_argument("--branching", nargs="*", type=int, default=[4, 2, 2, 1], help="tree shape (BFS)")
    ap.add_argument("--fractions", nargs="*", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", default=None, metavar="HIST_JSON",
                    help='also replay speculation: {"accepted": steps, ...} (a file or inline JSON)')
    ap.add_argument("--replay-nodes", type=int, default=4, help="draft nodes of the replayed distribution")
    ap.add_argument("--replay-branching", nargs="*", type=int, default=None, help="tree shape (default: a chain)")
    ap.add_argument("--out", default=None, help="write JSON here")
    a = ap.parse_args(argv)
    shapes = a.shapes or (["0.1b"] if a.quick else ["0.5b", "1.2b"])
    Ts = a.T or ([2, 4, 8, 16, 25] if a.quick else [2, 3, 4, 6, 8, 12, 16, 20, 25])
    fractions = a.fractions or ([0.1, 0.3, 1.0] if a.quick else [0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    repeats = a.repeats or (3 if a.quick else 5)
    routing = Routing(a.tls, a.cls, a.k, a.seed)
    load0, t0 = _load(), time.time()
    records, replays = [], []
    for shape in shapes:
        records += bench_shape(shape, threads=a.threads, qtype=a.type, vocab=a.vocab, routing=routing, Ts=Ts,
                               branching=a.branching, fractions=fractions, decode_steps=a.decode_steps,
                               repeats=repeats, seed=a.seed)
        if a.replay:
            src = Path(a.replay)
            hist = json.loads(src.read_text() if src.exists() else a.replay)
            replays.append(replayed_speculation(shape, hist, a.replay_nodes, a.replay_branching, routing=routing,
                                                threads=a.threads, qtype=a.type, vocab=a.vocab, seed=a.seed))
            rp = replays[-1]
            print(f"  replayed ({rp['draft']['kind']} of {a.replay_nodes}, {rp['tokens_per_step']:.2f} tokens/step): "
                  f"sparse+spec {rp['tok_s']['sparse_speculation']:.1f} tok/s vs dense decode "
                  f"{rp['tok_s']['dense_decode']:.1f} ({rp['speedup_vs_dense_decode']['sparse_speculation']:.2f}x)")
    print_table(records)
    doc = {"schema": SCHEMA, "synthetic": True, "machine": machine(), "time": t0, "duration_s": time.time() - t0,
           "load_avg": {"start": load0, "end": _load()},
           "config": {"shapes": {s: asdict(synthetic.SHAPES[s].with_vocab(a.vocab)) for s in shapes},
                      "qtype": a.type, "threads": a.threads, "routing": asdict(routing), "T": Ts,
                      "branching": a.branching, "fractions": fractions, "repeats": repeats,
                      "decode_steps": a.decode_steps, "prefix_tokens": 32,
                      "attention": {s: synthetic.SHAPES[s].attention for s in shapes}},
           "records": records, "replayed": replays}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
