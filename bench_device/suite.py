"""`sparrow bench`: one run that profiles the device, measures its memory read bandwidth (the roofline) and benchmarks
a model's decode, prefill and time to first token with Sparrow, side by side with llama.cpp where llama-cpp-python
is installed, then writes DIR/report.json (schema "sparrow.bench/4", see bench_device/schema.py), the PNG plots
(bench_device/plots.py) and DIR/report.md, which embeds them.

The full run adds, in the same report (bench_device/sections.py): "sparse" (the shipped BlockFFN model, dense vs
sparse decode, TLS/CLS-k/expert bytes), "speculative" ((c) on the model: plain, llama.cpp, each drafter; (a) on the
shipped BlockFFN model with its draft model) and "synthetic" (released BlockFFN shapes, random weights and routing,
labelled SYNTHETIC; with (b), (a)'s accepted lengths REPLAYED on them). --quick adds a small speculative slice.

The decode/prefill/TTFT/T-curve numbers come from bench_decode.run (engines in worker processes, asked in turn, each
engine's greedy continuation checked before timing against an oracle: llama.cpp, or Sparrow's scalar reference
kernels when Sparrow runs alone). The bandwidth bound of decoding is bandwidth (native probe, the thread count of
the run) / bytes of weights read per token; the report gives the fraction of it each engine reaches. Which bandwidth
(bench_device/profile.py Roofline): DRAM's (the large-buffer probe) where the weights exceed the last-level cache,
else that of buffers of the weights' size, since weights that fit stay in the cache between tokens; every bound
records which it used and why ("bound"), and a fraction above 100% carries why it can be real ("over_bound", also in
the notes). Energy comes from RAPL counters read around every decode measurement where they can be read,
"unavailable: <reason>" otherwise.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from . import bench_decode
from .energy import Rapl
from .plots import configurations, write_plots
from .profile import (
    Roofline,
    against_bound,
    bandwidth_curve,
    device_profile,
    last_level_cache,
    weight_bytes_per_token,
)
from .schema import SCHEMA, SYNTHETIC_LEFT_OUT, check
from .sections import (
    GPU_RUN,
    SHIPPED_TARGET,
    bound_cells,
    bound_lines,
    gpu_device_lines,
    gpu_markdown,
    gpu_section,
    no_bar,
    phases_markdown,
    phases_section,
    sparse_markdown,
    sparse_section,
    speculative_markdown,
    speculative_section,
    synthetic_markdown,
    synthetic_section,
)

ORACLES = {"llama.cpp": "llama.cpp (llama-cpp-python) on the same GGUF",
           bench_decode.SCALAR_ORACLE: "Sparrow's scalar reference kernels (a worker with SPARROW_FORCE_SCALAR=1)"}
ORACLE_CRITERIA = {
    oracle: (f"logits at every step of Sparrow's greedy continuation (teacher forced): NMSE < "
             f"{bench_decode.nmse_bound(oracle):g}; a different top-1 token, and the first step where the greedy "
             f"continuations part, only at a near tie of the oracle's logits (gap < {bench_decode.TIE_GAP:g})")
    for oracle in ORACLES}
QUICK = {"repeats": 3, "decode_tokens": 16, "batch_sizes": (1, 4, 16), "bw_mb": 128, "bw_repeats": 3}
FULL = {"repeats": 5, "decode_tokens": 64, "batch_sizes": bench_decode.BATCH_SIZES, "bw_mb": 512, "bw_repeats": 5,
        # the sparse section (shipped BlockFFN model): prompts x decode tokens x alternated rounds
        "sparse": {"n_prompts": 6, "tokens": 64, "rounds": 3}}
SYNTHETIC_SHAPES = ("0.5b",)  # the full run's default; `sparrow bench --synthetic SHAPE` chooses


def _str_keys(x):
    """The dict with every key a string, nested, as report.json will hold it."""
    return {str(k): _str_keys(v) for k, v in x.items()} if isinstance(x, dict) else x


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def onnx_engine_status(model_path: Path, wanted: bool) -> str:
    """Whether the onnxruntime engine (an f32 ONNX export of the model: bench_decode.OnnxEngine) runs beside the
    others: "ran", or why not."""
    import importlib.util

    from ..runtime.routing import read_gguf_header

    if not wanted:
        return "skipped (--no-onnx)"
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return "not installed"
    arch = read_gguf_header(model_path).architecture
    return "ran" if arch in ("llama", "blockffn") else f"not run (no ONNX export for {arch!r})"


def run_suite(model_path: Path, model_name: str, *, quick: bool = False, threads: int = 0, llama_cpp: bool = True,
              echo: Callable[[str], None] = print, progressbar=None, energy_root: Path | None = None,
              synthetic_shapes: tuple[str, ...] | None = None, onnx: bool = True, device: str = "cpu") -> dict:
    """Run everything and return the report (a dict following SCHEMA; "plots" is filled by write_report).
    Quick: the headline decode benchmark and a small speculative slice. Full: also the sparse section (shipped
    BlockFFN model), speculation (a) and (c) and the synthetic section on `synthetic_shapes` (default
    SYNTHETIC_SHAPES; () leaves it out) with the replayed speculation (bench_device/sections.py).
    `progressbar(length, label)` returns a context manager with .update(n) (click.progressbar fits); None runs
    silently. `energy_root`: where the powercap tree is (default /sys/class/powercap). `device` "vulkan" or
    "vulkan:N" adds the "gpu" section (sections.gpu_section: the model's decode on that GPU device beside the CPU)."""
    import psutil

    from ..runtime.native import parse_device

    cfg = QUICK if quick else FULL
    threads = threads or psutil.cpu_count(logical=False) or 1
    profile = device_profile()
    notes = []

    def bar(length: int, label: str):
        return no_bar(length, label) if progressbar is None else progressbar(length=length, label=label)

    gpu = None
    if parse_device(device) != 0:  # first: a model or device the GPU session refuses fails before the long part
        run = GPU_RUN["quick" if quick else "full"]
        with bar(1 + run["repeats"], f"decode on {device} beside the CPU") as b:
            gpu = gpu_section(model_path, device, threads=threads, progress=b.update, **run)

    with bar(2 * threads, "memory bandwidth") as b:
        bandwidth = bandwidth_curve(threads, mb=cfg["bw_mb"], repeats=cfg["bw_repeats"], progress=lambda t: b.update(1))

    if not llama_cpp:
        llama_status = "skipped (--no-llama-cpp)"
    elif not llama_cpp_available():
        llama_status = "not installed"
    else:
        llama_status = "ran"
    engine_names = ("sparrow", "llama.cpp") if llama_status == "ran" else ("sparrow",)
    onnx_status = onnx_engine_status(model_path, onnx)
    if onnx_status == "ran":
        engine_names += ("onnxruntime",)

    meter, energy_why = Rapl.open(*([energy_root] if energy_root else []))

    def decode(names):
        steps = cfg["repeats"] * len(names) * (bench_decode.STEPS_PER_REPEAT + len(cfg["batch_sizes"]) +
                                               len(bench_decode.LONG_SIZES))
        with bar(steps, "decode/prefill/TTFT (" + " vs ".join(names) + ")") as b:
            return bench_decode.run(str(model_path), threads=threads, repeats=cfg["repeats"],
                                    decode_tokens=cfg["decode_tokens"], engine_names=names,
                                    batch_sizes=cfg["batch_sizes"], progress=b.update, energy=meter)

    while True:  # an engine beside Sparrow that fails is left out, with why, and the rest run again
        try:
            dec = decode(engine_names)
            break
        except RuntimeError as e:
            if len(engine_names) == 1:
                raise
            failed = next((n for n in engine_names[1:] if f"the {n} worker" in str(e) or str(e).startswith(n)),
                          engine_names[1])
            if failed == "onnxruntime":
                onnx_status = f"failed: {e}"
            else:
                llama_status = f"failed: {e}"
            notes.append(f"{failed} left out: {e}")
            engine_names = tuple(n for n in engine_names if n != failed)

    wbytes = weight_bytes_per_token(model_path)
    bw_threads = threads if threads in bandwidth["threads"] else max(bandwidth["threads"])
    llc = last_level_cache(profile["caches"])
    roofline = Roofline(bandwidth["threads"][bw_threads]["median"], threads=threads, llc=llc,
                        dram_probe_bytes=bandwidth["mb_per_thread"] * 2**20 * bw_threads)
    bound = roofline.bound(wbytes["per_token"])  # a dense read of the file: its working set is what a token reads
    engines = {}
    for name, e in dec["engines"].items():
        engines[name] = {
            "decode_tok_s": e["decode_tok_s"],
            "prefill_tok_s": e["prefill_tok_s"],
            "ttft_ms": e["ttft_ms"],
            "peak_rss_mb": e["peak_rss_mb"],
            "batch_ms": {str(t): v for t, v in e["batch_ms"].items()},
            "batch_cost_vs_t1": {str(t): v for t, v in e["batch_cost_vs_t1"].items()},
            "long_cached_tokens": e["long_cached_tokens"],
            "long_ms": {str(t): v for t, v in e["long_ms"].items()},
            "long_cost_vs_t1": {str(t): v for t, v in e["long_cost_vs_t1"].items()},
            **against_bound(bound, e["decode_tok_s"]["median"]),
            "energy": ({"decode_j": e["decode_j"], "decode_j_per_token": e["decode_j_per_token"]}
                       if "decode_j" in e else f"unavailable: {energy_why}"),
        }
    ratio = dec.get("ratio_sparrow_over_llama_cpp")
    if ratio:
        ratio["ttft"] = engines["sparrow"]["ttft_ms"]["median"] / engines["llama.cpp"]["ttft_ms"]["median"]
    if meter:
        energy = {"source": meter.describe(),
                  "scope": (f"whole package(s) over each engine's {cfg['decode_tokens']}-token decode measurement, "
                            "whatever else ran on the machine included")}
    else:
        energy = f"unavailable: {energy_why}"

    extra = {"gpu": gpu} if gpu else {}
    with bar(1, "decode phase by phase") as b:
        extra["phases"] = phases_section(model_path, threads=threads, tokens=cfg["decode_tokens"], roofline=roofline)
        b.update(1)
    if not quick:
        sp = cfg["sparse"]
        with bar(sp["n_prompts"] * (1 + sp["rounds"]) + 1, f"sparse: {SHIPPED_TARGET.name} dense vs sparse") as b:
            extra["sparse"] = sparse_section(SHIPPED_TARGET, threads=threads, roofline=roofline,
                                             progress=b.update, **sp)
    extra["speculative"], raw_a = speculative_section(
        model_path, threads=threads, quick=quick, llama_cpp="skipped in --quick" if quick else llama_status,
        roofline=roofline, sparse=extra.get("sparse"), bar=bar)
    shapes = SYNTHETIC_SHAPES if synthetic_shapes is None else tuple(synthetic_shapes)
    if not quick and shapes:
        extra["synthetic"] = synthetic_section(list(shapes), threads=threads, roofline=roofline,
                                               replay_from=raw_a, bar=bar)
    elif not quick:
        notes.append(f"{SYNTHETIC_LEFT_OUT} (no synthetic shape asked for)")
    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "settings": {"threads": threads, "repeats": cfg["repeats"], "decode_tokens": cfg["decode_tokens"],
                     "batch_sizes": list(cfg["batch_sizes"])},
        "device": profile,
        "bandwidth": {**_str_keys(bandwidth), "last_level_cache": llc,
                      "cache_probes": {str(k): v for k, v in roofline.probes.items()}},
        "model": {"name": model_name, "path": str(model_path), "file_bytes": model_path.stat().st_size,
                  "weight_bytes_per_token": wbytes["per_token"], "tied_embeddings": wbytes["tied_embeddings"],
                  "prompt_tokens": dec["prompt_tokens"]},
        "llama_cpp": llama_status,
        "onnxruntime": onnx_status,
        "oracle": {"engine": dec["oracle"], "description": ORACLES[dec["oracle"]],
                   "criterion": ORACLE_CRITERIA[dec["oracle"]], "checks": dec["oracle_checks"],
                   "checked_tokens": dec["greedy_checked_tokens"], "agreement_tokens": dec["greedy_agreement_tokens"],
                   "first_fork": dec["greedy_first_fork"]},
        "engines": engines,
        "ratio_sparrow_over_llama_cpp": ratio,
        "energy": energy,
        "plots": {},
        "notes": notes,
        **extra,
    }
    notes += over_bound_notes(report)
    return report


