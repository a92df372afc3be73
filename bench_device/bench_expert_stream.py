"""BlockFFN decode against its byte bound, per phase, with three forms of the experts' down halves (issue 21).

Shape legend: T = tokens in one pass (1 = decode; 8 = a chunk verified at once), E = experts, V = vocabulary.

Everything here is SYNTHETIC (bench_device/synthetic.py: the released shapes with random Q4_0 weights; the routing is
the native synthetic-routing switch at TLS 80% / CLS-8 70%). Three copies of one model are loaded side by side:
  - file: SPARROW_EXPERT_DOWN_PACK=0 at load -- each expert's down half stays a view of the file and the accumulate
    kernel reads it a 32-column piece of one row at a time (16..64 rows interleaved, a row's stride apart);
  - float: SPARROW_EXPERT_DOWN_INT8=0 -- the down half is repacked at load right after the expert's packed up half, in
    the tier's "down" streaming layout (kernels/pack.c), and accum_packed reads it front to back with float FMAs;
  - int8: the default -- the same place in the "down int8" layout, and accum_packed_i8 quantizes each token's
    coefficients (times the rows' block scales) to int8 per 16-row group and column block and sums with vpdpbusd.
For each copy three sessions (dense, token, chunk), 2 threads: the pool's worker is created while the process is
pinned to the second CPU and the calling thread is then pinned to the first (both threads pinned, one per core).
Timings alternate (variant x mode, repeated), reported as medians with min/max over single steps.

Bytes per token by phase are the weights each phase reads (the file's tensor sizes; packed copies are the same bytes
plus padding): attention (norms, MLA projections; the latent KV cache read of the 32-token prefix is left out, it is
< 1%), router (F32), experts (dense: all; token: the session's own expert-byte counter; chunk: the union's bytes of an
8-token pass over 8), LM head (the last row's logits only) (bench_device/phases.py). The bound is the native probe's
read bandwidth with the same threads (pinned) over buffers as large as the model's weights, split over the threads
(the working set decoding streams again and again), measured just before and just after each shape's timings (median
of both: a shared machine's bandwidth drifts); fraction of bound = (bytes per token / bandwidth) / time per token.
The large-buffer probe (1 GiB per thread) is recorded beside it: on a machine where streaming bandwidth falls with
the buffer's size beyond the model's (seen on a 2-core Intel Xeon KVM guest: 25 GB/s at 300 MB per thread, 15 GB/s
at 1 GiB) it is no bound of the model's decode.
Also per copy: thread 0's time in the experts' up and down halves of one dense layer run alone (the testing hook),
from the caches (layer 0 repeated) and from DRAM (all layers in turn): whether a half is bound by compute.
Per phase, time comes from Session.timings() (thread 0's clock, each phase ending at a barrier; the experts' up and
down shares are thread 0's own time inside the expert units).

    python -m sparrow.bench_device.bench_expert_stream --out bench_device/results/expert_stream_zen5_2t.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..runtime import Model, _sparrow
from . import phases, profile, synthetic

SCHEMA = "sparrow.bench.expert_stream/2"  # /2: the working-set probe is the bound; the DRAM probe kept
VARIANTS = ("file", "float", "int8")
ENV = {"file": {"SPARROW_EXPERT_DOWN_PACK": "0"}, "float": {"SPARROW_EXPERT_DOWN_INT8": "0"}, "int8": {}}
MODES = ("dense", "token", "chunk")


def _stats(xs: Sequence[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


class Copy:
    """One loaded copy of the model (a variant of VARIANTS) and its three sessions, the prefix evaluated."""

    def __init__(self, path: Path, variant: str, threads: int, prefix: list[int], cpus: list[int] | None):
        saved = {k: os.environ.pop(k, None) for k in ("SPARROW_EXPERT_DOWN_PACK", "SPARROW_EXPERT_DOWN_INT8")}
        os.environ.update(ENV[variant])
        try:
            self.model = Model(path)
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v
        if cpus:
            os.sched_setaffinity(0, {cpus[-1]})  # the pool's workers inherit this thread's affinity
        self.sessions = {m: self.model.session(n_ctx=256, n_batch=64, n_threads=threads, ffn_mode=m) for m in MODES}
        if cpus:
            os.sched_setaffinity(0, {cpus[0]})
        self.prefix = prefix
        for s in self.sessions.values():
            s.set_synthetic_routing(tls=0.8, cls=0.7, k=8, seed=0)
            s.eval(prefix, logits="none")

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.model.close()


def run_steps(s, tokens: list[int], prefix: int, T: int, steps: int) -> tuple[list[float], dict, np.ndarray]:
    """`steps` passes of T tokens (T = 1: consecutive decode steps; T > 1: one chunk pass each, rolled back);
    (seconds per pass, timings delta, last logits)."""
    s.reset_timings()
    ts, out = [], []
    for i in range(steps):
        toks = [tokens[(i + j) % len(tokens)] for j in range(T)] if T > 1 else [tokens[i % len(tokens)]]
        t0 = time.perf_counter()
        out.append(s.eval(toks, logits="last"))
        ts.append(time.perf_counter() - t0)
        if T > 1:
            s.truncate(prefix)
    s.truncate(prefix)
    return ts, asdict(s.timings()), np.stack(out)


def expert_halves(c: Copy, layers: int, reps: int = 100) -> dict:
    """Thread 0's time in the experts' up and down halves per layer (dense, one token, the FFN block alone through the
    testing hook): layer 0 again and again (its experts stay in the caches: compute) against all layers in turn (the
    weights come from DRAM). Where down takes as long from the caches as from DRAM, it is bound by compute."""
    from ..runtime.native import FFN_MODES
    s = c.sessions["dense"]
    x = np.random.default_rng(1).standard_normal((1, c.model.info.n_embd)).astype(np.float32)
    out = {}
    for name, seq in (("cached", [0]), ("dram", list(range(layers)))):
        s.reset_timings()
        n = 0
        while n < reps:
            for il in seq:
                _sparrow.testing.ffn_run(s.handle, il, x, None, FFN_MODES["dense"])
                n += 1
        tm = s.timings()
        out[name] = {"up_ms_per_layer": tm.ffn_up_s / n * 1e3, "down_ms_per_layer": tm.ffn_down_s / n * 1e3,
                     "experts_ms_per_layer": tm.ffn_experts_s / n * 1e3, "layers_run": n}
    s.reset_timings()
    return out


def bench_shape(shape: str, *, threads: int, steps: int, repeats: int, chunk: int, cpus: list[int] | None,
                probe: Callable[[int], list[float]], dram_mb: int, progress: bool = True,
                variants: Sequence[str] = VARIANTS) -> list[dict]:
    """Records of one shape. probe(bytes per thread) -> read bandwidth passes (GB/s), run just before and just after
    the timed steps with the working set (the model's weights split over the threads) and with dram_mb per thread.
    variants: the down-half forms to load (the comparisons with the file view only when "file" is among them)."""
    sh = synthetic.SHAPES[shape].with_vocab("small")
    path = synthetic.ensure(sh, "Q4_0", 0, progress=progress)
    pb = phases.phase_bytes(path)
    ws_per_thread = -(-sum(pb.values()) // threads)
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 4096, 32).tolist()
    tokens = rng.integers(3, 4096, 64).tolist()
    copies = {v: Copy(path, v, threads, prefix, cpus) for v in variants}
    try:
        # checks, with one thread (several threads add partial sums in another order per path, and an 8-bit
        # activation rounding on a tie can flip: bench_synthetic's _check): each variant's sparse decode and chunk
        # outputs equal its dense ones within 1e-6 of max |logit|; file vs float and file vs int8 are recorded (float:
        # other summation order; int8: the coefficients' 8-bit rounding)
        outs = {}
        for v, c in copies.items():
            ones = {m: c.model.session(n_ctx=256, n_batch=64, n_threads=1, ffn_mode=m) for m in MODES}
            try:
                for s1 in ones.values():
                    s1.set_synthetic_routing(tls=0.8, cls=0.7, k=8, seed=0)
                    s1.eval(prefix, logits="none")
                for T in (1, chunk):
                    want = run_steps(ones["dense"], tokens, 32, T, 4)[2]
                    outs[(v, T)] = want
                    for m in ("token", "chunk"):
                        got = run_steps(ones[m], tokens, 32, T, 4)[2]
                        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                        if err > 1e-6:
                            raise RuntimeError(f"{shape} {v} T={T}: {m} differs from dense by {err:.2e}")
            finally:
                for s1 in ones.values():
                    s1.close()
        a = outs.get(("file", 1))
        rel_err = {v: None if a is None else float(np.max(np.abs(outs[(v, 1)] - a)) / np.max(np.abs(a)))
                   for v in variants}
        nmse = {v: None if a is None else float(np.mean((outs[(v, 1)] - a) ** 2) / np.var(a)) for v in variants}
        # expert bytes per token: token path (counter over 2k decode steps), chunk path (one chunk pass / chunk)
        s = copies[variants[-1]].sessions["token"]
        s.reset_sparsity()
        run_steps(s, tokens, 32, 1, 16)
        token_expert = s.sparsity().expert_bytes_per_token
        s = copies[variants[-1]].sessions["chunk"]
        s.reset_sparsity()
        run_steps(s, tokens, 32, chunk, 1)
        chunk_expert = s.sparsity().expert_bytes_per_token
        halves = {v: expert_halves(c, c.model.info.n_layer) for v, c in copies.items()}
        configs = [("dense", 1, pb["experts"]), ("token", 1, token_expert), ("chunk", chunk, chunk_expert)]
        times = {(v, m): [] for v in variants for m, _, _ in configs}
        tims = {(v, m): [] for v in variants for m, _, _ in configs}
        bw_runs, dram_runs = probe(ws_per_thread), probe(dram_mb << 20)
        for _ in range(repeats):
            for m, T, _ in configs:
                for v in variants:
                    ts, tm, _ = run_steps(copies[v].sessions[m], tokens, 32, T, steps if T == 1 else max(4, steps // 4))
                    times[(v, m)] += ts
                    tims[(v, m)].append(tm)
        bw_runs += probe(ws_per_thread)
        dram_runs += probe(dram_mb << 20)
        bandwidth = statistics.median(bw_runs)
        records = []
        for m, T, expert_b in configs:
            per_pass = phases.pass_bytes(pb, expert_b * T)
            total = sum(per_pass.values())
            for v in variants:
                st = _stats(times[(v, m)])
                keys = ("attention_s", "ffn_s", "head_s", "ffn_router_s", "ffn_plan_s", "ffn_experts_s",
                        "ffn_up_s", "ffn_down_s", "ffn_reduce_s", "embed_s")
                n_ev = sum(t["n_evals"] for t in tims[(v, m)])
                summed = {k: sum(t[k] for t in tims[(v, m)]) for k in (*keys, "n_evals")}
                phase_s = {k: summed[k] / n_ev for k in keys}
                bound_s = total / (bandwidth * 1e9)
                records.append({
                    "synthetic": True, "shape": shape, "qtype": "Q4_0", "variant": v, "mode": m, "T": T,
                    "threads": threads, "pinned": bool(cpus),
                    "routing": {"tls": 0.8, "cls": 0.7, "k": 8, "seed": 0},
                    "s_per_pass": st, "tok_s": T / st["median"], "s_per_pass_all": times[(v, m)],
                    "bytes_per_pass": total, "bytes_per_token": total / T,
                    "bandwidth_gb_s": bandwidth, "bandwidth_runs": bw_runs,
                    "bandwidth_probe_bytes_per_thread": ws_per_thread,
                    "dram_bandwidth_gb_s": statistics.median(dram_runs), "dram_runs": dram_runs,
                    "dram_probe_bytes_per_thread": dram_mb << 20,
                    "bound_s_per_pass": bound_s, "fraction_of_bound": bound_s / st["median"],
                    "phase_s_per_pass": phase_s, "timings_summed": summed,
                    "phases": phases.phase_table(per_pass, phases.phase_seconds(summed), T, bandwidth),
                    "vs_file_max_rel_err": rel_err[v], "vs_file_logits_nmse": nmse[v], "expert_halves": halves[v]})
        return records
    finally:
        for c in copies.values():
            c.close()


def print_table(records: Sequence[dict]) -> None:
    print(f"{'shape':5} {'mode':6} {'T':>2} {'MB/tok':>7} | {'file ms':>8} {'frac':>5} | {'float ms':>8} {'frac':>5} | "
          f"{'int8 ms':>8} {'frac':>5} | {'int8/fl':>7} | int8 per phase: attn / router / experts (up, down) / head ms, "
          f"experts frac (float)")
    by = {(r["shape"], r["mode"], r["variant"]): r for r in records}
    for (shape, mode, v), r in by.items():
        if v != "int8":
            continue
        f, fl = by[(shape, mode, "file")], by[(shape, mode, "float")]
        p = r["phase_s_per_pass"]
        print(f"{shape:5} {mode:6} {r['T']:>2} {r['bytes_per_token'] / 1e6:7.1f} | "
              f"{f['s_per_pass']['median'] * 1e3:8.2f} {f['fraction_of_bound']:5.2f} | "
              f"{fl['s_per_pass']['median'] * 1e3:8.2f} {fl['fraction_of_bound']:5.2f} | "
              f"{r['s_per_pass']['median'] * 1e3:8.2f} {r['fraction_of_bound']:5.2f} | "
              f"{fl['s_per_pass']['median'] / r['s_per_pass']['median']:7.2f} | "
              f"{p['attention_s'] * 1e3:.2f} / {p['ffn_router_s'] * 1e3:.2f} / {p['ffn_experts_s'] * 1e3:.2f} "
              f"({p['ffn_up_s'] * 1e3:.2f}, {p['ffn_down_s'] * 1e3:.2f}) / {p['head_s'] * 1e3:.2f}, "
              f"{r['phases']['experts']['fraction_of_bound']:.2f} ({fl['phases']['experts']['fraction_of_bound']:.2f})")


AB_SCHEMA = "sparrow.bench.expert_stream_ab/1"


def compare_builds(builds: Sequence[str], *, rounds: int, args: Sequence[str]) -> dict:
    """Two developer builds (tools/dev_build.sh folders: before, after) in alternating rounds (A B, B A, ...), each
    round this benchmark in a subprocess with SPARROW_BUILD_DIR set and the int8 form only; per build, shape and path
    the steps of all rounds pooled (median, min/max), phases from the summed timings, the bound from all rounds'
    probe passes. A machine whose speed drifts over minutes (a shared VM) moves both builds alike."""
    import subprocess
    import tempfile

    names = ("before", "after")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(rounds):
            for n in names if rnd % 2 == 0 else names[::-1]:
                out = Path(tmp) / f"{n}{rnd}.json"
                env = {**os.environ, "SPARROW_BUILD_DIR": str(Path(builds[names.index(n)]).resolve())}
                subprocess.run([sys.executable, "-m", "sparrow.bench_device.bench_expert_stream", "--variants", "int8",
                                "--repeats", "1", *args, "--out", str(out)], env=env, check=True)
                runs[n].append(json.loads(out.read_text()))
                print(f"round {rnd + 1}/{rounds}: {n} done", file=sys.stderr)
    records = []
    for n in names:
        keys = [(r["shape"], r["mode"]) for r in runs[n][0]["records"]]
        for shape, mode in keys:
            recs = [r for d in runs[n] for r in d["records"] if (r["shape"], r["mode"]) == (shape, mode)]
            ts = [t for r in recs for t in r["s_per_pass_all"]]
            summed = {k: sum(r["timings_summed"][k] for r in recs) for k in recs[0]["timings_summed"]}
            bw = statistics.median([x for r in recs for x in r["bandwidth_runs"]])
            T, st = recs[0]["T"], _stats(ts)
            per_pass = {ph: v["bytes_per_pass"] for ph, v in recs[0]["phases"].items()}
            records.append({"build": n, "build_dir": builds[names.index(n)], "shape": shape, "mode": mode, "T": T,
                            "variant": "int8", "rounds": len(recs), "s_per_pass": st, "tok_s": T / st["median"],
                            "bytes_per_token": recs[0]["bytes_per_token"], "bandwidth_gb_s": bw,
                            "fraction_of_bound": recs[0]["bytes_per_pass"] / (bw * 1e9) / st["median"],
                            "phases": phases.phase_table(per_pass, phases.phase_seconds(summed), T, bw)})
    by = {(r["build"], r["shape"], r["mode"]): r for r in records}
    speedup = {f"{sh} {m}": by[("before", sh, m)]["s_per_pass"]["median"] / r["s_per_pass"]["median"]
               for (b, sh, m), r in by.items() if b == "after"}
    first = runs["after"][0]
    return {"schema": AB_SCHEMA, "synthetic": True, "cpu": first["cpu"], "machine": first["machine"],
            "tier": first["tier"], "threads": first["threads"], "pinned": first["pinned"], "rounds": rounds,
            "builds": dict(zip(names, builds)), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "speedup_after_over_before": speedup, "records": records}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.2b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--bw-mb", type=int, default=1024, help="the large-buffer probe's buffer per thread (MB)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--builds", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="compare two developer builds in alternating rounds (compare_builds), int8 form only")
    ap.add_argument("--rounds", type=int, default=4, help="with --builds: rounds (each runs both builds)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.builds:
        doc = compare_builds(a.builds, rounds=a.rounds,
                             args=["--shapes", *a.shapes, "--threads", str(a.threads), "--steps", str(a.steps),
                                   "--chunk", str(a.chunk), "--bw-mb", str(a.bw_mb), *(["--no-pin"] if a.no_pin else [])])
        for (sh_m, x) in doc["speedup_after_over_before"].items():
            print(f"{sh_m}: after {x:.3f}x as fast as before", file=sys.stderr)
        if a.out:
            Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {a.out}", file=sys.stderr)
        return
    allowed = sorted(os.sched_getaffinity(0))
    cpus = None if a.no_pin or len(allowed) < a.threads else allowed[:a.threads]
    def probe(nbytes: int) -> list[float]:
        # the probe pins its threads to the CPUs the calling thread may use: the whole set for the call (Copy pins
        # the calling thread to one CPU, and both probe threads on it read half the bandwidth)
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, set(allowed))
        try:
            return _sparrow.bench_read_bandwidth(a.threads, nbytes, 5, True)["gb_s"]
        finally:
            os.sched_setaffinity(0, mine)

    records = []
    for shape in a.shapes:
        records += bench_shape(shape, threads=a.threads, steps=a.steps, repeats=a.repeats, chunk=a.chunk,
                               cpus=cpus, probe=probe, dram_mb=a.bw_mb, variants=a.variants)
        r = records[-1]
        print(f"{shape}: read bandwidth (native probe, {a.threads} threads pinned, before and after the timings): "
              f"{r['bandwidth_gb_s']:.1f} GB/s with the weights' {r['bandwidth_probe_bytes_per_thread'] / 1e6:.0f} MB "
              f"per thread (the bound), {r['dram_bandwidth_gb_s']:.1f} GB/s with {a.bw_mb} MB per thread",
              file=sys.stderr)
    per_shape = {r["shape"]: r["bandwidth_runs"] for r in records}
    if cpus:
        os.sched_setaffinity(0, set(allowed))
    if set(a.variants) == set(VARIANTS):
        print_table(records)
    for r in records:
        if r["mode"] == "dense":
            h = r["expert_halves"]
            print(f"{r['shape']} {r['variant']:6} dense layer, thread 0 ms: up {h['cached']['up_ms_per_layer']:.3f} "
                  f"(cached) {h['dram']['up_ms_per_layer']:.3f} (DRAM), down {h['cached']['down_ms_per_layer']:.3f} "
                  f"(cached) {h['dram']['down_ms_per_layer']:.3f} (DRAM)")
    doc = {"schema": SCHEMA, "synthetic": True, "cpu": profile.cpu_model(), "machine": platform.machine(),
           "tier": _sparrow.kernel_tier() if hasattr(_sparrow, "kernel_tier") else None,
           "threads": a.threads, "pinned": bool(cpus), "load_avg": [round(x, 2) for x in os.getloadavg()],
           "bandwidth": {"gb_s": statistics.median([x for runs in per_shape.values() for x in runs]),
                         "per_shape": {sh: statistics.median(runs) for sh, runs in per_shape.items()},
                         "dram_gb_s": {r["shape"]: r["dram_bandwidth_gb_s"] for r in records},
                         "method": "native sp_bench_read_bandwidth, "
                         f"{a.threads} threads pinned, buffers of the model's weights split over the threads (the "
                         f"bound; dram_gb_s: {a.bw_mb} MB per thread), 5 passes just before and 5 just after each "
                         "shape's timings, median (records: each shape's own)"},
           "records": records}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
