"""`sparrow bench`: one run that profiles the device, measures its memory read bandwidth (the roofline) and benchmarks
a model's decode and prefill with Sparrow, side by side with llama.cpp where llama-cpp-python is installed, then
writes DIR/report.json (schema "sparrow.bench/1") and DIR/report.md.

The decode/prefill/T-curve numbers come from bench_decode.run (engines in worker processes, asked in turn, each
engine's greedy continuation checked against the other's before timing). The bandwidth bound of decoding is
bandwidth / bytes of weights read per token; the report gives the fraction of it each engine reaches.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from bench_device import bench_decode
from bench_device.profile import bandwidth_curve, device_profile

SCHEMA = "sparrow.bench/1"
QUICK = {"repeats": 3, "decode_tokens": 16, "batch_sizes": (1, 4, 16), "bw_mb": 128, "bw_repeats": 3}
FULL = {"repeats": 5, "decode_tokens": 64, "batch_sizes": bench_decode.BATCH_SIZES, "bw_mb": 512, "bw_repeats": 5}


def weight_bytes_per_token(path: Path) -> dict:
    """Bytes of weights one decode step reads: every tensor, except that of the token embedding only one row is read
    (unless it is tied to the output head, which reads all of it)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    rows = {t.name: int(t.shape[-1]) if len(t.shape) > 1 else 1 for t in reader.tensors}
    total = sum(sizes.values())
    per_token = total
    emb = sizes.get("token_embd.weight")
    if emb is not None and "output.weight" in sizes:
        per_token -= emb - emb // max(1, rows["token_embd.weight"])
    return {"file_tensor_bytes": total, "per_token": per_token, "tied_embeddings": "output.weight" not in sizes}


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def run_suite(model_path: Path, model_name: str, *, quick: bool = False, threads: int = 0, llama_cpp: bool = True,
              echo: Callable[[str], None] = print, progressbar=None) -> dict:
    """Run everything and return the report (a dict following SCHEMA). `progressbar(length, label)` returns a
    context manager with .update(n) (click.progressbar fits); None runs silently."""
    import psutil

    cfg = QUICK if quick else FULL
    threads = threads or psutil.cpu_count(logical=False) or 1
    profile = device_profile()
    notes = []

    def bar(length: int, label: str):
        if progressbar is None:
            import contextlib

            class _Null:
                def update(self, n):
                    pass
            return contextlib.nullcontext(_Null())
        return progressbar(length=length, label=label)

    with bar(threads, "memory bandwidth") as b:
        bandwidth = bandwidth_curve(threads, mb=cfg["bw_mb"], repeats=cfg["bw_repeats"], progress=lambda t: b.update(1))

    if not llama_cpp:
        llama_status = "skipped (--no-llama-cpp)"
    elif not llama_cpp_available():
        llama_status = "not installed"
    else:
        llama_status = "ran"
    engine_names = ("sparrow", "llama.cpp") if llama_status == "ran" else ("sparrow",)

    def decode(names):
        steps = cfg["repeats"] * len(names) * (2 + len(cfg["batch_sizes"]))
        with bar(steps, "decode/prefill (" + " vs ".join(names) + ")") as b:
            return bench_decode.run(str(model_path), threads=threads, repeats=cfg["repeats"],
                                    decode_tokens=cfg["decode_tokens"], engine_names=names,
                                    batch_sizes=cfg["batch_sizes"], progress=b.update)

    try:
        dec = decode(engine_names)
    except RuntimeError as e:
        if len(engine_names) == 1:
            raise
        llama_status = f"failed: {e}"
        notes.append(f"llama.cpp left out: {e}")
        dec = decode(("sparrow",))

    wbytes = weight_bytes_per_token(model_path)
    bw_t = bandwidth["threads"].get(threads) or bandwidth["threads"][max(bandwidth["threads"])]
    bound = bw_t["median"] * 1e9 / wbytes["per_token"]
    engines = {}
    for name, e in dec["engines"].items():
        engines[name] = {
            "decode_tok_s": e["decode_tok_s"],
            "prefill_tok_s": e["prefill_tok_s"],
            "peak_rss_mb": e["peak_rss_mb"],
            "batch_ms": {str(t): v for t, v in e["batch_ms"].items()},
            "batch_cost_vs_t1": {str(t): v for t, v in e["batch_cost_vs_t1"].items()},
            "bandwidth_bound_tok_s": bound,
            "fraction_of_bound": e["decode_tok_s"]["median"] / bound,
        }
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "settings": {"threads": threads, "repeats": cfg["repeats"], "decode_tokens": cfg["decode_tokens"],
                     "batch_sizes": list(cfg["batch_sizes"])},
        "device": profile,
        "bandwidth": {**bandwidth, "threads": {str(t): v for t, v in bandwidth["threads"].items()}},
        "model": {"name": model_name, "path": str(model_path), "file_bytes": model_path.stat().st_size,
                  "weight_bytes_per_token": wbytes["per_token"], "tied_embeddings": wbytes["tied_embeddings"],
                  "prompt_tokens": dec["prompt_tokens"]},
        "llama_cpp": llama_status,
        "greedy_agreement_tokens": dec["greedy_agreement_tokens"],
        "engines": engines,
        "ratio_sparrow_over_llama_cpp": dec.get("ratio_sparrow_over_llama_cpp"),
        "energy": "unavailable (not measured yet)",
        "notes": notes,
    }


