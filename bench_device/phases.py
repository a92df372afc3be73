"""Decode phase by phase against the byte bound (issue 21): the weight bytes each phase of a forward pass reads, the
time the session spent in it (Session.timings(): thread 0's clock, each phase ending where the threads meet), and
each phase's fraction of the bound at a given read bandwidth.

Phases: attention (the layers' norms, projections; MLA's latent and per-head matmuls: the norm before the FFN is
timed with the attention block), router (BlockFFN's router, F32), experts (BlockFFN's expert units: their bytes are
the pass's own, from the session's expert-byte counter), ffn (a dense model's SwiGLU), head (final norm and LM head:
the embedding matrix when tied). The token embedding is otherwise left out (one row per token), and so is the KV
cache read (small at the benchmarks' contexts). Time outside these (the embedding lookup, BlockFFN's planning and
partial sums) is "other", with no bytes.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import gguf

PHASES = ("attention", "router", "experts", "ffn", "head")
TIMING_S = {"attention": ("attention_s",), "router": ("ffn_router_s",), "experts": ("ffn_experts_s",),
            "head": ("head_s",), "other": ("embed_s", "ffn_plan_s", "ffn_reduce_s")}


def phase_bytes(path: str | Path) -> dict[str, int]:
    """Weight bytes per phase of one dense pass over the model's file (each tensor read once)."""
    out = dict.fromkeys(PHASES, 0)
    tensors = gguf.GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    for t in tensors:
        name, n = t.name, int(t.n_bytes)
        if name in ("output.weight", "output_norm.weight"):
            out["head"] += n
        elif name == "token_embd.weight":  # the LM head's matrix too when tied; else one row per token
            out["head"] += n if tied else 0
        elif "ffn_router" in name:
            out["router"] += n
        elif "ffn_experts" in name:
            out["experts"] += n
        elif ".ffn_" in name and "ffn_norm" not in name:  # a dense SwiGLU's gate, up and down
            out["ffn"] += n
        else:
            out["attention"] += n
    return out


def phase_seconds(timings: Mapping[str, float]) -> dict[str, float]:
    """Seconds per pass by phase from a Session.timings() dict summed over n_evals passes; "ffn" is a dense model's
    FFN block (ffn_s when the model has no router)."""
    n = max(1, int(timings["n_evals"]))
    out = {ph: sum(timings[k] for k in keys) / n for ph, keys in TIMING_S.items()}
    out["ffn"] = 0.0 if timings["ffn_router_s"] or timings["ffn_experts_s"] else timings["ffn_s"] / n
    return out


def phase_table(bytes_per_pass: Mapping[str, float], seconds_per_pass: Mapping[str, float], T: int,
                bandwidth_gb_s: float) -> dict[str, dict]:
    """Per phase: bytes per pass and per token, seconds per pass, and the fraction of the bound (the bytes at
    bandwidth_gb_s over the time; None without time). Phases with neither bytes nor time are left out."""
    out = {}
    for ph in (*PHASES, "other"):
        b, s = float(bytes_per_pass.get(ph, 0)), float(seconds_per_pass.get(ph, 0.0))
        if not b and not s:
            continue
        out[ph] = {"bytes_per_pass": b, "bytes_per_token": b / T, "s_per_pass": s,
                   "fraction_of_bound": (b / (bandwidth_gb_s * 1e9)) / s if s and b else None}
    return out


def pass_bytes(model_bytes: Mapping[str, int], expert_bytes_per_pass: float) -> dict[str, float]:
    """Bytes one pass reads by phase: every weight once, except the experts: the pass's own expert bytes (dense: all;
    token-sparse: the active ones; a chunk: the union's)."""
    return {**model_bytes, "experts": float(expert_bytes_per_pass)}


OVER_BOUND = ("† above 100%: a phase is a slice of the pass, and the weights it reads may still be in a cache from the "
              "pass before (the whole model's working set is what the bound's probe streams); and the probe ran at "
              "another moment than the steps")


def markdown_rows(label: str, mode: str, T: int, table: Mapping[str, dict]) -> list[str]:
    """Rows of the report's phase table: | model | mode | T | phase | MB/token | ms/pass | fraction of bound |; a
    fraction above 100% is marked † (OVER_BOUND says why it can be real)."""
    rows = []
    for ph, r in table.items():
        f = r["fraction_of_bound"]
        frac = "-" if f is None else f"{100 * f:.0f}%" + ("†" if f > 1 else "")
        rows.append(f"| {label} | {mode} | {T} | {ph} | {r['bytes_per_token'] / 1e6:.1f} | "
                    f"{1e3 * r['s_per_pass']:.3f} | {frac} |")
    return rows


def over_bound_lines(rows: list[str]) -> list[str]:
    """The note under a phase table when one of its rows is marked †."""
    return ["", OVER_BOUND + "."] if any("†" in r for r in rows) else []


MARKDOWN_HEADER = ["| model | mode | T | phase | MB read per token | ms per pass | fraction of bound |",
                   "|---|---|---:|---|---:|---:|---:|"]
