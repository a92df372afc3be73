"""Two developer builds of libsparrow, one pass at a time: does a change to the library make a pass of T tokens faster?

Shape legend: T = tokens in one eval call, P = tokens already cached before it.

On a shared machine whose speed drifts over seconds (a cloud VM), a benchmark that runs one build for a few seconds,
then the other, measures the drift as much as the change. Here each build lives in a worker process of its own
(SPARROW_BUILD_DIR set to its tools/dev_build.sh folder before the runtime is imported), both load the model and
cache the same P tokens, and the parent asks them in turn for a few passes each (about 0.1 s), the order swapped every
round, for every T. A pass: the cache cut back to P, then T tokens in one call (T = 1 is a decode step; larger T a
verification pass or a prefill chunk). Per build and T: the median over all passes (min/max), and after / before.

    python -m sparrow.bench_device.bench_builds MODEL.gguf --before /work/base/build/dev --after build/dev \\
        --sizes 1,2,4,8,16,64 --rounds 40 --out bench_device/results/builds_X.json

--generator measures the C generator instead (sp_generator, issue 15): per drafter, greedy and with chat's sampling
defaults, 64 tokens on each of 12 chat prompts (bench_adaptive's), the builds alternating per drafter and round: the
generator's own time per step outside the forward pass (sp_generator_stats loop_s / steps) and tokens/s, medians over
rounds, after / before.

Threads pinned (the same CPUs for both workers: they never run at once); the CPU named.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

from .bench_adaptive import cpu_name, pin_threads

SCHEMA = "sparrow.bench_builds/1"
TEXT = "The quick brown fox jumps over the lazy dog while the lighthouse keeper counts the waves. " * 40
PASS_BUDGET_S = 0.1  # about this long per build per turn


def _load_build(build: str, threads: int) -> dict:
    """In a worker, before anything imports sparrow.runtime: point it at build (runtime/__init__.py reads
    SPARROW_BUILD_DIR on import), pin the threads; what the worker says about itself."""
    os.environ["SPARROW_BUILD_DIR"] = build
    pinned = pin_threads(threads)
    from ..runtime import _sparrow

    return {"pinned": pinned, "kernel_tier": _sparrow.kernel_tier(), "library": _sparrow.__file__}


def worker(build: str, model: str, threads: int, cached: int, n_ctx: int, conn) -> None:
    """One build's runtime: caches `cached` tokens of TEXT, then answers (T, n) with n pass times in seconds."""
    info = _load_build(build, threads)
    from ..runtime import Model

    with Model(model) as m:
        text = m.tokenize(TEXT)
        s = m.session(n_ctx=n_ctx, n_threads=threads)
        s.eval(text[:cached])
        conn.send(info)
        while (cmd := conn.recv()) is not None:
            T, n = cmd
            times = []
            for _ in range(n):
                s.truncate(cached)
                t0 = time.perf_counter()
                s.eval(text[cached:cached + T])
                times.append(time.perf_counter() - t0)
            conn.send(times)
        s.close()


GENERATOR_CONFIGS = [("greedy", d) for d in ("none", "prompt-lookup", "recycling", "hybrid", "adaptive")] + \
    [("sampling", d) for d in ("none", "recycling", "adaptive")]


