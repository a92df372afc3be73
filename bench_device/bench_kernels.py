"""Kernel benchmark: matmul time per call for every tier and weight type on the SmolLM2-135M shapes, and the
attention of one of its kv heads (3 query heads) for T tokens after 64 and 1024 cached slots.

Shape legend: T = tokens per call, K = reduction length, N = weight rows.

For each (shape N x K, type, T) the tiers are timed side by side in interleaved rounds (A B A B ...), single-threaded
(this process is pinned to one CPU; the C hook is single-threaded), cycling through enough copies of the weights that
they come from DRAM as in a real forward pass (--cold-mb; 0 = hot in cache). Each result is checked against the
`ref` tier before timing. Reported: median seconds per call with min/max over all repeats, the ratio to T=1 of the
same tier, and GB/s of weight bytes read. Writes JSON (--out) and prints a table. A progress bar (stderr) counts
the (shape, type, T) cells; the whole default run takes several minutes (over 3 on a 2-core machine), --shapes,
--types and --T choose a part of it. The attention rows ("attention n=64", "attention n=1024"; --no-attention skips
them) time testing.attn_time: the scores, softmax and weighted sums as the forward pass runs them for one kv head,
single-threaded with the cache hot, i.e. the compute a verification pass adds, not the cache's DRAM traffic.

For tiers that repack quantized weights at model load (kernels.h pack/matmul_packed), the packed kernel is timed as
its own column "<tier>+packed" in the same interleaved rounds (--no-packed to skip); its GB/s counts the same GGUF
bytes as the unpacked kernel so the two are comparable.

    python -m sparrow.bench_device.bench_kernels --out kernels.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
from tqdm import tqdm

from ..runtime import _sparrow
from .profile import cpu_model

testing = _sparrow.testing

# (name, N, K, types): the SmolLM2-135M matrices (hidden 576, kv 192, ffn 1536, tied Q8_0 vocab head 49152)
SHAPES = [
    ("attn_q/o 576x576", 576, 576, ["Q4_0", "Q4_1", "Q8_0", "F16"]),
    ("attn_k/v 192x576", 192, 576, ["Q4_0", "Q4_1", "Q8_0", "F16"]),
    ("ffn_up 1536x576", 1536, 576, ["Q4_0", "Q4_1", "Q8_0", "F16"]),
    ("ffn_down 576x1536", 576, 1536, ["Q4_0", "Q4_1", "Q8_0", "F16"]),
    ("head 49152x576", 49152, 576, ["Q8_0"]),
]
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "BF16": 30}


def make_weights(type_name: str, n: int, k: int, seed: int = 0) -> bytes:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return b"".join(testing.quantize(TYPE_IDS[type_name], row) for row in w)


PACKED = "+packed"


def variants(args: argparse.Namespace, tid: int, n: int, k: int) -> list[str]:
    """The kernels to time: each tier, and "<tier>+packed" where that tier packs this type and shape."""
    out = []
    for tier in args.tiers:
        out.append(tier)
        if not args.no_packed and testing.packed_size(tier, tid, n, k) > 0:
            out.append(tier + PACKED)
    return out


def time_calls(tier: str, tid: int, w: bytes, n: int, x: np.ndarray, reps: int, copies: int) -> list[float]:
    if tier.endswith(PACKED):
        return testing.matmul_packed_time(tier[: -len(PACKED)], tid, w, n, x, reps, copies)
    return testing.matmul_time(tier, tid, w, n, x, reps, copies)


def check(tier: str, tid: int, w: bytes, n: int, x: np.ndarray, y_ref: np.ndarray) -> float:
    if tier.endswith(PACKED):
        y = testing.matmul_packed(tier[: -len(PACKED)], tid, w, n, x)
    else:
        y = testing.matmul(tier, tid, w, n, x)
    err = float(np.abs(y - y_ref).max() / max(1e-30, float(np.abs(y_ref).max())))
    if err > 1e-4 and not os.environ.get("BENCH_NOCHECK"):
        raise SystemExit(f"{tier} differs from ref: max rel err {err:.3g}")
    return err


# Attention of one SmolLM2 kv head (3 query heads of 64) for T tokens after n cached slots, as the forward pass runs
# it (testing.attn_time: scores, softmax, weighted sums), single-threaded, the cache hot: its compute, not DRAM.
ATTENTION = [("attention n=64", 64, 3), ("attention n=1024", 1024, 3)]


def attention_shapes(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """The ATTENTION rows --shapes keeps (all without it); --types keeps them when it names F16."""
    return [a for a in ATTENTION if (not args.shapes or any(s in a[0] for s in args.shapes))
            and (not args.types or "F16" in args.types)]


def attention_cells(args: argparse.Namespace, bar) -> list[dict]:
    out = []
    tiers = [t for t in args.tiers if t in testing.tiers()]
    for name, n, G in attention_shapes(args):
        for T in args.T:
            reps = {t: max(3, min(2000, int(args.min_time / max(min(testing.attn_time(t, G, T, n, 64, 3)), 1e-7))))
                    for t in tiers}
            times: dict[str, list[float]] = {t: [] for t in tiers}
            for _ in range(args.rounds):  # A B A B ...
                for t in tiers:
                    times[t] += testing.attn_time(t, G, T, n, 64, reps[t])
            bar.set_postfix_str(f"{name} T={T}")
            bar.update(1)
            kv_bytes = (n + T) * 64 * 2 * 2
            for t, ts in times.items():
                med = statistics.median(ts)
                out.append({"shape": name, "N": n, "K": 64, "type": "F16", "T": T, "tier": t, "median_s": med,
                            "min_s": min(ts), "max_s": max(ts), "n": len(ts), "weight_bytes": kv_bytes,
                            "gbps": kv_bytes / med / 1e9})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiers", nargs="*", default=[t for t in testing.tiers() if t != "ref"] or ["ref"],
                    help="tiers to time (default: the SIMD tiers; every tier is checked against ref anyway)")
    ap.add_argument("--T", nargs="*", type=int, default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--shapes", nargs="*", help="substrings of shape names to keep")
    ap.add_argument("--types", nargs="*", help="weight types to keep")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per tier")
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds of calls per round")
    ap.add_argument("--cold-mb", type=float, default=96, help="spread weight copies over this many MB (0: hot)")
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the first allowed)")
    ap.add_argument("--out", default=None, help="write JSON here")
    ap.add_argument("--no-packed", action="store_true", help="do not time the packed kernels")
    ap.add_argument("--no-attention", action="store_true", help="do not time the attention kernels")
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else cpus[0]
    os.sched_setaffinity(0, {cpu})
    machine = {"cpu_model": cpu_model(), "platform": platform.platform(), "processor": platform.processor(),
               "cpu_features": _sparrow.cpu_features(), "pinned_cpu": cpu, "threads": 1,
               "cold_mb": args.cold_mb, "best_tier": _sparrow.kernel_tier()}
    results = []
    tmax = max(args.T)
    cells = [(name, n, k, tname) for name, n, k, types in SHAPES for tname in types
             if (not args.shapes or any(s in name for s in args.shapes)) and (not args.types or tname in args.types)]
    t_start = time.perf_counter()
    n_att = 0 if args.no_attention else len(attention_shapes(args))
    bar = tqdm(total=(len(cells) + n_att) * len(args.T), desc="kernels", unit="cell", file=sys.stderr)
    for name, n, k, tname in cells:
        tid = TYPE_IDS[tname]
        w = make_weights(tname, n, k)
        x_all = np.random.default_rng(1).standard_normal((tmax, k)).astype(np.float32)
        y_ref_all = testing.matmul("ref", tid, w, n, x_all)  # rows of y are independent of T
        copies = max(1, int(args.cold_mb * 2**20 / len(w))) if args.cold_mb > 0 else 1
        for T in args.T:
            x = np.ascontiguousarray(x_all[:T])
            times: dict[str, list[float]] = {t: [] for t in variants(args, tid, n, k)}
            reps = {}
            for tier in times:
                check(tier, tid, w, n, x, y_ref_all[:T])
                one = statistics.median(time_calls(tier, tid, w, n, x, 3, copies))
                reps[tier] = max(3, min(2000, int(args.min_time / max(one, 1e-7))))
            for _ in range(args.rounds):  # A B A B ...
                for tier in times:
                    times[tier] += time_calls(tier, tid, w, n, x, reps[tier], copies)
            bar.set_postfix_str(f"{name.split()[0]} {tname} T={T}")
            bar.update(1)
            for tier, ts in times.items():
                med = statistics.median(ts)
                results.append({"shape": name, "N": n, "K": k, "type": tname, "T": T, "tier": tier,
                                "median_s": med, "min_s": min(ts), "max_s": max(ts), "n": len(ts),
                                "weight_bytes": len(w), "gbps": len(w) / med / 1e9})
    if not args.no_attention:
        results += attention_cells(args, bar)
    bar.close()
    duration = time.perf_counter() - t_start
    base = {(r["shape"], r["type"], r["tier"]): r["median_s"] for r in results if r["T"] == 1}
    for r in results:
        b = base.get((r["shape"], r["type"], r["tier"]))
        r["ratio_T1"] = r["median_s"] / b if b else None

    print(f"# single thread, CPU {cpu}, features: {machine['cpu_features']}, cold_mb={args.cold_mb}")
    print(f"{'shape':20s} {'type':5s} {'tier':14s} " + " ".join(f"{'T=' + str(T):>20s}" for T in args.T))
    for name, n, k, types in SHAPES:
        for tname in types:
            for tier in variants(args, TYPE_IDS[tname], n, k):
                row = [r for r in results if r["shape"] == name and r["type"] == tname and r["tier"] == tier]
                if not row:
                    continue
                cells = []
                for T in args.T:
                    r = next((r for r in row if r["T"] == T), None)
                    cells.append(f"{r['median_s'] * 1e6:8.1f}us {r['ratio_T1']:4.2f}x {r['gbps']:4.1f}" if r else "")
                print(f"{name:20s} {tname:5s} {tier:14s} " + " ".join(f"{c:>20s}" for c in cells))
    for name, n, _ in ATTENTION:
        for tier in [t for t in args.tiers if t in testing.tiers()]:
            row = {r["T"]: r for r in results if r["shape"] == name and r["tier"] == tier}
            if row:
                cells = [f"{row[T]['median_s'] * 1e6:8.1f}us {row[T]['ratio_T1']:4.2f}x {row[T]['gbps']:4.1f}"
                         if T in row else "" for T in args.T]
                print(f"{name:20s} {'F16':5s} {tier:14s} " + " ".join(f"{c:>20s}" for c in cells))
    print("# cell: median time per call, ratio to T=1 (same tier), GB/s of weights read (attention: of the keys and "
          "values, hot in the caches)")
    print(f"# {len(results)} cells in {duration:.0f} s on {machine['cpu_model']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "time": time.time(), "duration_s": duration, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
