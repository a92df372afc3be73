"""Device profile: what this machine is (CPU, cores, SIMD features and kernel tier the runtime dispatches to, caches,
RAM, OS) and how fast it streams memory (read bandwidth for 1..N threads, the roofline of decoding).

    python -m sparrow.bench_device.profile [--quick] [--json]

The bandwidth probe is native (sp_bench_read_bandwidth in native/src/bandwidth.c): each thread, pinned to its own
CPU where the OS allows, streams a private buffer (512 MB per thread; 128 MB with --quick) with 16-byte vector loads
into eight register accumulators (fast enough for a cache, not only DRAM), and the sum of every pass is checked
against the buffer's known contents before the pass counts. All threads start a pass together; bandwidth = total
bytes / (last end - first start). Alongside it, as a cross-check, the same measurement through numpy (float32 sums
over a private array per thread, the GIL released inside the reduction), which is a lower bound: numpy's pairwise
float summation is slower than the memory on some machines. The roofline uses the native probe; the numpy one is
used only when the native module is not built. Medians with min/max over repeats, after one warm-up pass.

That large-buffer figure is DRAM bandwidth, and it bounds decoding only when the weights do not fit in the last-level
cache (LLC): a model smaller than the LLC stays there between tokens (the 94 MB SmolLM2 file in a 480 MB L3) and is
read at cache speed. Roofline decides, per configuration, which applies (bound_kind: the weights it keeps touching,
its working set, against the LLC size) and, for a cache-resident one, probes with buffers of the working set's size
(split over the run's threads, as decoding splits the weights). A DRAM-bound one whose working set is smaller than
the large probe's buffers is probed with buffers of its own size too: on some machines (seen on a 2-core Intel Xeon
KVM guest: 25 GB/s with 300 MB per thread, 15 GB/s with 1 GiB) streaming bandwidth falls with the buffer's size, and
the model's decode reads its own working set, not the probe's:

    roof = Roofline(dram_gb_s, threads=2, llc=last_level_cache(caches()))
    b = roof.bound(read_bytes_per_token, working_set_bytes)   # {"kind": "llc" | "dram", "bandwidth_gb_s", "why", ...}
    row.update(against_bound(b, decode_tok_s))                # bound tok/s, fraction, and why when above 100%
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NATIVE_METHOD = ("native sp_bench_read_bandwidth: a private {mb} MB buffer per thread, written by that thread, "
                 "read with 16-byte vector loads into eight register accumulators; threads {pinning}; every pass's "
                 "sum checked against the buffer's contents; GB/s = bytes read / (last thread end - first thread "
                 "start); {repeats} repeats after one warm-up")
BANDWIDTH_METHOD = ("numpy float32 sum over a private {mb} MB array per thread, threads started behind a barrier "
                    "(numpy releases the GIL in reductions); GB/s = bytes read / (last thread end - first thread "
                    "start); {repeats} repeats after one warm-up")


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ARM cores by (CPU implementer, CPU part) of /proc/cpuinfo, which on ARM Linux and Android names no model: the cores
# of current phones, boards and servers (the Arm Technical Reference Manuals' MIDR values).
ARM_PARTS = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55", (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73", (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1", (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD40): "Neoverse-V1", (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510", (0x41, 0xD47): "Cortex-A710", (0x41, 0xD48): "Cortex-X2",
    (0x41, 0xD49): "Neoverse-N2", (0x41, 0xD4D): "Cortex-A715", (0x41, 0xD4E): "Cortex-X3", (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD80): "Cortex-A520", (0x41, 0xD81): "Cortex-A720", (0x41, 0xD82): "Cortex-X4",
}


def arm_cpu_names(cpuinfo: str) -> str | None:
    """The cores an ARM /proc/cpuinfo lists, by implementer and part ("4x Cortex-A55 + 4x Cortex-A76"); None when
    it lists none. Unknown parts are given as numbers (implementer 0x51 part 0x804)."""
    counts: dict[str, int] = {}
    impl = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        try:
            if key == "cpu implementer":
                impl = int(value, 16)
            elif key == "cpu part" and impl is not None:
                part = int(value, 16)
                name = ARM_PARTS.get((impl, part), f"implementer {impl:#x} part {part:#x}")
                counts[name] = counts.get(name, 0) + 1
        except ValueError:
            continue
    return " + ".join(f"{n}x {name}" for name, n in counts.items()) or None


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.lower().startswith(("model name", "hardware", "processor\t: ")) and ":" in line:
            value = line.split(":", 1)[1].strip()
            if value and not value.isdigit():
                return value
    return arm_cpu_names(text) or platform.processor() or platform.machine()


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
        from ..runtime import _sparrow

        return {"cpu_features": _sparrow.cpu_features().split(), "kernel_tier": _sparrow.kernel_tier()}
    except (ImportError, AttributeError, OSError) as e:  # the native module is not built: say so rather than fail the profile
        return {"cpu_features": [], "kernel_tier": "unknown", "error": str(e)}


def gpu_devices() -> dict:
    """The Vulkan devices the native library can run sessions on (runtime.native.devices()) and, when there are
    none, why."""
    try:
        from ..runtime.native import device_error, devices

        return {"devices": devices(), "error": device_error()}
    except (ImportError, AttributeError, OSError) as e:  # the native module is not built (or predates devices)
        return {"devices": [], "error": str(e)}


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
        "gpu": gpu_devices(),
        "ram_total_bytes": vm.total,
        "ram_available_bytes": vm.available,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def read_bandwidth(threads: int, *, mb: int = 512, repeats: int = 5, nbytes: int | None = None) -> dict:
    """GB/s reading `mb` MB (or `nbytes` bytes) per thread with `threads` threads at once: median/min/max over
    `repeats`."""
    n = (nbytes if nbytes is not None else mb * 2**20) // 4
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


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def native_read_bandwidth(threads: int, *, mb: int = 512, repeats: int = 5, pin: bool = True,
                          nbytes: int | None = None) -> dict | None:
    """GB/s of the native probe with `threads` threads reading `mb` MB (or `nbytes` bytes) each (summary, plus how
    many threads were pinned); None when the native module is not built."""
    try:
        from ..runtime import _sparrow
    except ImportError:
        return None
    # pinned threads need a CPU each (the probe refuses to put two on one): more threads than this process may use
    # run unpinned, and their result says so (n_pinned 0)
    pin = pin and threads <= usable_cpus()
    r = _sparrow.bench_read_bandwidth(threads, nbytes if nbytes is not None else mb * 2**20, repeats, pin)
    return {**summary(r["gb_s"]), "n_pinned": r["n_pinned"], "pin_errno": r["pin_errno"]}


def pinning_status(per_threads: dict[int, dict]) -> str:
    """"pinned" when every thread of every run got its CPU, else "not pinned: <why>"."""
    failed = [s for t, s in per_threads.items() if s["n_pinned"] != t]
    if not failed:
        return "pinned"
    err = next((s["pin_errno"] for s in failed if s["pin_errno"]), 0)
    if err:
        return "not pinned: " + os.strerror(err)
    most, cpus = max(per_threads), usable_cpus()
    return "not pinned: " + (f"{most} threads for the {cpus} CPUs this process may use" if most > cpus
                             else "the OS gave no CPU list")


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


# ---- which bandwidth bounds a configuration: DRAM, or the last-level cache that holds its weights ----

CACHE_REPEATS = 21      # passes of a cache-sized probe: each lasts microseconds to milliseconds, so take more of them
PROBE_MIN_BYTES = 4096  # the native probe's smallest buffer per thread


def last_level_cache(caches: list[dict]) -> dict | None:
    """The last-level cache in `caches` (caches()'s list, cpu0's view): the highest-level data or unified cache;
    None when the OS lists none."""
    usable = [c for c in caches if str(c.get("type", "")).lower() in ("data", "unified") and c.get("bytes", 0) > 0]
    return max(usable, key=lambda c: (c["level"], c["bytes"])) if usable else None


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def bound_kind(read_bytes_per_token: float, working_set_bytes: float, llc: dict | None, *,
               sparse: bool = False) -> tuple[str, str]:
    """("llc" or "dram", why): whether a configuration's weights stay in the last-level cache between tokens. The
    working set is the weights it keeps touching over many tokens (all of a sparse model's experts: each token reads
    others; the weights a speculative step reads once for several tokens), `read_bytes_per_token` what it reads per
    token; `sparse`: it reads only some experts per token. `llc` as last_level_cache gives it, None when unknown."""
    if not 0 < read_bytes_per_token <= working_set_bytes:
        raise ValueError(f"need 0 < bytes read per token ({read_bytes_per_token}) <= working set "
                         f"({working_set_bytes})")
    if llc is None:
        return "dram", "the last-level cache size is unknown, so the DRAM figure (the large-buffer probe) applies"
    cache = f"the L{llc['level']} cache ({_mib(llc['bytes'])}, the last level)"
    if working_set_bytes <= llc["bytes"]:
        return "llc", (f"its {_mib(working_set_bytes)} of weights fit in {cache}: they stay there between tokens, so "
                       "the bound is the read bandwidth of buffers of that size, not DRAM's")
    why = f"its {_mib(working_set_bytes)} of weights exceed {cache}: every token streams them from DRAM"
    if sparse and read_bytes_per_token <= llc["bytes"]:
        why += (f" (one token reads only {_mib(read_bytes_per_token)}, but other experts each token; those reused by "
                "nearby tokens may still come from the cache)")
    return "dram", why


def over_bound_reason(bound: dict, fraction: float) -> str:
    """Why a decode speed of `fraction` (> 1) times its bound can be real: what the bound's figure leaves out."""
    pct = f"{100 * fraction:.0f}%"
    llc = bound.get("llc_bytes")
    moment = "; and the probe ran at another moment than the decode, when the machine's load may have differed"
    if bound["kind"] == "llc":
        return (f"{pct} of a cache-resident bound: the probe's median with buffers of the weights' size "
                f"({bound['bandwidth_gb_s']:.1f} GB/s) is a measurement, not a hard ceiling: at cache sizes its passes "
                "are short, so thread start skew and timer overhead weigh on it" + moment)
    if llc is None:
        return (f"{pct} of the DRAM bound: the cache size is unknown, and weights served from a cache are read faster "
                "than DRAM" + moment)
    share = min(1.0, llc / bound["working_set_bytes"])
    why = (f"{pct} of the DRAM bound: the last-level cache ({_mib(llc)}) can hold {100 * share:.0f}% of the "
           f"{_mib(bound['working_set_bytes'])} of weights, so part of each token's reads hits the cache, not DRAM")
    if bound.get("sparse"):
        why += "; experts reused by nearby tokens are read from the cache too"
    return why + moment