def generator_worker(build: str, model: str, threads: int, n_prompts: int, tokens: int, conn) -> None:
    """One build's generator: answers (mode, drafter) with (loop us per step, tok/s) over the prompts (the first
    request of each configuration runs them once untimed: Token Recycling's matrix and the planners warm)."""
    info = _load_build(build, threads)
    from ..runtime import Model
    from ..runtime.native import Generator, SamplerParams
    from .bench_adaptive import PAYS, UNSEEN_CHAT
    from .bench_speculative import chat

    with Model(model) as m:
        prompts = [m.tokenize(chat(t), parse_special=True) for t in (UNSEEN_CHAT + PAYS)[:n_prompts]]
        s = m.session(n_ctx=1024, n_threads=threads)
        conn.send(info)
        gens = {}

        def run_all(g) -> int:
            n = 0
            for p in prompts:
                s.truncate(0)
                g.start(p)
                n += sum(1 for _ in iter(g.next, None))
            return n

        while (cmd := conn.recv()) is not None:
            mode, drafter = cmd
            if cmd not in gens:
                params = SamplerParams.greedy() if mode == "greedy" else SamplerParams.chat(seed=7)
                gens[cmd] = Generator(s, params=params, max_tokens=tokens, drafter=drafter, stop_at_eog=False)
                run_all(gens[cmd])
            g = gens[cmd]
            g.reset_stats()
            t0 = time.perf_counter()
            n = run_all(g)
            dt = time.perf_counter() - t0
            st = g.stats()
            conn.send((st.loop_s / max(st.steps, 1) * 1e6, n / dt))
        for g in gens.values():
            g.close()
        s.close()


NAMES = ("before", "after")


def _turn(r: int) -> tuple[str, ...]:
    """The builds' order in round r: swapped every round."""
    return NAMES if r % 2 == 0 else NAMES[::-1]


@contextlib.contextmanager
def _pair(target, before: str, after: str, *args):
    """Both builds' workers, target(build, *args, conn) in spawned processes, their greetings read; yields (builds,
    info, ask) with ask(name, request) -> its answer (RuntimeError naming the build when a worker died); stops them
    on the way out."""
    builds = dict(zip(NAMES, (str(Path(before).resolve()), str(Path(after).resolve()))))
    ctx = mp.get_context("spawn")
    workers = {}
    for n, build in builds.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(build, *args, child), daemon=True)
        proc.start()
        child.close()
        workers[n] = (proc, parent)

    def ask(n: str, msg):
        proc, conn = workers[n]
        try:
            if msg is not None:
                conn.send(msg)
            return conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise RuntimeError(f"the {n} worker ({builds[n]}) died (exit code {proc.exitcode})") from None

    try:
        yield builds, {n: ask(n, None) for n in NAMES}, ask
    finally:
        for proc, conn in workers.values():
            if proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def run_generator(model: str, before: str, after: str, *, rounds: int = 3, threads: int = 2, n_prompts: int = 12,
                  tokens: int = 64, configs=GENERATOR_CONFIGS, progress=None) -> dict:
    """--generator (module doc) as a library call. Raises RuntimeError when a worker dies."""
    with _pair(generator_worker, before, after, model, threads, n_prompts, tokens) as (builds, info, ask):
        got = {(n, c): [] for n in NAMES for c in configs}
        for r in range(rounds):
            for c in configs:
                for n in _turn(r):
                    got[(n, c)].append(ask(n, c))
            if progress:
                progress(r + 1, rounds)
    results = []
    for c in configs:
        rec = {"mode": c[0], "drafter": c[1]}
        for n in NAMES:
            rec[n] = {"loop_us_per_step": statistics.median(x[0] for x in got[(n, c)]),
                      "tok_s": _stats([x[1] for x in got[(n, c)]])}
        rec["tok_s_after_over_before"] = rec["after"]["tok_s"]["median"] / rec["before"]["tok_s"]["median"]
        results.append(rec)
    return {"schema": SCHEMA, "mode": "generator",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "model": os.path.basename(model), "threads": threads, "prompts": n_prompts, "tokens": tokens,
            "rounds": rounds, "builds": builds, "workers": info, "results": results}