def headline_table(r: dict) -> str:
    t = r["settings"]["threads"]
    rows = [("| engine | decode tok/s (min-max) | prefill tok/s (min-max) | peak RSS MB | bandwidth bound tok/s | "
             "fraction of bound |"),
            "|---|---:|---:|---:|---:|---:|"]
    for name, e in r["engines"].items():
        d, p = e["decode_tok_s"], e["prefill_tok_s"]
        rows.append(f"| {name} | {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) | "
                    f"{p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | {e['peak_rss_mb']:.0f} | "
                    f"{e['bandwidth_bound_tok_s']:.0f} | {100 * e['fraction_of_bound']:.0f}% |")
    if r["llama_cpp"] != "ran":
        rows.append(f"| llama.cpp | {r['llama_cpp']} | | | | |")
    m = r["model"]
    bw = r["bandwidth"]["threads"].get(str(t)) or {}
    return (f"{m['name']}, {t} threads, prompt {m['prompt_tokens']} tokens, "
            f"{m['weight_bytes_per_token'] / 2**20:.1f} MiB of weights read per token, "
            f"read bandwidth {bw.get('median', 0):.1f} GB/s\n\n" + "\n".join(rows))


def to_markdown(r: dict) -> str:
    d = r["device"]
    lines = [f"# Sparrow device benchmark ({r['mode']})", "", f"{r['created']}", "", "## Headline", "",
             headline_table(r), ""]
    if r.get("ratio_sparrow_over_llama_cpp"):
        x = r["ratio_sparrow_over_llama_cpp"]
        lines += [(f"Sparrow / llama.cpp: decode {x['decode']:.2f}x, prefill {x['prefill']:.2f}x "
                   f"(greedy continuations agree on the first {r['greedy_agreement_tokens']} tokens)."), ""]
    lines += ["## Device", "",
              (f"- CPU: {d['cpu_model']} ({d['arch']}), {d['physical_cores']} physical / {d['logical_cores']} "
               "logical cores"),
              f"- kernel tier: {d['kernel_tier']}; SIMD features: {' '.join(d['cpu_features']) or '-'}",
              "- caches: " + ", ".join(f"L{c['level']} {c['type'].lower()} {c['size']}" for c in d["caches"]),
              (f"- RAM: {d['ram_total_bytes'] / 2**30:.1f} GiB total, {d['ram_available_bytes'] / 2**30:.1f} GiB "
               "available"),
              f"- OS: {d['os']}", f"- energy: {r['energy']}", "",
              "## Memory read bandwidth", "", "| threads | GB/s median (min-max) |", "|---:|---:|"]
    for t, s in r["bandwidth"]["threads"].items():
        lines.append(f"| {t} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) |")
    lines += ["", f"Method: {r['bandwidth']['method']}.", "",
              "## Cost of T tokens in one call (relative to T=1)", "",
              "| T | " + " | ".join(r["engines"]) + " |", "|---:|" + "---:|" * len(r["engines"])]
    for t in r["settings"]["batch_sizes"]:
        cells = [f"{e['batch_cost_vs_t1'][str(t)]:.2f}x ({e['batch_ms'][str(t)]:.2f} ms)"
                 for e in r["engines"].values()]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def write_report(r: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "report.json", out / "report.md"
    j.write_text(json.dumps(r, indent=2) + "\n")
    m.write_text(to_markdown(r))
    return j, m
