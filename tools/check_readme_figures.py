"""Check that every figure in README.md is what a committed results file says, and that the README names the CPU it
was measured on.

    python tools/check_readme_figures.py [README.md]    # prints "N figures checked ..." or the problems (exit 1)

How it works (tests/test_readme.py runs it):
- SOURCES names each results file the README draws on (bench_device/results/..., models/results.json) and the CPU
  it was measured on, in the words the README uses for it ("Zen 4"); None for results that do not depend on the
  CPU (validation perplexity and sparsity). The file must exist and be tracked by git.
- FIGURES lists each README figure as a fragment of README text with a Python format field per value
  ("decodes at {:.0f} tok/s"), the source it comes from, and per field where the value is: a path into the JSON
  ("engines/sparrow/decode_tok_s/median", keys joined by "/"; a list index is a number) or a function of the loaded
  JSON for a derived value. The fragment, filled in, must appear in the README (line breaks and runs of spaces count
  as one space), and the README section holding it (between two headings) must name the source's CPU.
- Coverage: every number the README writes with a performance unit (tok/s, a ratio like 1.32x, ms, GB/s, %, tokens
  per step, dense steps) outside code blocks, and every number in a table cell (but the first cell of a row), must
  lie inside a checked fragment or inside a NOT_MEASURED phrase, which says why it is not a measurement (a setting,
  a citation, a definition). So a new figure without a results file, or one copied by hand, fails the check.

To change a figure: run the benchmark, commit its JSON under bench_device/results/ (named after what it measured and
the CPU, e.g. decode_smollm2_zen4_2t.json), point SOURCES at it and edit the README text and the fragment together.
When a fragment no longer matches, the script shows what the README says beside what the file says.
"""
from __future__ import annotations

import json
import re
import string
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Source:
    path: str          # relative to the repository root
    cpu: str | None    # how the README names the CPU it was measured on; None: the figures do not depend on it


SOURCES = {
    "decode": Source("bench_device/results/decode_smollm2_zen4_2t.json", "Zen 4"),
    "kernels_att": Source("bench_device/results/kernels_attention_zen4.json", "Zen 4"),
    "tcurve": Source("bench_device/results/tcurve_smollm2_zen4_2t_before_after.json", "Zen 4"),
    "report": Source("bench_device/results/full-report/report.json", "Zen 4"),
    "ffn": Source("bench_device/results/ffn_2048x64x128_q4_0_zen4.json", "Zen 4"),
    "synthetic": Source("bench_device/results/synthetic_mla_0.5b_1.2b_q4_0_zen4.json", "Zen 4"),
    "spec": Source("bench_device/results/speculative_zen4_2t.json", "Zen 4"),
    "spec_mla": Source("bench_device/results/speculative_mla_zen4_2t.json", "Zen 4"),  # (b) on the MLA shapes
    "mla": Source("bench_device/results/mla_synthetic_zen4_2t.json", "Zen 4"),
    "generate": Source("bench_device/results/generate_smollm2_zen4_2t.json", "Zen 4"),
    "adaptive": Source("bench_device/results/adaptive_smollm2_zen4_2t.json", "Zen 4"),
    "tune": Source("bench_device/results/tune_smollm2_quick_zen4_loaded.json", "Zen 4"),
    "expert_stream": Source("bench_device/results/expert_stream_mla_0.5b_1.2b_q4_0_xeon_noamx_2t.json", "Intel Xeon"),
    "quick_smollm2": Source("bench_device/results/quick-report-smollm2-xeon-noamx/report.json", "Intel Xeon"),
    "expert_stream_ab": Source("bench_device/results/expert_stream_ab_mla_heads_xeon_noamx_2t.json", "Intel Xeon"),
    "builds_gqa": Source("bench_device/results/builds_gqa_barriers_smollm2_xeon_noamx_2t.json", "Intel Xeon"),
    "decode_ab_gqa": Source("bench_device/results/decode_ab_gqa_barriers_smollm2_xeon_noamx_2t.json", "Intel Xeon"),
    "onnx": Source("bench_device/results/onnx_routed_smollm2_zen5_2t.json", "Zen 5"),
    "batch": Source("bench_device/results/batch_smollm2_xeon_2t.json", "Intel Xeon"),
    "batch_noamx": Source("bench_device/results/batch_smollm2_xeon_noamx_2t.json", "Intel Xeon"),
    "models": Source("models/results.json", None),
    "training": Source("models/results.json", "Zen 4"),  # the training times
}

Value = str | Callable[[Any], float]


@dataclass(frozen=True)
class Figure:
    text: str                   # README text, one format field per value
    source: str                 # a key of SOURCES
    values: tuple[Value, ...]   # per field: "a/path/in/the/json" or a function of the loaded JSON


def rec(**match: Any) -> Callable[[Any], dict]:
    """The one record of a synthetic results file with these fields (e.g. shape="0.5b", kind="chain", T=8)."""
    def pick(d: Any) -> dict:
        found = [r for r in d["records"] if all(r.get(k) == v for k, v in match.items())]
        if len(found) != 1:
            raise KeyError(f"{len(found)} records match {match}")
        return found[0]
    return pick


def synth_ratio(shape: str, kind: str, T: int, key: str = "") -> Callable[[Any], float]:
    """Sparse over dense time of a verification pass, or (key) a ratio the record holds."""
    def f(d: Any) -> float:
        sparse = rec(shape=shape, kind=kind, T=T, mode="chunk")(d)
        return sparse[key] if key else sparse["median_s"] / rec(shape=shape, kind=kind, T=T, mode="dense")(d)["median_s"]
    return f


def ffn(T: int, fraction: float, mode: str, key: str) -> Callable[[Any], float]:
    def f(d: Any) -> float:
        (r,) = [r for r in d["results"] if (r["threads"], r["T"], r["fraction"], r["mode"]) == (2, T, fraction, mode)]
        return r[key]
    return f