def run(model: str, before: str, after: str, *, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 64), rounds: int = 40,
        threads: int = 2, cached: int = 64, progress=None) -> dict:
    """The benchmark as a library call (module doc). Raises RuntimeError when a worker dies."""
    n_ctx = cached + max(sizes) + 16
    with _pair(worker, before, after, model, threads, cached, n_ctx) as (builds, info, ask):
        # passes per turn: about PASS_BUDGET_S of the slower build, from three timed passes each
        per_turn = {}
        for T in sizes:
            slow = max(statistics.median(ask(n, (T, 3))) for n in NAMES)
            per_turn[T] = max(1, min(50, int(PASS_BUDGET_S / max(slow, 1e-6))))
        times = {n: {T: [] for T in sizes} for n in NAMES}
        for r in range(rounds):
            for T in sizes:
                for n in _turn(r):
                    times[n][T] += ask(n, (T, per_turn[T]))
            if progress:
                progress(r + 1, rounds)
    results = []
    for T in sizes:
        b, a = _stats(times["before"][T]), _stats(times["after"][T])
        results.append({"T": T, "before_ms": {k: v * 1e3 if k != "n" else v for k, v in b.items()},
                        "after_ms": {k: v * 1e3 if k != "n" else v for k, v in a.items()},
                        "after_over_before": a["median"] / b["median"]})
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_name(), "model": os.path.basename(model), "threads": threads, "cached_tokens": cached,
            "rounds": rounds, "builds": builds, "workers": info, "passes_per_turn": per_turn, "results": results}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="GGUF file")
    ap.add_argument("--before", required=True, type=Path, help="developer build folder (tools/dev_build.sh) before")
    ap.add_argument("--after", required=True, type=Path, help="developer build folder after")
    ap.add_argument("--sizes", default="1,2,4,8,16,64", help="tokens per pass, comma-separated")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cached", type=int, default=64, help="tokens in the cache before each pass")
    ap.add_argument("--generator", action="store_true",
                    help="measure the C generator per drafter (loop time per step, tok/s) instead of passes")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    for d in (a.before, a.after):
        if not list(d.glob("_sparrow*")):
            raise SystemExit(f"{d}: no _sparrow module there (build one with tools/dev_build.sh)")
    try:
        sizes = tuple(int(x) for x in a.sizes.split(","))
    except ValueError:
        raise SystemExit(f"--sizes {a.sizes!r}: comma-separated token counts") from None
    if not sizes or min(sizes) < 1 or a.rounds < 1 or a.cached < 1:
        raise SystemExit("--sizes, --rounds and --cached must be positive")

    def progress(r: int, n: int) -> None:
        print(f"\rround {r}/{n}", end="", file=sys.stderr, flush=True)

    try:
        if a.generator:
            report = run_generator(a.model, str(a.before), str(a.after), rounds=a.rounds, threads=a.threads,
                                   progress=progress)
        else:
            report = run(a.model, str(a.before), str(a.after), sizes=sizes, rounds=a.rounds, threads=a.threads,
                         cached=a.cached, progress=progress)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    print(file=sys.stderr)
    if a.generator:
        print(f"{report['cpu']}; {report['model']}; {a.threads} threads; {report['prompts']} prompts x "
              f"{report['tokens']} tokens; {a.rounds} rounds")
        for r in report["results"]:
            b, f = r["before"], r["after"]
            print(f"{r['mode']:8} {r['drafter']:14} loop {b['loop_us_per_step']:6.1f} -> {f['loop_us_per_step']:6.1f} "
                  f"us/step  tok/s {b['tok_s']['median']:6.1f} -> {f['tok_s']['median']:6.1f} "
                  f"({r['tok_s_after_over_before']:.3f}x)")
        if a.out:
            a.out.write_text(json.dumps(report, indent=2))
        return report
    print(f"{report['cpu']}; {report['model']}; {a.threads} threads; {a.cached} cached tokens; {a.rounds} rounds")
    for r in report["results"]:
        b, f = r["before_ms"], r["after_ms"]
        print(f"T={r['T']:3d}  before {b['median']:8.3f} ms ({b['min']:.3f}-{b['max']:.3f})  after "
              f"{f['median']:8.3f} ms ({f['min']:.3f}-{f['max']:.3f})  after/before {r['after_over_before']:.3f}")
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
