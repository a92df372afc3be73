"""The report.json schema "sparrow.bench/4", as a key list that is also the validator.

A spec is one of:
  - a type or a tuple of types: isinstance (bool is not accepted where a number is asked for);
  - a dict {key: spec}: those keys must be present, a key ending in "?" may be absent; the key "*" gives the spec of
    every value of a mapping with free keys (thread counts, engine names); keys not named are allowed, so sections
    that other benchmarks add do not break the check, and those named are checked wherever they appear;
  - a list [spec]: a list whose every item matches spec;
  - an instance of one of the classes below (a summary, a string prefix, alternatives, a literal, a check function).

    problems = validate(report)     # [] when the report matches; else "path: what is wrong" lines
    check(report)                   # raises ValueError listing the problems

Version history: /1 had decode/prefill/T-curve, bandwidth (numpy probe) and energy as a placeholder string; /2 adds
the native bandwidth probe with thread pinning, time to first token, energy (RAPL) or "unavailable: <reason>", the
oracle each engine was checked against, and the plots. /3 adds the sections of bench_device/sections.py: "speculative"
(every report; its rows in a fixed form, accepted_hist at the row's top level) and, in a full run, "sparse" and
"synthetic" (optional there only when no synthetic shape was asked for). /4 says which bandwidth each bound used:
"bound" beside every bandwidth_bound_tok_s (kind "llc" or "dram", bytes per token, working set, whether it reads
experts sparsely, GB/s, probe bytes, the LLC size and why; "over_bound", why it can be real, wherever
fraction_of_bound exceeds 1: validate() requires it), and "last_level_cache" and "cache_probes" (the probes with
buffers of a cache-resident working set's size) in "bandwidth". Later /4 reports add, optionally, the Vulkan devices
found ("gpu" in "device") and the "gpu" section of `sparrow bench --device vulkan` (decode on a GPU device beside the
CPU), and "phases" (the model's decode phase by phase: bytes, time and fraction of the bound; bench_device/phases.py),
also on synthetic records.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SCHEMA = "sparrow.bench/4"
NUM = (int, float)


@dataclass(frozen=True)
class Summary:
    """{"median", "min", "max", "n"} of repeated measurements, min <= median <= max, n >= 1."""
    positive: bool = True


@dataclass(frozen=True)
class Prefix:
    """A string starting with `prefix`."""
    prefix: str


@dataclass(frozen=True)
class AnyOf:
    options: tuple


@dataclass(frozen=True)
class Literal:
    value: Any


@dataclass(frozen=True)
class Check:
    """A predicate on the value, with what it means for the message."""
    fn: Callable[[Any], bool]
    what: str


UNAVAILABLE = Prefix("unavailable: ")
CACHE = {"level": int, "type": str, "size": str, "bytes": int}

GPU_DEVICE = {"index": int, "name": str, "kind": str, "api": str, "api_version": str, "driver": str,
              "memory_bytes": int}

DEVICE = {
    "cpu_model": str, "arch": str, "physical_cores": int, "logical_cores": int, "cpu_features": [str],
    "kernel_tier": str, "caches": [CACHE],
    "gpu?": {"devices": [GPU_DEVICE], "error": str},  # the Vulkan devices found (none: why); older reports lack it
    "ram_total_bytes": int, "ram_available_bytes": int, "os": str, "python": str,
}

BANDWIDTH = {
    "probe": AnyOf((Literal("native"), Literal("numpy"))),  # which probe gives the roofline
    "method": str, "unit": Literal("GB/s"), "mb_per_thread": int,
    "threads": {"*": Summary()},                            # "1".."N" -> GB/s
    "pinning": {"status": AnyOf((Literal("pinned"), Prefix("not pinned: "))), "threads_pinned": {"*": int}},
    "best_threads": int, "best_gb_s": NUM,
    "numpy?": {"method": str, "threads": {"*": Summary()}},  # the cross-check, when the native probe ran too
    "last_level_cache": AnyOf((type(None), CACHE)),         # None: the OS lists no cache
    # total bytes of the buffers -> GB/s, for the working sets that fit in the last-level cache
    "cache_probes": {"*": {"median": NUM, "min": NUM, "max": NUM, "n": int, "threads": int, "bytes_per_thread": int}},
}

# which bandwidth a bound used and why (bench_device/profile.py Roofline.bound, against_bound)
BOUND_USED = {
    "kind": AnyOf((Literal("llc"), Literal("dram"))), "bytes_per_token": NUM, "working_set_bytes": NUM, "sparse": bool,
    "bandwidth_gb_s": NUM, "probe_bytes": int, "llc_bytes": AnyOf((type(None), int)), "why": str,
    "over_bound?": str,  # present exactly when fraction_of_bound > 1
}

ENGINE = {
    "decode_tok_s": Summary(), "prefill_tok_s": Summary(),
    "ttft_ms": Summary(),                                   # prompt text -> first token, empty cache
    "peak_rss_mb": NUM,
    "batch_ms": {"*": NUM}, "batch_cost_vs_t1": {"*": NUM},
    # the same after a long context (attention over the cache a large share of the pass); reports from before these
    # were measured lack them
    "long_cached_tokens?": int, "long_ms?": {"*": NUM}, "long_cost_vs_t1?": {"*": NUM},
    "bandwidth_bound_tok_s": NUM, "fraction_of_bound": NUM, "bound": BOUND_USED,
    # joules of each decode measurement (whole package) and per token; coarse counters may read 0 for a short run
    "energy": AnyOf(({"decode_j_per_token": Summary(positive=False), "decode_j": Summary(positive=False)},
                     UNAVAILABLE)),
}


def _hist_ok(h: Any) -> bool:
    return isinstance(h, dict) and all(str(k).lstrip("-").isdigit() and isinstance(v, int) and v >= 0
                                       for k, v in h.items())


HIST = Check(lambda h: _hist_ok(h) and bool(h), "a non-empty map accepted length -> steps")
BOUND = {"read_bytes_per_token": NUM, "bandwidth_bound_tok_s": NUM, "fraction_of_bound": NUM, "bound": BOUND_USED}

SPARSE_CONFIG = {
    "ffn_mode": str, "decode_tok_s": Summary(), "ratio_vs_dense?": Summary(),
    "tls": NUM, "cls": {"*": NUM},                          # "2".."16" -> CLS-k over the decode tokens
    "decode_tokens_measured": int, "expert_bytes_per_token": NUM, "dense_expert_bytes_per_token": NUM, **BOUND,
}
SPARSE = {"model": str, "model_name": str, "prompts": int, "tokens": int, "rounds": int, "check": str,
          "weight_bytes_per_token": int, "bound_method": str,
          "configs": {"dense": SPARSE_CONFIG, "sparse": SPARSE_CONFIG}}

SPEC_ROW = {
    "decode_tok_s": Summary(), "ratio_vs_plain?": Summary(), "speed_vs_llama_cpp?": NUM,
    "greedy_agreement_tokens_min?": AnyOf((int, type(None))),
    # speculative engines only
    "steps?": int, "tokens_per_step?": NUM, "mean_accepted?": NUM, "accepted_hist?": HIST,
    "expert_bytes_per_token?": NUM, "time_split_s?": {"*": NUM},
    **BOUND,
}
SPEC_SECTION = {"label": str, "model": str, "prompts": int, "tokens": int, "rounds": int, "engines": {"*": SPEC_ROW}}
SPECULATIVE = {"method": str, "bound_method": str,
               "c": {**SPEC_SECTION, "llama_cpp": AnyOf((Literal("ran"), Prefix("not run (")))},
               "a?": {**SPEC_SECTION, "draft": str, "routing": {"tls": NUM, "cls8": NUM,
                                                                "dense_expert_bytes_per_token": NUM}}}

GPU_SECTION = {  # `sparrow bench --device vulkan[:N]` (bench_device/sections.py gpu_section)
    "device": str, "info": GPU_DEVICE, "functional_only": bool, "label": str, "model": str, "prompt_tokens": int,
    "tokens": int, "repeats": int, "threads": int, "greedy_agreement_tokens": int,
    "engines": {"*": {"decode_tok_s": Summary()}}, "ratio_vs_cpu": NUM,
}

PHASE_TABLE = {"*": {"bytes_per_pass": NUM, "bytes_per_token": NUM, "s_per_pass": NUM,
                     "fraction_of_bound": AnyOf((type(None),) + NUM)}}  # bench_device/phases.py phase_table
PHASES_SECTION = {"model": str, "model_name": str, "tokens": int, "threads": int, "bandwidth_gb_s": NUM,
                  "bound": BOUND_USED, "timings": {"*": NUM}, "phases": PHASE_TABLE}

SYNTH_RECORD = {"synthetic": Literal(True), "label": Literal("SYNTHETIC"), "shape": str, "kind": str, "T": int,
                "mode": AnyOf((Literal("dense"), Literal("token"), Literal("chunk"))),
                "routing": {"stated": dict, "effective": dict}, "median_s": NUM, "min_s": NUM, "max_s": NUM, "n": int,
                "read_bytes_per_token?": NUM, "bandwidth_bound_tok_s?": NUM, "fraction_of_bound?": NUM,
                "bound?": BOUND_USED, "phases?": PHASE_TABLE}  # decode records; phases: decode and T=8 chains
SYNTHETIC = {
    "label": Prefix("SYNTHETIC"), "synthetic": Literal(True), "shapes": {"*": dict}, "qtype": str,
    "routing": {"tls": NUM, "cls": NUM, "k": int, "seed": int}, "settings": dict,
    "records": [SYNTH_RECORD],
    "replayed?": {"label": Prefix("REPLAYED"),
                  "runs": [{"label": Literal("replayed"), "synthetic": Literal(True), "shape": str,
                            "replayed_from": str, "accepted_hist": HIST, "tokens_per_step": NUM,
                            "tok_s": {"*": NUM}, "speedup_vs_dense_decode": {"*": NUM}}]},
}

REPORT = {
    "schema": Literal(SCHEMA),
    "created": str,
    "mode": AnyOf((Literal("quick"), Literal("full"))),
    "settings": {"threads": int, "repeats": int, "decode_tokens": int, "batch_sizes": [int]},
    "device": DEVICE,
    "bandwidth": BANDWIDTH,
    "model": {"name": str, "path": str, "file_bytes": int, "weight_bytes_per_token": int, "tied_embeddings": bool,
              "prompt_tokens": int},
    "llama_cpp": AnyOf((Literal("ran"), Literal("not installed"), Prefix("skipped"), Prefix("failed: "))),
    "onnxruntime?": AnyOf((Literal("ran"), Literal("not installed"), Prefix("skipped"), Prefix("failed: "),
                           Prefix("not run ("))),
    "oracle": {"engine": str, "description": str, "criterion": str, "checked_tokens": int, "agreement_tokens": int,
               "checks": {"*": {"nmse": NUM, "positions": int, "top1_forks": int, "max_fork_gap": NUM}},
               "first_fork?": AnyOf((type(None), {"step": int, "gap": NUM}))},
    "engines": {"*": ENGINE},
    "ratio_sparrow_over_llama_cpp": AnyOf((type(None), {"decode": NUM, "prefill": NUM, "ttft": NUM})),
    "energy": AnyOf(({"source": str, "scope": str}, UNAVAILABLE)),
    "plots": {"*": AnyOf((Prefix("skipped: "), Check(lambda s: isinstance(s, str) and s.endswith(".png"), "a .png")))},
    "notes": [str],
    # bench_device/sections.py; "sparse" and "synthetic" are required in a full run (see validate)
    "speculative": SPECULATIVE,
    "sparse?": SPARSE,
    "synthetic?": SYNTHETIC,
    "gpu?": GPU_SECTION,
    "phases?": PHASES_SECTION,
}
FULL_ONLY = ("sparse",)  # a full report must hold these; and "synthetic" unless a note says why it is left out
SYNTHETIC_LEFT_OUT = "synthetic section left out"


def _type_ok(x: Any, t) -> bool:
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(x, bool) and bool not in ts:
        return False
    return isinstance(x, ts)


def _name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(getattr(x, "__name__", str(x)) for x in ts)


def validate(x: Any, spec: Any = None, path: str = "report") -> list[str]:
    """Problems of `x` against `spec` (default: the whole report), as "path: what" strings; [] when it matches."""
    if spec is None:
        out = validate(x, REPORT, path) + unexplained_fractions(x, path)
        if isinstance(x, dict) and x.get("mode") == "full":
            out += [f"{path}: a full run must hold {k!r}" for k in FULL_ONLY if k not in x]
            if "synthetic" not in x and not any(str(n).startswith(SYNTHETIC_LEFT_OUT) for n in x.get("notes", [])):
                out.append(f"{path}: a full run must hold 'synthetic' or a note {SYNTHETIC_LEFT_OUT!r}...")
        return out
    if isinstance(spec, dict):
        if not isinstance(x, dict):
            return [f"{path}: expected an object, got {type(x).__name__}"]
        out = []
        for key, sub in spec.items():
            if key == "*":
                for k, v in x.items():
                    out += validate(v, sub, f"{path}.{k}")
                continue
            optional = key.endswith("?")
            k = key.rstrip("?")
            if k not in x:
                if not optional:
                    out.append(f"{path}: missing key {k!r}")
                continue
            out += validate(x[k], sub, f"{path}.{k}")
        return out
    if isinstance(spec, list):
        if not isinstance(x, list):
            return [f"{path}: expected a list, got {type(x).__name__}"]
        return [p for i, v in enumerate(x) for p in validate(v, spec[0], f"{path}[{i}]")]
    if isinstance(spec, Summary):
        out = validate(x, {"median": NUM, "min": NUM, "max": NUM, "n": int}, path)
        if not out:
            if not x["min"] <= x["median"] <= x["max"]:
                out.append(f"{path}: not min <= median <= max: {x}")
            if x["n"] < 1 or x["min"] < 0 or (spec.positive and x["min"] == 0):
                out.append(f"{path}: expected n >= 1 and {'positive' if spec.positive else 'non-negative'} values: {x}")
        return out
    if isinstance(spec, Prefix):
        ok = isinstance(x, str) and x.startswith(spec.prefix)
        return [] if ok else [f"{path}: expected {spec.prefix!r}..., got {x!r}"]
    if isinstance(spec, Literal):
        ok = x == spec.value and type(x) is type(spec.value)
        return [] if ok else [f"{path}: expected {spec.value!r}, got {x!r}"]
    if isinstance(spec, Check):
        return [] if spec.fn(x) else [f"{path}: expected {spec.what}"]
    if isinstance(spec, AnyOf):
        tries = [validate(x, o, path) for o in spec.options]
        if any(not t for t in tries):
            return []
        return [f"{path}: matches none of the alternatives: " + " | ".join("; ".join(t) for t in tries)]
    return [] if _type_ok(x, spec) else [f"{path}: expected {_name(spec)}, got {type(x).__name__}"]


def unexplained_fractions(x: Any, path: str = "report") -> list[str]:
    """Every object with fraction_of_bound > 1 must say why in bound.over_bound (and only those may)."""
    out = []
    if isinstance(x, dict):
        f = x.get("fraction_of_bound")
        if isinstance(f, (int, float)) and isinstance(x.get("bound"), dict):
            if f > 1 and "over_bound" not in x["bound"]:
                out.append(f"{path}: fraction_of_bound {f:.2f} > 1 and bound.over_bound does not say why")
            elif f <= 1 and "over_bound" in x["bound"]:
                out.append(f"{path}: bound.over_bound on a fraction_of_bound of {f:.2f}, not above 1")
        for k, v in x.items():
            out += unexplained_fractions(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out += unexplained_fractions(v, f"{path}[{i}]")
    return out


def check(report: dict) -> None:
    problems = validate(report)
    if problems:
        raise ValueError(f"report does not match {SCHEMA}:\n  " + "\n  ".join(problems))