def replayed(shape: str, drafter: str, key: str = "sparse_speculation") -> Callable[[Any], float]:
    def f(d: Any) -> float:
        (r,) = [r for r in d["b"]["runs"] if r["shape"] == shape and r["replayed_from"] == drafter]
        return r["speedup_vs_dense_decode"][key]
    return f


def mla_kv(shape: str) -> Callable[[Any], dict]:
    def f(d: Any) -> dict:
        (r,) = [r for r in d["kv"] if r["shape"] == shape]
        return r
    return f


def sparse_decode_range(shape: str, end: str) -> Callable[[Any], float]:
    """(b)'s sparse decode ratio, lowest or highest over the runs of one shape (each drafter's run measures it)."""
    def f(d: Any) -> float:
        xs = [r["speedup_vs_dense_decode"]["sparse_decode"] for r in d["b"]["runs"] if r["shape"] == shape]
        return min(xs) if end == "min" else max(xs)
    return f


def per_step_ms(section: str, engine: str, *keys: str) -> Callable[[Any], float]:
    def f(d: Any) -> float:
        sp = d[section]["engines"][engine]["speculative"]
        return sum(sp[k] for k in keys) / sp["steps"] * 1e3
    return f


def zero_accept_share(engine: str) -> Callable[[Any], float]:
    def f(d: Any) -> float:
        hist = d["a"]["engines"][engine]["speculative"]["accepted_hist"]
        return hist.get("0", 0) / sum(hist.values())
    return f


def tune_row(stage: int, label: str, key: str) -> Callable[[Any], float]:
    def f(d: Any) -> float:
        (c,) = [c for c in d["stages"][stage]["candidates"] if c["label"] == label]
        return c["decode_tok_s"]["median"] if key == "tok_s" else c["ratio_vs_default"][key]
    return f


C, A = "c/engines/", "a/engines/"
PL, RC4 = "sparse + prompt-lookup", "sparse + recycling (chain 4)"
DM4, DMT = "sparse + draft-model (chain 4)", "sparse + draft-model (tree: chain 3 + 2 runners-up each)"
RTF, RTP = "sparse + recycling (tree 24, fixed)", "sparse + recycling (tree 24, planned)"
HY = "sparse + hybrid (lookup + tree 24, planned)"
CRTF, CRTP, CHY = "recycling (tree 24, fixed)", "recycling (tree 24, planned)", "hybrid (lookup + tree 24, planned)"


def spec_row(sec: str, engine: str, ratio: str, bold: bool = False) -> tuple[Value, ...]:
    base = f"{sec}/engines/{engine}/"
    return (base + "tok_s/median", base + f"{ratio}/median", base + f"{ratio}/min", base + f"{ratio}/max",
            base + "speculative/tokens_per_step")


def adaptive(part: str, engine: str, *keys: str) -> Callable[[Any], float]:
    """A value of bench_adaptive's results for one part ("greedy/chat": mode/prompt set, a key holding a slash)."""
    def f(d: Any) -> float:
        return lookup(d["parts"][part]["engines"][engine], "/".join(keys))
    return f


def adaptive_row(part: str, engine: str) -> tuple[Value, ...]:
    """A row of the README's table (d): overall ratio (median, min, max), the median and lowest prompt medians, and
    the share of steps that drafted."""
    def drafting(d: Any) -> float:
        sp = d["parts"][part]["engines"][engine]["speculative"]
        return sp["draft_steps"] / sp["steps"]
    return (adaptive(part, engine, "overall_ratio", "median"), adaptive(part, engine, "overall_ratio", "min"),
            adaptive(part, engine, "overall_ratio", "max"), adaptive(part, engine, "median_of_prompt_medians"),
            adaptive(part, engine, "lowest_prompt_median"), drafting)


ADAPTIVE_ENGINES = {"adaptive": "adaptive (the default)", "hybrid": "hybrid, drafting every step",
                    "gate shut": "gate shut: plain steps only"}
# (sampling column, prompts column, results part, engine) of each row of table (d)
ADAPTIVE_ROWS = [(label, prompts, f"{mode}/{prompts}", engine)
                 for mode, label in (("greedy", "greedy"), ("sampling", "chat's"))
                 for prompts in ("chat", "pays")
                 for engine in ADAPTIVE_ENGINES if not (prompts == "pays" and engine == "gate shut")]


def tune_ratio(stage: int, label: str) -> tuple[Value, ...]:
    return (tune_row(stage, label, "tok_s"), tune_row(stage, label, "median"), tune_row(stage, label, "min"),
            tune_row(stage, label, "max"))


def engine_row(engine: str) -> tuple[Value, ...]:
    e = f"engines/{engine}/"
    return tuple(e + k for k in ("decode_tok_s/median", "decode_tok_s/min", "decode_tok_s/max", "prefill_tok_s/median",
                                 "prefill_tok_s/min", "prefill_tok_s/max", "ttft_ms/median", "ttft_ms/min",
                                 "ttft_ms/max", "peak_rss_mb", "bandwidth_bound_tok_s", "fraction_of_bound"))


def engine_text(name: str) -> str:
    """A row of the bench report's headline table."""
    return (f"| {name} | " + "{:.1f} ({:.1f}-{:.1f}) | {:.1f} ({:.1f}-{:.1f}) | {:.1f} ({:.1f}-{:.1f}) | {:.0f} "
            "| {:.0f} | {:.0%} |")