def over_bound_notes(r: dict) -> list[str]:
    """A note for every configuration that decodes above its bound: its name (as the plot names it) and why that can
    be real."""
    return [f"{c['name']} decodes at {c['over_bound']}" for c in configurations(r) if c.get("over_bound")]


def headline_table(r: dict) -> str:
    t = r["settings"]["threads"]
    rows = [("| engine | decode tok/s (min-max) | prefill tok/s (min-max) | TTFT ms (min-max) | peak RSS MB | "
             "J/token | bandwidth bound tok/s | fraction of bound |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in r["engines"].items():
        d, p, f = e["decode_tok_s"], e["prefill_tok_s"], e["ttft_ms"]
        j = f"{e['energy']['decode_j_per_token']['median']:.3f}" if isinstance(e["energy"], dict) else "n/a"
        rows.append(f"| {name} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
                    f"{p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | "
                    f"{f['median']:.1f} ({f['min']:.1f}-{f['max']:.1f}) | {e['peak_rss_mb']:.0f} | {j} | "
                    + " | ".join(bound_cells(e)) + " |")
    if r["llama_cpp"] != "ran":
        rows.append(f"| llama.cpp | {r['llama_cpp']} | | | | | | |")
    if r.get("onnxruntime", "ran") != "ran":
        rows.append(f"| onnxruntime | {r['onnxruntime']} | | | | | | |")
    m, o = r["model"], r["oracle"]
    bw = r["bandwidth"]["threads"].get(str(t)) or {}
    return (f"{m['name']}, {t} threads, prompt {m['prompt_tokens']} tokens, "
            f"{m['weight_bytes_per_token'] / 2**20:.1f} MiB of weights read per token, "
            f"DRAM read bandwidth {bw.get('median', 0):.1f} GB/s ({r['bandwidth']['probe']} probe, "
            f"{r['bandwidth']['pinning']['status']}); outputs checked against {o['engine']}: logits NMSE "
            + ", ".join(f"{c['nmse']:.1e}" for c in o["checks"].values())
            + f", greedy tokens identical for {o['agreement_tokens']}/{o['checked_tokens']}\n\n" + "\n".join(rows)
            + "\n\n" + "\n".join(bound_lines(r["engines"])))


def device_summary(r: dict) -> list[str]:
    """What `sparrow bench` prints under the headline about GPU devices: those found and, with --device, the "gpu"
    section's table."""
    d = r["device"].get("gpu")
    lines = [f"Vulkan devices: {line}" for line in gpu_device_lines(d["devices"], d["error"])] if d else []
    return lines + (["", *gpu_markdown(r["gpu"])] if "gpu" in r else [])


def cache_probe_lines(bw: dict) -> list[str]:
    """The report's bandwidth section on caches: the last-level cache and the probes with working-set-sized buffers."""
    llc, probes = bw["last_level_cache"], bw["cache_probes"]
    if llc is None:
        return ["The last-level cache size is unknown: every bound uses the DRAM figure above."]
    cache = f"L{llc['level']} {llc['type'].lower()} {llc['size']}"
    if not probes:
        return [(f"Last-level cache: {cache}. No configuration's weights fit in it: every bound uses the DRAM figure "
                 "above (a model larger than the cache is read from DRAM every token).")]
    lines = [(f"Last-level cache: {cache}. Configurations whose weights fit in it are bound by the read bandwidth of "
              "buffers of their size (they stay in the cache between tokens), and so are those read from DRAM whose "
              "weights are fewer than the large probe's buffers, probed with the run's threads, each reading its "
              "share:"), "", "| buffers in all MiB | per thread MiB | threads | GB/s median (min-max) |",
             "|---:|---:|---:|---:|"]
    for nbytes, p in probes.items():
        lines.append(f"| {int(nbytes) / 2**20:.2f} | {p['bytes_per_thread'] / 2**20:.2f} | {p['threads']} | "
                     f"{p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) |")
    return lines


PLOT_CAPTIONS = {"tok_s_vs_bound": "Decode tok/s against the bandwidth bound",
                 "time_vs_active": "Time per token against the active fraction of experts",
                 "accepted_length": "Accepted length distribution"}


def to_markdown(r: dict) -> str:
    d = r["device"]
    lines = [f"# Sparrow device benchmark ({r['mode']})", "", f"{r['created']}", "", "## Headline", "",
             headline_table(r), ""]
    if r.get("ratio_sparrow_over_llama_cpp"):
        x = r["ratio_sparrow_over_llama_cpp"]
        lines += [(f"Sparrow / llama.cpp: decode {x['decode']:.2f}x, prefill {x['prefill']:.2f}x the speed; "
                   f"time to first token {x['ttft']:.2f}x the time."), ""]
    o = r["oracle"]
    lines += [f"Checked before timing against {o['description']}: {o['criterion']}. "
              + "; ".join(f"{n}: NMSE {c['nmse']:.1e}, {c['top1_forks']} near-tie fork{'' if c['top1_forks'] == 1 else 's'}"
                          f" in {c['positions']} steps (largest gap {c['max_fork_gap']:.2f})"
                          for n, c in o["checks"].items())
              + f"; greedy tokens identical for the first {o['agreement_tokens']} of {o['checked_tokens']}"
              + (f" (then a near tie, gap {o['first_fork']['gap']:.2f})." if o.get("first_fork") else "."), ""]
    if "phases" in r:
        lines += ["## Decode phase by phase", ""] + phases_markdown(r["phases"]) + [""]
    if "sparse" in r:
        lines += ["## Sparse experts: dense vs sparse decode", ""] + sparse_markdown(r["sparse"]) + [""]
    if "speculative" in r:
        lines += ["## Speculative decoding", ""] + speculative_markdown(r["speculative"]) + [""]
    if "gpu" in r:
        lines += ["## GPU device: decode beside the CPU", ""] + gpu_markdown(r["gpu"]) + [""]
    if "synthetic" in r:
        lines += ["## SYNTHETIC large configurations (random weights, synthetic routing)", ""]
        lines += synthetic_markdown(r["synthetic"]) + [""]
    shown = [(k, v) for k, v in r["plots"].items() if not v.startswith("skipped")]
    skipped = [(k, v) for k, v in r["plots"].items() if v.startswith("skipped")]
    if shown or skipped:
        lines += ["## Plots", ""]
        for k, v in shown:
            lines += [f"![{PLOT_CAPTIONS.get(k, k)}]({v})", ""]
        lines += [f"- {PLOT_CAPTIONS.get(k, k)}: {v}" for k, v in skipped] + ([""] if skipped else [])
    energy = r["energy"] if isinstance(r["energy"], str) else f"{r['energy']['source']} ({r['energy']['scope']})"
    lines += ["## Device", "",
              (f"- CPU: {d['cpu_model']} ({d['arch']}), {d['physical_cores']} physical / {d['logical_cores']} "
               "logical cores"),
              f"- kernel tier: {d['kernel_tier']}; SIMD features: {' '.join(d['cpu_features']) or '-'}",
              "- caches: " + ", ".join(f"L{c['level']} {c['type'].lower()} {c['size']}" for c in d["caches"]),
              *([f"- Vulkan devices: {line}" for line in gpu_device_lines(d["gpu"]["devices"], d["gpu"]["error"])]
                if "gpu" in d else []),
              (f"- RAM: {d['ram_total_bytes'] / 2**30:.1f} GiB total, {d['ram_available_bytes'] / 2**30:.1f} GiB "
               "available"),
              f"- OS: {d['os']}", f"- energy: {energy}", "",
              "## Memory read bandwidth", ""]
    bw = r["bandwidth"]
    np_threads = bw.get("numpy", {}).get("threads", {})
    lines += ["| threads | GB/s median (min-max) | numpy cross-check GB/s |" if np_threads else
              "| threads | GB/s median (min-max) |", "|---:|---:|---:|" if np_threads else "|---:|---:|"]
    for t, s in bw["threads"].items():
        cell = f"| {t} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) |"
        if np_threads:
            n = np_threads.get(t)
            cell += f" {n['median']:.1f} ({n['min']:.1f}-{n['max']:.1f}) |" if n else " |"
        lines.append(cell)
    lines += ["", f"Method ({bw['probe']} probe): {bw['method']}."]
    if np_threads:
        lines += ["", f"Cross-check: {bw['numpy']['method']}."]
    lines += [""] + cache_probe_lines(bw)
    lines += ["", "## Cost of T tokens in one call (relative to T=1)", "",
              "| T | " + " | ".join(r["engines"]) + " |", "|---:|" + "---:|" * len(r["engines"])]
    for t in r["settings"]["batch_sizes"]:
        cells = [f"{e['batch_cost_vs_t1'][str(t)]:.2f}x ({e['batch_ms'][str(t)]:.2f} ms)"
                 for e in r["engines"].values()]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    first = next(iter(r["engines"].values()))
    lines += ["", f"After {first['long_cached_tokens']} cached tokens:", "",
              "| T | " + " | ".join(r["engines"]) + " |", "|---:|" + "---:|" * len(r["engines"])]
    for t in first["long_ms"]:
        cells = [f"{e['long_cost_vs_t1'][t]:.2f}x ({e['long_ms'][t]:.2f} ms)" for e in r["engines"].values()]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def write_report(r: dict, out: Path) -> tuple[Path, Path]:
    """The plots (recorded in r["plots"]), report.json (checked against the schema first) and report.md, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    r["plots"] = write_plots(r, out)
    r = json.loads(json.dumps(r))  # what report.json will hold: string keys
    check(r)
    j, m = out / "report.json", out / "report.md"
    j.write_text(json.dumps(r, indent=2) + "\n")
    m.write_text(to_markdown(r))
    return j, m