def against_bound(bound: dict, tok_s: float) -> dict:
    """A decode speed against its bound (Roofline.bound): {"bandwidth_bound_tok_s", "fraction_of_bound", "bound"},
    the bound with "over_bound" (why a fraction above 1 can be real) when the speed exceeds it."""
    limit = bound["bandwidth_gb_s"] * 1e9 / bound["bytes_per_token"]
    fraction = tok_s / limit
    b = dict(bound)
    if fraction > 1:
        b["over_bound"] = over_bound_reason(bound, fraction)
    return {"bandwidth_bound_tok_s": limit, "fraction_of_bound": fraction, "bound": b}


@dataclass
class Roofline:
    """The bandwidth that bounds each configuration of one run. Where its working set exceeds the last-level cache
    `llc`: `dram_gb_s`, the large-buffer probe at the run's thread count (`dram_probe_bytes` read per pass, all
    threads). Where it fits: a probe with buffers of the working set's size, split over `threads` private buffers as
    decoding splits the weights over its threads (`probe(total bytes)` -> a GB/s summary; default: the native probe,
    CACHE_REPEATS passes), measured once per size and kept in `probes` (total bytes -> summary)."""
    dram_gb_s: float
    threads: int
    llc: dict | None
    dram_probe_bytes: int = 0
    probe: Callable[[int], dict] | None = None
    probes: dict[int, dict] = field(default_factory=dict)

    def probe_bytes(self, working_set_bytes: float) -> int:
        """Bytes a cache-sized probe reads per pass: the working set split over the threads, each buffer rounded up
        to a multiple of 256 bytes and at least PROBE_MIN_BYTES."""
        per_thread = max(PROBE_MIN_BYTES, -(-int(working_set_bytes) // self.threads))
        return -(-per_thread // 256) * 256 * self.threads

    def bound(self, read_bytes_per_token: float, working_set_bytes: float | None = None, *,
              sparse: bool = False) -> dict:
        """{"kind", "bytes_per_token", "working_set_bytes", "sparse", "bandwidth_gb_s", "probe_bytes", "llc_bytes",
        "why"} of a configuration that reads `read_bytes_per_token` of weights per token out of `working_set_bytes`
        (default: the same, plain decoding of a dense model); `sparse`: it reads only some experts per token. The
        bandwidth: the large (DRAM) probe's only when the working set is at least as large as its buffers; else a
        probe with buffers of the working set's size (module docstring)."""
        ws = read_bytes_per_token if working_set_bytes is None else working_set_bytes
        kind, why = bound_kind(read_bytes_per_token, ws, self.llc, sparse=sparse)
        nbytes = self.probe_bytes(ws)
        if kind == "dram" and not (self.dram_probe_bytes and nbytes < self.dram_probe_bytes):
            gb_s, nbytes = self.dram_gb_s, self.dram_probe_bytes
        else:  # cache-resident, or DRAM with a working set smaller than the large probe's: buffers of its size
            if nbytes not in self.probes:
                self.probes[nbytes] = (self.probe or self.native_probe)(nbytes)
            gb_s = self.probes[nbytes]["median"]
            if kind == "dram":
                why += (f"; probed with buffers of its size ({_mib(nbytes)} in all), smaller than the large probe's "
                        f"({_mib(self.dram_probe_bytes)}: {self.dram_gb_s:.1f} GB/s)")
        return {"kind": kind, "bytes_per_token": read_bytes_per_token, "working_set_bytes": ws, "sparse": sparse,
                "bandwidth_gb_s": gb_s, "probe_bytes": nbytes, "llc_bytes": self.llc["bytes"] if self.llc else None,
                "why": why}

    def native_probe(self, total_bytes: int) -> dict:
        """GB/s of `threads` threads each reading total_bytes / threads (pinned): the native probe, or numpy's when
        the native module is not built."""
        per_thread = total_bytes // self.threads
        r = native_read_bandwidth(self.threads, nbytes=per_thread, repeats=CACHE_REPEATS)
        if r is None:
            r = read_bandwidth(self.threads, nbytes=per_thread, repeats=CACHE_REPEATS)
        return {k: r[k] for k in ("median", "min", "max", "n")} | {"threads": self.threads,
                                                                   "bytes_per_thread": per_thread}


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


def weight_bytes_per_token(path: Path) -> dict:
    """Bytes of weights one decode step reads: every tensor, except that of the token embedding only one row is read
    (unless it is tied to the output head, which reads all of it)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    rows = {t.name: int(t.shape[-1]) if len(t.shape) > 1 else 1 for t in reader.tensors}
    total = sum(sizes.values())
    experts = sum(v for k, v in sizes.items() if ".ffn_experts." in k)  # BlockFFN expert slabs (0: dense model)
    per_token = total
    emb = sizes.get("token_embd.weight")
    if emb is not None and "output.weight" in sizes:
        per_token -= emb - emb // max(1, rows["token_embd.weight"])
    return {"file_tensor_bytes": total, "per_token": per_token, "tied_embeddings": "output.weight" not in sizes,
            "expert_bytes": experts}


if __name__ == "__main__":
    main()