def expert_stream_row(shape: str, mode: str) -> Figure:
    """One row of the README's bytes-by-phase table (bench_expert_stream): bytes per token by phase, time per pass and
    fraction of the bound with the down halves read from the file, in the float streaming layout and in the int8 one,
    int8's speedup over float, and the attention and experts phases' fractions (experts: int8, then float)."""
    def r(v: str) -> Callable[[Any], dict]:
        return rec(shape=shape, mode=mode, variant=v)

    def mb(ph: str) -> Callable[[Any], float]:
        return lambda d: r("int8")(d)["phases"][ph]["bytes_per_token"] / 1e6

    def ms(v: str) -> Callable[[Any], float]:
        return lambda d: r(v)(d)["s_per_pass"]["median"] * 1e3

    def frac(v: str) -> Callable[[Any], float]:
        return lambda d: r(v)(d)["fraction_of_bound"] * 100

    def phase_frac(v: str, ph: str) -> Callable[[Any], float]:
        return lambda d: r(v)(d)["phases"][ph]["fraction_of_bound"] * 100

    return Figure(f"| {shape} | {mode} | {{:.1f}} / {{:.1f}} / {{:.1f}} / {{:.1f}} | {{:.1f}} ms ({{:.0f}}%) | "
                  f"{{:.1f}} ms ({{:.0f}}%) | {{:.1f}} ms ({{:.0f}}%) | {{:.2f}}x | {{:.0f}}% / {{:.0f}}% "
                  f"(float {{:.0f}}%) |", "expert_stream",
                  (mb("attention"), mb("router"), mb("experts"), mb("head"), ms("file"), frac("file"),
                   ms("float"), frac("float"), ms("int8"), frac("int8"), lambda d: ms("float")(d) / ms("int8")(d),
                   phase_frac("int8", "attention"), phase_frac("int8", "experts"), phase_frac("float", "experts")))


def attention_us(T: int) -> Callable[[Any], float]:
    """bench_kernels' attention row (n = 1024 cached slots, avx512 tier) for T tokens, in us."""
    return lambda d: 1e6 * next(r["median_s"] for r in d["results"]
                                if r["shape"] == "attention n=1024" and r["tier"] == "avx512" and r["T"] == T)


def expert_halves(variant: str, where: str, half: str) -> Callable[[Any], float]:
    """Thread 0's ms per dense 0.5b layer in the experts' up or down halves, from the caches or DRAM."""
    return lambda d: rec(shape="0.5b", mode="dense", variant=variant)(d)["expert_halves"][where][f"{half}_ms_per_layer"]


