"""Device profile: what this machine is (CPU, cores, SIMD features and kernel tier the runtime dispatches to, caches,
RAM, OS) and how fast it streams memory (read bandwidth for 1..N threads, the roofline of decoding).

    python -m bench_device.profile [--quick] [--json]

The bandwidth probe is native (sp_bench_read_bandwidth in native/src/bandwidth.c): each thread, pinned to its own
CPU where the OS allows, streams a private buffer (512 MB per thread; 128 MB with --quick) with 64-byte vector loads,
and the sum of every pass is checked against the buffer's known contents before the pass counts. All threads start
a pass together; bandwidth = total bytes / (last end - first start). Alongside it, as a cross-check, the same
measurement through numpy (float32 sums over a private array per thread, the GIL released inside the reduction),
which is a lower bound: numpy's pairwise float summation is slower than the memory on some machines. The roofline
uses the native probe; the numpy one is used only when the native module is not built. Medians with min/max over
repeats, after one warm-up pass.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np

NATIVE_METHOD = ("native sp_bench_read_bandwidth: a private {mb} MB buffer per thread, written by that thread, "
                 "read with 64-byte vector loads and four accumulators; threads {pinning}; every pass's sum checked "
                 "against the buffer's contents; GB/s = bytes read / (last thread end - first thread start); "
                 "{repeats} repeats after one warm-up")
BANDWIDTH_METHOD = ("numpy float32 sum over a private {mb} MB array per thread, threads started behind a barrier "
                    "(numpy releases the GIL in reductions); GB/s = bytes read / (last thread end - first thread "
                    "start); {repeats} repeats after one warm-up")


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: ")) and ":" in line:
                value = line.split(":", 1)[1].strip()
                if value and not value.isdigit():
                    return value
    except OSError:
        pass
    return platform.processor() or platform.machine()


def caches() -> list[dict]:
    out = []
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for d in sorted(base.glob("index*")):
        try:
            size = (d / "size").read_text().strip()
            level = int((d / "level").read_text())
            kind = (d / "type").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1024, "M": 2**20, "G": 2**30}.get(size[-1:].upper(), 1)
        nbytes = int(size[:-1]) * mult if size[-1:].isalpha() else int(size)
        out.append({"level": level, "type": kind, "size": size, "bytes": nbytes})
    return out


def runtime_features() -> dict:
    try:
        from runtime import _sparrow

        return {"cpu_features": _sparrow.cpu_features().split(), "kernel_tier": _sparrow.kernel_tier()}
    except (ImportError, AttributeError, OSError) as e:  # the native module is not built: say so rather than fail the profile
        return {"cpu_features": [], "kernel_tier": "unknown", "error": str(e)}


def device_profile() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        "logical_cores": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        **runtime_features(),
        "caches": caches(),
        "ram_total_bytes": vm.total,
        "ram_available_bytes": vm.available,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def read_bandwidth(threads: int, *, mb: int = 512, repeats: int = 5) -> dict:
    """GB/s reading `mb` MB per thread with `threads` threads at once: median/min/max over `repeats`."""
    n = mb * 2**20 // 4
    arrays = [np.ones(n, dtype=np.float32) for _ in range(threads)]  # written once, so the pages are really there
    barrier = threading.Barrier(threads + 1)
    done = threading.Barrier(threads + 1)
    stop = False
    sums = [0.0] * threads
    spans = [(0.0, 0.0)] * threads

    def work(i: int) -> None:
        while True:
            barrier.wait()
            if stop:
                return
            t0 = time.perf_counter()
            sums[i] = float(arrays[i].sum())
            spans[i] = (t0, time.perf_counter())
            done.wait()

    pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    gbs = []
    try:
        for r in range(repeats + 1):
            barrier.wait()
            done.wait()
            # each thread times itself: the coordinating thread may be scheduled late when threads fill the cores
            dt = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
            if not all(s == n for s in sums):  # the output check: every element read (ones sum to n exactly)
                raise RuntimeError(f"bandwidth probe read wrong data: {sums} != {n}")
            if r:  # the first round is the warm-up
                gbs.append(threads * n * 4 / dt / 1e9)
    finally:
        stop = True
        barrier.wait()
        for t in pool:
            t.join()
    return summary(gbs)


def native_read_bandwidth(threads: int, *, mb: int = 512, repeats: int = 5, pin: bool = True) -> dict | None:
    """GB/s of the native probe with `threads` threads (summary, plus how many threads were pinned); None when the
    native module is not built."""
    try:
        from runtime import _sparrow
    except ImportError:
        return None
    r = _sparrow.bench_read_bandwidth(threads, mb * 2**20, repeats, pin)
    return {**summary(r["gb_s"]), "n_pinned": r["n_pinned"], "pin_errno": r["pin_errno"]}


def pinning_status(per_threads: dict[int, dict]) -> str:
    """"pinned" when every thread of every run got its CPU, else "not pinned: <why>"."""
    failed = [s for t, s in per_threads.items() if s["n_pinned"] != t]
    if not failed:
        return "pinned"
    err = next((s["pin_errno"] for s in failed if s["pin_errno"]), 0)
    return "not pinned: " + (os.strerror(err) if err else "the OS gave no CPU list")


def bandwidth_curve(max_threads: int | None = None, *, mb: int = 512, repeats: int = 5, progress=None,
                    numpy_check: bool = True) -> dict:
    """Read bandwidth for 1..max_threads threads (default: physical cores): the native probe (the roofline) and, when
    `numpy_check`, the numpy probe alongside. `progress(t)` is called after each thread count of each probe."""
    import psutil

    max_threads = max_threads or psutil.cpu_count(logical=False) or 1
    avail = psutil.virtual_memory().available
    mb = max(16, min(mb, int(avail * 0.5 / max_threads / 2**20)))  # never push the machine into swap
    counts = range(1, max_threads + 1)
    native = {}
    for t in counts:
        r = native_read_bandwidth(t, mb=mb, repeats=repeats)
        if r is None:
            break
        native[t] = r
        if progress:
            progress(t)
    numpy_runs = {}
    if numpy_check or not native:
        for t in counts:
            numpy_runs[t] = read_bandwidth(t, mb=mb, repeats=repeats)
            if progress:
                progress(t)
    numpy_part = {"method": BANDWIDTH_METHOD.format(mb=mb, repeats=repeats), "threads": numpy_runs}
    if native:
        pinning = pinning_status(native)
        primary = {t: {k: s[k] for k in ("median", "min", "max", "n")} for t, s in native.items()}
        out = {"probe": "native", "method": NATIVE_METHOD.format(mb=mb, repeats=repeats, pinning=pinning),
               "pinning": {"status": pinning, "threads_pinned": {t: s["n_pinned"] for t, s in native.items()}}}
    else:
        primary = numpy_runs
        out = {"probe": "numpy", "method": numpy_part["method"] + " (native module not built)",
               "pinning": {"status": "not pinned: the numpy probe runs on Python threads", "threads_pinned": {}}}
    best = max(primary, key=lambda t: primary[t]["median"])
    out.update({"unit": "GB/s", "mb_per_thread": mb, "threads": primary, "best_threads": best,
                "best_gb_s": primary[best]["median"]})
    if numpy_runs and native:
        out["numpy"] = numpy_part
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MB per thread, 3 repeats")
    ap.add_argument("--threads", type=int, default=0, help="bandwidth for 1..N threads (default: physical cores)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-numpy", action="store_true", help="only the native probe, not the numpy cross-check")
    args = ap.parse_args(argv)
    prof = device_profile()
    prof["bandwidth"] = bandwidth_curve(args.threads or None, mb=128 if args.quick else 512,
                                        repeats=3 if args.quick else 5, numpy_check=not args.no_numpy)
    if args.json:
        print(json.dumps(prof, indent=2))
    else:
        print(format_profile(prof))
    return prof


def format_profile(p: dict) -> str:
    lines = [(f"CPU        {p['cpu_model']} ({p['arch']}), {p['physical_cores']} physical / {p['logical_cores']} "
              "logical cores"),
             f"kernels    tier {p['kernel_tier']}; features: {' '.join(p['cpu_features']) or '-'}",
             "caches     " + ", ".join(f"L{c['level']} {c['type'].lower()} {c['size']}" for c in p["caches"]),
             (f"RAM        {p['ram_total_bytes'] / 2**30:.1f} GiB total, {p['ram_available_bytes'] / 2**30:.1f} GiB "
              "available"),
             f"OS         {p['os']}"]
    bw = p.get("bandwidth")
    if bw:
        for t, s in bw["threads"].items():
            lines.append(f"read bw    {t} thread{'s' if int(t) > 1 else ' '}: {s['median']:.1f} GB/s "
                         f"({s['min']:.1f}-{s['max']:.1f})")
        lines.append(f"           method: {bw['method']}")
        for t, s in bw.get("numpy", {}).get("threads", {}).items():
            lines.append(f"numpy bw   {t} thread{'s' if int(t) > 1 else ' '}: {s['median']:.1f} GB/s "
                         f"({s['min']:.1f}-{s['max']:.1f}) (cross-check, a lower bound)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
