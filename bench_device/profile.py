"""Device profile: what this machine is (CPU, cores, SIMD features and kernel tier the runtime dispatches to, caches,
RAM, OS) and how fast it streams memory (read bandwidth for 1..N threads, the roofline of decoding).

    python -m bench_device.profile [--quick] [--json]

The bandwidth probe: each thread sums its own float32 array (512 MB per thread; 128 MB with --quick) with numpy,
which releases the GIL inside the reduction and reads the array once, sequentially, with SIMD loads. All threads
start together behind a barrier; bandwidth = total bytes / wall time of the slowest thread. Reported as median with
min/max over repeats. It is a read-only stream through numpy, not a hand-written native kernel, so it is a lower
bound of what the hardware can read (not yet compared against a native stream kernel).
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

BANDWIDTH_METHOD = ("numpy float32 sum over a private {mb} MB array per thread, threads started behind a barrier "
                    "(numpy releases the GIL in reductions); GB/s = bytes read / wall time; {repeats} repeats after "
                    "one warm-up")


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

    def work(i: int) -> None:
        while True:
            barrier.wait()
            if stop:
                return
            sums[i] = float(arrays[i].sum())
            done.wait()

    pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    gbs = []
    try:
        for r in range(repeats + 1):
            barrier.wait()
            t0 = time.perf_counter()
            done.wait()
            dt = time.perf_counter() - t0
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


def bandwidth_curve(max_threads: int | None = None, *, mb: int = 512, repeats: int = 5, progress=None) -> dict:
    """Read bandwidth for 1..max_threads threads (default: physical cores)."""
    import psutil

    max_threads = max_threads or psutil.cpu_count(logical=False) or 1
    avail = psutil.virtual_memory().available
    mb = max(16, min(mb, int(avail * 0.5 / max_threads / 2**20)))  # never push the machine into swap
    per_threads = {}
    for t in range(1, max_threads + 1):
        per_threads[t] = read_bandwidth(t, mb=mb, repeats=repeats)
        if progress:
            progress(t)
    best = max(per_threads, key=lambda t: per_threads[t]["median"])
    return {"method": BANDWIDTH_METHOD.format(mb=mb, repeats=repeats), "unit": "GB/s", "mb_per_thread": mb,
            "threads": per_threads, "best_threads": best, "best_gb_s": per_threads[best]["median"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MB per thread, 3 repeats")
    ap.add_argument("--threads", type=int, default=0, help="bandwidth for 1..N threads (default: physical cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    prof = device_profile()
    prof["bandwidth"] = bandwidth_curve(args.threads or None, mb=128 if args.quick else 512,
                                        repeats=3 if args.quick else 5)
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
    return "\n".join(lines)


if __name__ == "__main__":
    main()