FIGURES: list[Figure] = [
    # ---- the introduction ----
    Figure("Sparrow decodes at {:.0f} tok/s against llama.cpp's {:.0f} tok/s on the same file ({:.2f}x), prefills "
           "{:.1f}x faster, and evaluates 8 tokens in one call for {:.1f}x the cost of one (llama.cpp: {:.1f}x)",
           "decode", ("engines/sparrow/decode_tok_s/median", "engines/llama.cpp/decode_tok_s/median",
                      "ratio_sparrow_over_llama_cpp/decode", "ratio_sparrow_over_llama_cpp/prefill",
                      "engines/sparrow/batch_cost_vs_t1/8", "engines/llama.cpp/batch_cost_vs_t1/8")),
    Figure("takes {:.1f} us for one token and {:.1f} us for 8 on the avx512 tier", "kernels_att",
           (attention_us(1), attention_us(8))),
    Figure("after 1024 cached tokens, {:.2f}x\n(llama.cpp: {:.2f}x)", "decode",
           ("engines/sparrow/long_cost_vs_t1/8", "engines/llama.cpp/long_cost_vs_t1/8")),
    *[Figure(f"| {cached} | {t} | {{:.2f}} ms{' ({:.2f}x)' if t == 8 else ''} | {{:.2f}} ms"
             f"{' ({:.2f}x)' if t == 8 else ''} | {{:.2f}} ms{' ({:.2f}x)' if t == 8 else ''} |", "tcurve",
             tuple(f"{run}/engines/{engine}/{kind}_{what}/{t}"
                   for run, engine in (("before", "sparrow"), ("after", "sparrow"), ("after", "llama.cpp"))
                   for what in (("ms", "cost_vs_t1") if t == 8 else ("ms",))))
      for cached, kind, t in ((64, "batch", 8), (64, "batch", 64), (1024, "long", 1), (1024, "long", 8))],
    Figure("memory-bandwidth bound at {:.0f} tok/s", "report", ("engines/sparrow/bandwidth_bound_tok_s",)),
    Figure("adds a median {:.2f}x on top", "spec", (C + CHY + "/ratio_vs_plain/median",)),
    Figure("sparse execution plus speculation reaches {:.1f}-{:.1f}x dense decode\n(replayed", "spec_mla",
           (replayed("0.5b", "recycling (chain 4)"), replayed("1.2b", "recycling (chain 4)"))),
    Figure("the latent KV cache is {:.1f} KB per token at 1.2B, {:.0f}x smaller", "mla",
           (lambda d: mla_kv("1.2b")(d)["cached_bytes_per_token"] / 1e3, lambda d: mla_kv("1.2b")(d)["ratio"])),
    # ---- BlockFFN decode against the byte bound: bench_expert_stream (issue 21) ----
    Figure("shape's timings: {:.1f} GB/s (0.5b) and {:.1f} GB/s (1.2b); the large probe (1 GiB per thread) read {:.1f} "
           "GB/s and {:.1f} GB/s beside it", "expert_stream",
           ("bandwidth/per_shape/0.5b", "bandwidth/per_shape/1.2b", "bandwidth/dram_gb_s/0.5b",
            "bandwidth/dram_gb_s/1.2b")),
    *[expert_stream_row(shape, mode) for shape in ("0.5b", "1.2b") for mode in ("dense", "token", "chunk")],
    Figure("token-sparse decode is {:.2f}x (0.5b) and {:.2f}x (1.2b) as fast as dense for {:.2f}x and {:.2f}x fewer "
           "bytes", "expert_stream",
           tuple((lambda d, sh=sh, k=k: rec(shape=sh, mode="dense", variant="int8")(d)[k]
                  / rec(shape=sh, mode="token", variant="int8")(d)[k] if k == "bytes_per_token" else
                  rec(shape=sh, mode="dense", variant="int8")(d)["s_per_pass"]["median"]
                  / rec(shape=sh, mode="token", variant="int8")(d)["s_per_pass"]["median"])
                 for k, sh in (("s", "0.5b"), ("s", "1.2b"), ("bytes_per_token", "0.5b"),
                               ("bytes_per_token", "1.2b")))),
    Figure("thread 0 spent {:.3f} ms in the down halves with the experts in the caches and {:.3f} ms with them coming "
           "from DRAM (float: {:.3f} ms and {:.3f} ms), against {:.3f} ms and {:.3f} ms in the up halves",
           "expert_stream",
           (expert_halves("int8", "cached", "down"), expert_halves("int8", "dram", "down"),
            expert_halves("float", "cached", "down"), expert_halves("float", "dram", "down"),
            expert_halves("int8", "cached", "up"), expert_halves("int8", "dram", "up"))),
    Figure("after / before speed {:.2f}x, {:.2f}x, {:.2f}x (0.5b dense, token, chunk) and {:.2f}x, {:.2f}x, {:.2f}x (1.2b) "
           "in four rounds; {:.2f}x, {:.2f}x, {:.2f}x (0.5b) in six rounds", "expert_stream_ab",
           tuple(f"runs/{run}/speedup_after_over_before/{sh} {m}"
                 for run, shapes in (("both_shapes_4_rounds", ("0.5b", "1.2b")), ("0.5b_6_rounds_32_steps", ("0.5b",)))
                 for sh in shapes for m in ("dense", "token", "chunk"))),
    Figure("after / before {:.3f} (T = 1), {:.3f}, {:.3f}, {:.3f}, {:.3f} (T = 2, 4, 8, 16) and {:.3f} (T = 64)",
           "builds_gqa", tuple(f"results/{i}/after_over_before" for i in range(6))),
    Figure("15 repeats): decode {:.3f}x, prefill {:.3f}x as fast as before", "decode_ab_gqa",
           ("ratio_sparrow_over_before/decode", "ratio_sparrow_over_before/prefill")),
    Figure("so the bound is the probe with buffers of that size, {:.1f} GB/s", "quick_smollm2",
           ("phases/bandwidth_gb_s",)),
    *[Figure(f"| {ph} | {{:.1f}} | {{:.2f}} ms | {{:.0f}}% |", "quick_smollm2",
             (lambda d, ph=ph: d["phases"]["phases"][ph]["bytes_per_token"] / 1e6,
              lambda d, ph=ph: d["phases"]["phases"][ph]["s_per_pass"] * 1e3,
              lambda d, ph=ph: d["phases"]["phases"][ph]["fraction_of_bound"] * 100))
      for ph in ("attention", "ffn", "head")],
    Figure("logits of four decode steps move {:.1e} in NMSE from the file view's on 0.5b (float: {:.0e},", "expert_stream",
           (lambda d: rec(shape="0.5b", mode="dense", variant="int8")(d)["vs_file_logits_nmse"],
            lambda d: rec(shape="0.5b", mode="dense", variant="float")(d)["vs_file_logits_nmse"])),
    # ---- the C generator: bench_generate ----
    *[Figure(f"| {label} | {{:.2f}} ({{:.2f}}-{{:.2f}}) | {{:.2f}} | {{:.1f}} us |", "generate",
             (f"modes/greedy/{e}/ratio_vs_python_plain/median", f"modes/greedy/{e}/ratio_vs_python_plain/min",
              f"modes/greedy/{e}/ratio_vs_python_plain/max", f"modes/greedy/{e}/tokens_per_step",
              f"modes/greedy/{e}/loop_us_per_step"))
      for label, e in (("C plain", "C plain"), ("C prompt lookup", "C lookup"),
                       ("C Token Recycling, chain of 4", "C recycling"), ("C hybrid, planned", "C hybrid"),
                       ("C adaptive (the default)", "C adaptive"))],
    Figure("| Python adaptive (chat's loop before) | {:.2f} ({:.2f}-{:.2f}) |", "generate",
           tuple(f"modes/greedy/python adaptive/ratio_vs_python_plain/{k}" for k in ("median", "min", "max"))),
    Figure("C plain {:.2f}x ({:.2f}-{:.2f}; its loop {:.1f} us\nper step, the sampler's pass over the 49152 logits), "
           "Python adaptive {:.2f}x ({:.2f}-{:.2f}), C adaptive {:.2f}x ({:.2f}-{:.2f};\n{:.1f} us)", "generate",
           (*(f"modes/sampling/C plain/ratio_vs_python_plain/{k}" for k in ("median", "min", "max")),
            "modes/sampling/C plain/loop_us_per_step",
            *(f"modes/sampling/python adaptive/ratio_vs_python_plain/{k}" for k in ("median", "min", "max")),
            *(f"modes/sampling/C adaptive/ratio_vs_python_plain/{k}" for k in ("median", "min", "max")),
            "modes/sampling/C adaptive/loop_us_per_step")),
    # ---- multi-head latent attention: bench_mla ----
    *[Figure(f"| {shape} ({layers} layers) | {{:.1f}} KB | {{:.1f}} KB | {{:.1f}}x | {{:.1f}} MiB |", "mla",
             (lambda d, s=shape: mla_kv(s)(d)["cached_bytes_per_token"] / 1e3,
              lambda d, s=shape: mla_kv(s)(d)["full_k_v_bytes_per_token"] / 1e3,
              lambda d, s=shape: mla_kv(s)(d)["ratio"],
              lambda d, s=shape: mla_kv(s)(d)["session_4096_kv_bytes"] / 2 ** 20))
      for shape, layers in (("0.1b", 16), ("0.5b", 27), ("0.8b", 32), ("1.2b", 35))],
    Figure("| ms per token | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |", "mla",
           tuple(lambda d, i=i: d["decode_curve"]["points"][i]["ms_median"] for i in range(6))),
    Figure("| x P = 64 | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} |", "mla",
           tuple(lambda d, i=i: d["decode_curve"]["points"][i]["x_P64"] for i in range(6))),
    Figure("(1024 are at\n{:.2f}x)", "mla", (lambda d: d["decode_curve"]["points"][3]["x_P64"],)),
    # ---- BlockFFN and sparsity: bench_ffn ----
    Figure("at 80% TLS a decode token costs {:.2f}x the dense FFN ({:.2f} ms vs {:.2f} ms); a chunk of 8 tokens at 70% "
           "CLS (each token at 80% TLS) costs {:.2f}x the dense 8-token batch and {:.3f}x eight dense single-token "
           "steps", "ffn",
           (ffn(1, 0.2, "token", "ratio_dense"), lambda d: ffn(1, 0.2, "token", "median_s")(d) * 1e3,
            lambda d: ffn(1, 0.2, "dense", "median_s")(d) * 1e3, ffn(8, 0.3, "chunk", "ratio_dense"),
            ffn(8, 0.3, "chunk", "ratio_T_dense1"))),
    # ---- synthetic shapes ----
    *[Figure(f"| {shape} (TLS {{:.1%}}, CLS-8 {{:.1%}}) | {{:.1f}} -> {{:.1f}} ({{:.2f}}x) | {{:.2f}} | {{:.2f}} | "
             "{:.2f} |", "synthetic",
             (lambda d, s=shape: rec(shape=s, kind="decode", mode="token")(d)["measured_sparsity"]["tls"],
              lambda d, s=shape: rec(shape=s, kind="decode", mode="token")(d)["measured_sparsity"]["cls_8"],
              lambda d, s=shape: rec(shape=s, kind="decode", mode="dense")(d)["tok_s"],
              lambda d, s=shape: rec(shape=s, kind="decode", mode="token")(d)["tok_s"],
              lambda d, s=shape: (rec(shape=s, kind="decode", mode="dense")(d)["median_s"]
                                  / rec(shape=s, kind="decode", mode="token")(d)["median_s"]),
              synth_ratio(shape, "chain", 8), synth_ratio(shape, "tree", 8),
              synth_ratio(shape, "chain", 8, "ratio_to_dense_decode")))
      for shape in ("0.5b", "1.2b")],
    Figure("at T = 25 it costs {:.1f}-{:.1f} dense steps", "synthetic",
           (lambda d: min(r["ratio_to_dense_decode"] for r in d["records"] if r["T"] == 25 and r["mode"] == "chunk"),
            lambda d: max(r["ratio_to_dense_decode"] for r in d["records"] if r["T"] == 25 and r["mode"] == "chunk"))),
    # ---- shipped models ----
    Figure("validation TLS {:.1%}, CLS-8 {:.1%}, perplexity {:.2f} (native)", "models",
           ("blockffn-tiny/native_tls", "blockffn-tiny/native_cls8", "blockffn-tiny/native_val_ppl")),
    Figure("trained for {:.0f} to {:.0f} minutes each", "training",
           (lambda d: d["blockffn-tiny"]["train_seconds"] / 60, lambda d: d["blockffn-tiny-draft"]["train_seconds"] / 60)),
    # ---- speculative decoding ----
    Figure("chain 3 + 2 runners-up accepts {:.2f} draft tokens per step against {:.2f} for a chain of 4, and steps that "
           "accept nothing drop from {:.1%} to {:.1%}", "spec",
           (A + DMT + "/speculative/mean_accepted", A + DM4 + "/speculative/mean_accepted",
            zero_accept_share(DM4), zero_accept_share(DMT))),
    Figure("(load average {} before, {} after: the benchmark's own two threads)", "spec",
           ("load_before/0", "load_after/0")),
    Figure("| plain decode | {:.1f} | 1.00 | 1 |", "spec", (C + "plain/tok_s/median",)),
    Figure("| llama.cpp plain decode (same GGUF) | {:.1f} | {:.2f} ({:.2f}-{:.2f}) | 1 |", "spec",
           spec_row("c", "llama.cpp plain", "ratio_vs_plain")[:4]),
    Figure("| prompt lookup | {:.1f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("c", "prompt-lookup", "ratio_vs_plain")),
    Figure("| Token Recycling, chain of 4 | {:.1f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("c", "recycling (chain 4)", "ratio_vs_plain")),
    Figure("| Token Recycling, 24-node tree, verified whole | {:.1f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("c", CRTF, "ratio_vs_plain")),
    Figure("| Token Recycling, 24-node tree, planned | {:.1f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("c", CRTP, "ratio_vs_plain")),
    Figure("| hybrid (lookup + planned tree) | {:.1f} | **{:.2f}** ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("c", CHY, "ratio_vs_plain")),
    Figure("(a) the shipped BlockFFN (TLS {:.1%}, CLS-8 {:.1%} on these prompts)", "spec",
           ("a/routing/tls", "a/routing/cls8")),
    Figure("Its sparse decode steps take ~{:.2f} ms", "spec", (lambda d: 1e3 / d["a"]["engines"]["sparse plain"]["tok_s"]["median"],)),
    Figure("| dense plain | {:.0f} | 1.00 | 1 |", "spec", (A + "dense plain/tok_s/median",)),
    Figure("| sparse plain | {:.0f} | {:.2f} ({:.2f}-{:.2f}) | 1 |", "spec",
           spec_row("a", "sparse plain", "ratio_vs_dense_plain")[:4]),
    Figure("| sparse + draft model (chain of 4) | {:.0f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("a", DM4, "ratio_vs_dense_plain")),
    Figure("| sparse + draft model (chain of 3 + 2 runners-up each) | {:.0f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |",
           "spec", spec_row("a", DMT, "ratio_vs_dense_plain")),
    Figure("| sparse + prompt lookup | {:.0f} | **{:.2f}** ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("a", PL, "ratio_vs_dense_plain")),
    Figure("| sparse + Token Recycling chain of 4 | {:.0f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("a", RC4, "ratio_vs_dense_plain")),
    Figure("| sparse + recycling tree, verified whole | {:.0f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("a", RTF, "ratio_vs_dense_plain")),
    Figure("| sparse + recycling tree, planned | {:.0f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("a", RTP, "ratio_vs_dense_plain")),
    Figure("| sparse + hybrid | {:.0f} | {:.2f} ({:.2f}-{:.2f}) | {:.2f} |", "spec",
           spec_row("a", HY, "ratio_vs_dense_plain")),
    *[Figure(f"| {shape} | {{:.2f}}-{{:.2f}}x | {b}{{:.2f}}x{b} | {b}{{:.2f}}x{b} | {{:.2f}}x |", "spec_mla",
             (sparse_decode_range(shape, "min"), sparse_decode_range(shape, "max"),
              replayed(shape, "recycling (chain 4)"), replayed(shape, "draft-model (chain 4)"),
              replayed(shape, "prompt-lookup")))
      for shape, b in (("0.5b", ""), ("1.2b", "**"))],
    Figure("one token takes {:.1f} ms, 8 in one call {:.1f} ms, so each extra token costs ~{:.2f} ms", "decode",
           ("engines/sparrow/batch_ms/1", "engines/sparrow/batch_ms/8",
            lambda d: (d["engines"]["sparrow"]["batch_ms"]["8"] - d["engines"]["sparrow"]["batch_ms"]["1"]) / 7)),
    Figure("({:.1f} for the recycling tree, {:.1f} for the hybrid, in (c))", "spec",
           (C + CRTP + "/planner/kept_per_step", C + CHY + "/planner/kept_per_step")),
    Figure("decodes at ~{:.2f} ms/token (sparse plain in (a))", "spec",
           (lambda d: 1e3 / d["a"]["engines"]["sparse plain"]["tok_s"]["median"],)),
    Figure("the hybrid spends {:.2f} ms per step drafting, planning and updating against {:.2f} ms verifying, prompt "
           "lookup {:.2f} ms against {:.2f} ms", "spec",
           (per_step_ms("a", HY, "draft_s", "sample_s", "accept_s"), per_step_ms("a", HY, "verify_s"),
            per_step_ms("a", PL, "draft_s", "sample_s", "accept_s"), per_step_ms("a", PL, "verify_s"))),
    Figure("reaches {:.1f}-{:.1f}x dense decode with the recycling chain's\nacceptance ({:.1f}-{:.1f}x with the tiny "
           "draft model's", "spec_mla",
           (replayed("0.5b", "recycling (chain 4)"), replayed("1.2b", "recycling (chain 4)"),
            replayed("0.5b", "draft-model (chain 4)"), replayed("1.2b", "draft-model (chain 4)"))),
    Figure("is not reached: {:.2f}x with the planner, {:.2f}x as part of the hybrid", "spec",
           (C + CRTP + "/ratio_vs_plain/median", C + CHY + "/ratio_vs_plain/median")),
    # ---- the adaptive (default) path: bench_adaptive ----
    Figure("where drafting every step runs at {:.2f}x plain decoding, it runs at {:.2f}x, and greedy at {:.2f}x",
           "adaptive", (adaptive("sampling/chat", "hybrid", "overall_ratio", "median"),
                        adaptive("sampling/chat", "adaptive", "overall_ratio", "median"),
                        adaptive("greedy/chat", "adaptive", "overall_ratio", "median"))),
    Figure("(load average {:.2f} before: the tail of an earlier run; {:.2f} after: the benchmark's own two threads)",
           "adaptive", ("load_before/0", "load_after/0")),
    *[Figure(f"| {label} | {prompts} | {ADAPTIVE_ENGINES[engine]} | " + ("**{:.2f}**" if engine == "adaptive" else "{:.2f}")
             + " ({:.2f}-{:.2f}) | {:.2f} | {:.2f} | {:.0%} |", "adaptive", adaptive_row(part, engine))
      for label, prompts, part, engine in ADAPTIVE_ROWS],
    Figure("the adaptive path's lowest prompt median is {:.2f}x plain decoding with chat's sampling defaults ({:.2f}x "
           "greedy), and it is as fast or faster overall with either sampling, where drafting every step falls to "
           "{:.2f}x", "adaptive",
           (adaptive("sampling/chat", "adaptive", "lowest_prompt_median"),
            adaptive("greedy/chat", "adaptive", "lowest_prompt_median"),
            adaptive("sampling/chat", "hybrid", "lowest_prompt_median"))),
    # ---- benchmarks: the full report's headline ----
    Figure("the native probe read {:.1f} GB/s with 2 pinned threads, numpy {:.1f}", "report",
           ("bandwidth/threads/2/median", "bandwidth/numpy/threads/2/median")),
    Figure(engine_text("sparrow"), "report", engine_row("sparrow")),
    Figure(engine_text("llama.cpp"), "report", engine_row("llama.cpp")),
    Figure("with NMSE {} (one near-tie fork in {} steps, gap {:.2f})", "report",
           (lambda d: f"{d['oracle']['checks']['sparrow']['nmse']:.1e}".replace("e-0", "e-"),
            "oracle/checks/sparrow/positions", "oracle/checks/sparrow/max_fork_gap")),
    # ---- ONNX side by side: bench_onnx ----
    Figure("routers switch off {:.1f}% of the experts per token", "onnx", (lambda d: 100 * d["sparsity"]["measured_tls"],)),
    Figure("decodes at {:.2f} ms per token exported with onnxruntime's MoE operator against {:.2f} ms with a dense FFN: "
           "{:.2f}x (min {:.2f}x, max {:.2f}x), where the bytes a token reads fall {:.2f}x and the native runtime's "
           "sparse path is {:.2f}x its dense one", "onnx",
           ("sparsity/decode_ms_per_token/onnx_moe/median", "sparsity/decode_ms_per_token/onnx_dense/median",
            "sparsity/moe_speedup_over_dense/median", "sparsity/moe_speedup_over_dense/min",
            "sparsity/moe_speedup_over_dense/max", "sparsity/bytes_per_token/ratio",
            "sparsity/native_sparse_speedup_over_dense/median")),
    Figure("decode {:.0f} tok/s native (Q4_1 GGUF), {:.0f} tok/s onnxruntime f32, {:.0f} int8, {:.0f} int4, {:.0f} "
           "llama.cpp; prefill of 64 tokens {:.0f} tok/s native, {:.0f} onnxruntime f32, {:.0f} int8, {:.0f} llama.cpp",
           "onnx", tuple(f"smollm2/{k}_tok_s/{e}/median" for k, es in
                         (("decode", ("native", "onnx_f32", "onnx_int8", "onnx_int4", "llama.cpp")),
                          ("prefill", ("native", "onnx_f32", "onnx_int8", "llama.cpp"))) for e in es)),
    # ---- tuning ----
    Figure("(load average {} before, {} after; `bench_device/results/tune_smollm2_quick_zen4_loaded.json`", "tune",
           ("search/load_before/0", "search/load_after/0")),
    Figure("| threads | 2t none (baseline) | {:.1f} | 1.00 |", "tune", (tune_row(0, "2t none", "tok_s"),)),
    Figure("| threads | 1t none | {:.1f} | {:.2f} ({:.2f}-{:.2f}) |", "tune", tune_ratio(0, "1t none")),
    *(Figure(f"| {n} | {{:.0f}} ({{:.0f}}-{{:.0f}}) | {{:.2f}}x |", "batch",
             (f"engine/{i}/tok_s/median", f"engine/{i}/tok_s/min", f"engine/{i}/tok_s/max", f"engine/{i}/speedup_vs_1"))
      for i, n in enumerate((1, 2, 4, 8, 16, 32))),
    Figure("a {:.0f}-token prompt and {:.0f} generated tokens, greedy, medians of {:.0f} rounds", "batch",
           ("prompt_tokens", "tokens_per_request", "rounds")),
    Figure("runs at {:.0f}, {:.0f} and {:.0f} tok/s with 1, 8 and 32 at once: {:+.1f}%, {:+.1f}% and {:+.1f}% of the "
           "in-process time", "batch",
           ("server/0/tok_s/median", "server/1/tok_s/median", "server/2/tok_s/median",
            *(lambda d, i=i: 100 * d["server"][i]["overhead_vs_engine"] for i in range(3)))),
    Figure("`bench_device/results/batch_smollm2_xeon_noamx_2t.json`, {:.0f} rounds, the same requests) one sequence "
           "runs at {:.0f} tok/s and 8, 16 and 32 at once at {:.0f}, {:.0f} and {:.0f} tok/s: {:.2f}x, {:.2f}x and "
           "{:.2f}x", "batch_noamx",
           ("rounds", "engine/0/tok_s/median", *(f"engine/{i}/tok_s/median" for i in (3, 4, 5)),
            *(f"engine/{i}/speedup_vs_1" for i in (3, 4, 5)))),
    Figure("the server added {:+.1f}% and {:+.1f}% with 1 and 8 at once", "batch_noamx",
           tuple(lambda d, i=i: 100 * d["server"][i]["overhead_vs_engine"] for i in range(2))),
    Figure("grew by {:.0f} MiB serving the 32 sequences, of which {:.0f} MiB is the KV cache", "batch",
           (lambda d: d["server_memory"]["growth_bytes"] / 2**20, lambda d: d["server_memory"]["kv_filled_bytes"] / 2**20)),
    Figure("{:.1f}% of the dense expert bytes per pass for 1 sequence, {:.1f}% for 8, {:.1f}% for 16", "batch",
           tuple(lambda d, i=i: 100 * d["blockffn_union"][i]["expert_bytes_per_pass"] /
                 d["blockffn_union"][i]["dense_bytes_per_pass"] for i in (0, 3, 4))),
    Figure("expert bytes per token fall from {:.0f} KB to {:.0f} KB and {:.0f} KB", "batch",
           tuple(lambda d, i=i: d["blockffn_union"][i]["expert_bytes_per_token"] / 1e3 for i in (0, 3, 4))),
    Figure("| drafters at 1 thread | 1t prompt-lookup k=4 | {:.1f} | {:.2f} ({:.2f}-{:.2f}) |", "tune",
           tune_ratio(1, "1t prompt-lookup k=4")),
    Figure("| drafters at 1 thread | 1t recycling chain of 4 | {:.1f} | {:.2f} ({:.2f}-{:.2f}) |", "tune",
           tune_ratio(1, "1t recycling branching=1,max_nodes=4")),
    Figure("| drafters at 1 thread | 1t hybrid (chosen) | {:.1f} | **{:.2f}** ({:.2f}-{:.2f}) |", "tune",
           tune_ratio(1, "1t hybrid")),
    Figure("| drafters at 1 thread | 2t hybrid (then the untuned default) | {:.1f} | {:.2f} ({:.2f}-{:.2f}) |", "tune",
           tune_ratio(1, "2t hybrid")),
    Figure("the tuned setting ran {:.1f}x as fast as the then untuned default here", "tune",
           (lambda d: tune_row(1, "1t hybrid", "tok_s")(d) / tune_row(1, "2t hybrid", "tok_s")(d),)),
]

# Numbers in the README that look like figures but are not measurements, and why.
NOT_MEASURED: list[tuple[str, str]] = [
    ("targets (4x at 8, 6x at 32)", "issue 19's goals, not measurements"),
    ("a fraction above 100% means", "how to read the table's fractions, not a measurement"),
    ("A fraction above 100% here", "how to read the table's fractions, not a measurement"),
    ("<= 1.3x the cost at 64", "issue 14's goal for MLA decode, not a measurement"),
    ("issue 18's target of 2x", "a goal (issue 18), not a result"),
    ("6-14x the bytes", "the ratios of the KV table below (computed from the shapes, checked there)"),
    ("TLS 80% / CLS-8 70%", "the routing a synthetic benchmark is set to (the paper's)"),
    ("TLS 80% / CLS 70%", "the same setting"),
    ("at 80% TLS", "the routing bench_ffn sets"),
    ("at 70% CLS (each token at 80% TLS)", "the routing bench_ffn sets"),
    ("the paper's best end-side figure: 3.67x, on a GPU", "a citation (BlockFFN paper)"),
    ("on SmolLM2 (1.5x)", "a goal (issue 6), not a result"),
    ("by at least 2% at the median", "the tuner's rule (MIN_GAIN)"),
    ("A fraction above 100%", "the bench report's rule for marking figures above their bound"),
    ("† above 100%", "the same rule"),
    ("| 1.00 |", "a baseline's ratio to itself"),
    ("hidden 256, 4 layers, 32 experts x 32", "the shipped model's configuration"),
    ("hidden 128, 2 layers", "the draft model's configuration"),
    ("(temperature 0.2, top-p 0.9, repetition penalty 1.1)", "chat's sampling defaults"),
    ("drafts while the first beats the second by 3%", "the draft gate's margin (DraftGate)"),
]

# What counts as a figure: a number with a performance unit.
UNIT_FIGURE = re.compile(r"(?<![\w.])~?\d+(?:\.\d+)?(?:e-?\d+)?(?:-\d+(?:\.\d+)?)?"
                         r"(?:x\b|%| ?tok/s| ms\b| ms/token| GB/s| tokens/step| (?:draft )?tokens per step"
                         r"| dense steps)")
CELL_NUMBER = re.compile(r"(?<![\w.=-])\d+(?:\.\d+)?(?![\w.])")


def loose(text: str) -> str:
    """A regex matching text with any run of whitespace where it has whitespace."""
    return r"\s+".join(re.escape(part) for part in text.split())


def lookup(data: Any, where: Value) -> Any:
    if callable(where):
        return where(data)
    for key in where.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def _blank_code(text: str) -> str:
    """The README with fenced code blocks replaced by spaces (positions kept)."""
    return re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.DOTALL)


def _sections(text: str) -> list[tuple[int, int]]:
    """(start, end) of each section: from a heading line to the next (the text before the first heading is one)."""
    starts = [0] + [m.start() for m in re.finditer(r"^#+ ", _blank_code(text), flags=re.MULTILINE)]
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(text)]) if b > a]


def _tracked(paths: list[str]) -> set[str] | None:
    """Which of paths git tracks; None when this is not a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return set(out.stdout.split())


def check(readme: Path = ROOT / "README.md") -> tuple[list[str], int]:
    """(problems, figures checked)."""
    text = readme.read_text(encoding="utf-8")
    problems: list[str] = []
    data: dict[str, Any] = {}
    tracked = _tracked(sorted({s.path for s in SOURCES.values()}))
    for key, src in SOURCES.items():
        path = ROOT / src.path
        if not path.is_file():
            problems.append(f"{src.path} ({key}): no such results file")
            continue
        if tracked is not None and src.path not in tracked:
            problems.append(f"{src.path} ({key}): not committed (git does not track it)")
        data[key] = json.loads(path.read_text(encoding="utf-8"))
    sections = _sections(text)
    covered: list[tuple[int, int]] = []
    checked = 0
    for fig in FIGURES:
        if fig.source not in data:
            continue
        src = SOURCES[fig.source]
        try:
            values = [lookup(data[fig.source], v) for v in fig.values]
            expected = fig.text.format(*values)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            problems.append(f"{src.path}: cannot read the values for {fig.text!r}: {e!r}")
            continue
        found = list(re.finditer(loose(expected), text))
        if not found:
            problems.append(f"README does not say {expected!r} ({src.path})" + _what_it_says(fig.text, text))
            continue
        checked += 1
        for m in found:
            covered.append(m.span())
            a, b = next(s for s in sections if s[0] <= m.start() < s[1])
            if src.cpu and src.cpu not in text[a:b]:
                heading = text[a:b].splitlines()[0]
                problems.append(f"the section {heading!r} gives {expected!r} ({src.path}) without naming the CPU "
                                f"it was measured on ({src.cpu})")
    for phrase, _why in NOT_MEASURED:
        covered += [m.span() for m in re.finditer(loose(phrase), text)]
    for start, end, shown in _figures_in(text):
        if not any(a <= start and end <= b for a, b in covered):
            line = text.count("\n", 0, start) + 1
            problems.append(f"README.md:{line}: {shown!r} has no results file (add it to FIGURES, or to NOT_MEASURED "
                            "with the reason it is not a measurement)")
    return problems, checked


def _figures_in(text: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of every number the coverage rule asks a source for."""
    body = _blank_code(text)
    out = [(m.start(), m.end(), m.group(0)) for m in UNIT_FIGURE.finditer(body)]
    lines = body.split("\n")
    pos = 0
    for i, line in enumerate(lines):
        is_header = i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|\s*$", lines[i + 1])
        if line.startswith("|") and not is_header and not re.match(r"^\|[-:| ]+\|\s*$", line):
            first = line.index("|", 1) if "|" in line[1:] else len(line)
            out += [(pos + first + m.start(), pos + first + m.end(), m.group(0))
                    for m in CELL_NUMBER.finditer(line[first:])]
        pos += len(line) + 1
    return out


def _what_it_says(template: str, text: str) -> str:
    """What the README has where a fragment's values go, if its wording is still there."""
    parts = []
    for literal, field, _spec, _conv in string.Formatter().parse(template):
        if literal.strip():
            parts.append((r"\s+" if literal[0].isspace() else "") + loose(literal)
                         + (r"\s+" if literal[-1].isspace() else ""))
        elif literal:
            parts.append(r"\s+")
        if field is not None:
            parts.append(r"(\S+?)")
    m = re.search("".join(parts), text)
    return f"; it says {m.group(0)!r}" if m else "; that wording is not in the README either"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    readme = Path(args[0]) if args else ROOT / "README.md"
    problems, checked = check(readme)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problems; {checked} of {len(FIGURES)} figures match their results files")
        return 1
    print(f"{checked} figures checked against {len({s.path for s in SOURCES.values()})} results files; every number "
          "with a unit is one of them or says why it is not a measurement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
