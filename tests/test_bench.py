"""`sparrow bench`: the device profile and native bandwidth probe on this machine, the report schema (sparrow.bench/4)
of a --quick run on a tiny model and its validator, which bandwidth bounds a configuration (DRAM, or the last-level
cache its weights fit in: the decision on fake cache sizes, the report on this machine and on a fake small cache),
the full run's sparse/speculative/synthetic sections (measured small: the shipped BlockFFN model, the tiny synthetic
shape), RAPL energy on a fake powercap tree, a worker killed by a signal, the plots, and the CLI writing report.json,
report.md and the PNG."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sparrow.bench_device import bench_decode, profile, sections, suite
from sparrow.bench_device.bench_decode import TIE_GAP, compare_logits
from sparrow.bench_device.bench_decode import worker as decode_worker
from sparrow.bench_device.energy import Rapl
from sparrow.bench_device.plots import accepted_hists, active_fraction_series, configurations, write_plots
from sparrow.bench_device.profile import (
    Roofline,
    against_bound,
    bandwidth_curve,
    bound_kind,
    device_profile,
    last_level_cache,
    read_bandwidth,
    weight_bytes_per_token,
)
from sparrow.bench_device.schema import SCHEMA, check, validate
from sparrow.bench_device.sections import (
    SHIPPED_TARGET,
    read_bytes_per_token,
    sparse_section,
    speculative_section,
    synthetic_section,
)
from sparrow.bench_device.suite import headline_table, run_suite, to_markdown, write_report
from sparrow.cli import sparrow
from tiny_llama import TinyConfig, write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("bench") / "tiny.gguf", TinyConfig())


@pytest.fixture(scope="module")
def report(tiny) -> dict:
    return run_suite(tiny, "tiny", quick=True, threads=1, llama_cpp=False)


def test_profile_on_this_machine():
    p = device_profile()
    assert p["physical_cores"] >= 1 and p["logical_cores"] >= p["physical_cores"]
    assert p["kernel_tier"] in ("ref", "avx2", "avx512", "amx")
    assert isinstance(p["cpu_features"], list) and isinstance(p["cpu_model"], str) and p["cpu_model"]
    assert p["ram_total_bytes"] >= p["ram_available_bytes"] > 0
    assert all({"level", "type", "size", "bytes"} <= set(c) for c in p["caches"])
    bw = read_bandwidth(1, mb=32, repeats=2)
    assert bw["n"] == 2 and 0 < bw["min"] <= bw["median"] <= bw["max"]


def test_bandwidth_curve_native_probe_with_numpy_alongside():
    steps = []
    c = bandwidth_curve(2, mb=16, repeats=2, progress=steps.append)
    assert c["probe"] == "native" and set(c["threads"]) == {1, 2} and steps == [1, 2, 1, 2]
    assert all(s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"] for s in c["threads"].values())
    assert set(c["numpy"]["threads"]) == {1, 2} and c["best_gb_s"] == c["threads"][c["best_threads"]]["median"]
    if hasattr(os, "sched_setaffinity"):
        assert c["pinning"] == {"status": "pinned", "threads_pinned": {1: 1, 2: 2}} and "pinned" in c["method"]
    alone = bandwidth_curve(1, mb=16, repeats=1, numpy_check=False)
    assert "numpy" not in alone and alone["probe"] == "native"


def test_native_bandwidth_probe_pins_threads_and_checks_its_reads():
    from sparrow.runtime import _sparrow

    r = _sparrow.bench_read_bandwidth(2, 8 << 20, 3, True)
    assert r["n_threads"] == 2 and r["bytes_per_thread"] == 8 << 20 and len(r["gb_s"]) == 3
    assert 0 < r["min"] <= r["median"] <= r["max"] and sorted(r["gb_s"])[1] == r["median"]
    if hasattr(os, "sched_setaffinity"):  # Linux: both threads pinned to CPUs this process may use
        assert r["n_pinned"] == 2 and r["pin_errno"] == 0
    unpinned = _sparrow.bench_read_bandwidth(1, 4096 + 255, 1, False)  # rounded down to a multiple of 256
    assert unpinned["n_pinned"] == 0 and unpinned["bytes_per_thread"] == 4096


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_pinned_probe_threads_never_share_a_cpu():
    """More pinned threads than the CPUs the process may use is refused (they would take turns on one CPU and read
    half as fast); profile's probe then runs them unpinned and says why."""
    from sparrow.bench_device import profile
    from sparrow.runtime import _sparrow

    mine = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mine)})
        with pytest.raises(_sparrow.SparrowError, match="2 pinned threads, but this process may run on 1 CPU: they "
                           "would share"):
            _sparrow.bench_read_bandwidth(2, 1 << 20, 1, True)
        assert _sparrow.bench_read_bandwidth(2, 1 << 20, 1, False)["n_pinned"] == 0
        r = profile.native_read_bandwidth(2, nbytes=1 << 20, repeats=1)
        assert r["n_pinned"] == 0 and r["n"] == 1
        assert profile.pinning_status({1: {"n_pinned": 1, "pin_errno": 0}, 2: r}) == \
            "not pinned: 2 threads for the 1 CPUs this process may use"
    finally:
        os.sched_setaffinity(0, mine)


@pytest.mark.parametrize("args, message", [
    ((0, 1 << 20, 3, True), "n_threads"), ((257, 1 << 20, 3, True), "n_threads"), ((1, 4095, 3, True), "at least 4096"),
    ((1, 1 << 20, 0, True), "repeats"), ((1, 1 << 20, 65, True), "repeats"),
    ((4, 1 << 61, 1, True), "physical memory"), ((256, 1 << 60, 1, True), "physical memory"),
])
def test_native_bandwidth_probe_rejects_bad_arguments(args, message):
    from sparrow.runtime import _sparrow

    with pytest.raises(_sparrow.SparrowError, match="SP_ERR_INVALID_ARG.*" + message):
        _sparrow.bench_read_bandwidth(*args)


def test_weight_bytes_per_token_tied_head_reads_the_whole_embedding(tiny):
    w = weight_bytes_per_token(tiny)
    assert w["tied_embeddings"] and w["per_token"] == w["file_tensor_bytes"] > 0


def test_report_schema(report, tmp_path):
    write_report(report, tmp_path)
    r = json.loads((tmp_path / "report.json").read_text())
    assert validate(r) == [] and r["schema"] == SCHEMA == "sparrow.bench/4" and r["mode"] == "quick"
    assert r["llama_cpp"].startswith("skipped") and list(r["engines"]) == ["sparrow", "onnxruntime"]
    assert r["onnxruntime"] == "ran" and "onnxruntime" in r["oracle"]["checks"]  # checked against the oracle too
    assert r["engines"]["onnxruntime"]["decode_tok_s"]["median"] > 0
    assert r["settings"]["threads"] == 1 and r["bandwidth"]["threads"]["1"]["median"] > 0
    bw = r["bandwidth"]
    assert bw["probe"] == "native" and "sp_bench_read_bandwidth" in bw["method"]
    assert "numpy" in bw["numpy"]["method"] and bw["numpy"]["threads"]["1"]["median"] > 0
    if hasattr(os, "sched_setaffinity"):
        assert bw["pinning"] == {"status": "pinned", "threads_pinned": {"1": 1}}
    assert r["model"]["weight_bytes_per_token"] > 0 and r["model"]["prompt_tokens"] > 0
    # the bound that applies on this machine: the tiny model fits in any last-level cache, so it is the read
    # bandwidth of a buffer of the weights' size; with no cache listed, DRAM's
    e = r["engines"]["sparrow"]
    b, llc = e["bound"], last_level_cache(r["device"]["caches"])
    assert bw["last_level_cache"] == llc and b["llc_bytes"] == (llc and llc["bytes"])
    assert b["bytes_per_token"] == b["working_set_bytes"] == r["model"]["weight_bytes_per_token"]
    if llc and b["working_set_bytes"] <= llc["bytes"]:
        assert b["kind"] == "llc" and f"fit in the L{llc['level']} cache" in b["why"]
        probe = bw["cache_probes"][str(b["probe_bytes"])]
        assert probe["threads"] == 1 and probe["bytes_per_thread"] == b["probe_bytes"] >= b["working_set_bytes"]
        assert b["bandwidth_gb_s"] == probe["median"] and probe["n"] == profile.CACHE_REPEATS
    else:
        assert b["kind"] == "dram" and b["bandwidth_gb_s"] == bw["threads"]["1"]["median"]
    assert e["bandwidth_bound_tok_s"] == pytest.approx(b["bandwidth_gb_s"] * 1e9 / b["bytes_per_token"])
    assert ("over_bound" in b) == (e["fraction_of_bound"] > 1)
    # Sparrow alone: its greedy continuation was checked against the scalar reference kernels. On this tiny F32 model
    # the SIMD and scalar tiers agree to float32 rounding (measured 6e-11; the bench's own bound, 3e-3, is for models
    # deep enough that activation rounding grows through the layers, see bench_decode.SCALAR_NMSE_MAX)
    assert r["oracle"]["engine"] == "sparrow-scalar" and "SPARROW_FORCE_SCALAR=1" in r["oracle"]["description"]
    assert f"NMSE < {bench_decode.SCALAR_NMSE_MAX:g}" in r["oracle"]["criterion"]
    c = r["oracle"]["checks"]["sparrow"]
    assert c["positions"] == 16 and 0 <= c["nmse"] < 1e-9 and c["top1_forks"] == 0
    assert r["oracle"]["agreement_tokens"] == r["oracle"]["checked_tokens"] == 16 and r["oracle"]["first_fork"] is None
    e = r["engines"]["sparrow"]
    for key in ("decode_tok_s", "prefill_tok_s", "ttft_ms"):
        s = e[key]
        assert s["n"] == 3 and 0 < s["min"] <= s["median"] <= s["max"]
    # the first token needs the whole prompt prefilled: TTFT is at least about the prefill time
    prefill_ms = 1e3 * r["model"]["prompt_tokens"] / e["prefill_tok_s"]["median"]
    assert e["ttft_ms"]["median"] > 0.5 * prefill_ms
    assert e["peak_rss_mb"] > 0 and e["bandwidth_bound_tok_s"] > 0
    assert e["fraction_of_bound"] == pytest.approx(e["decode_tok_s"]["median"] / e["bandwidth_bound_tok_s"])
    assert set(e["batch_ms"]) == {str(t) for t in r["settings"]["batch_sizes"]}
    assert e["batch_cost_vs_t1"]["1"] == 1.0
    if not Path("/sys/class/powercap").is_dir():  # this machine: no RAPL, and the report says why
        assert r["energy"].startswith("unavailable: no RAPL counters") and e["energy"] == r["energy"]
    # --quick's speculative slice: plain and two drafters, checked equal to plain greedy decoding, no llama.cpp
    c = r["speculative"]["c"]
    assert list(c["engines"]) == ["plain", "prompt-lookup", "recycling (chain 4)"] and "a" not in r["speculative"]
    assert c["llama_cpp"] == "not run (skipped in --quick)" and (c["prompts"], c["tokens"], c["rounds"]) == (2, 16, 1)
    for name in ("prompt-lookup", "recycling (chain 4)"):
        row = c["engines"][name]
        steps = sum(row["accepted_hist"].values())
        assert steps == row["steps"] > 0 and row["tokens_per_step"] >= 1 and row["decode_tok_s"]["n"] == 2
        # the bound counts the weights once per verification step, shared by the step's tokens
        assert row["read_bytes_per_token"] == pytest.approx(r["model"]["weight_bytes_per_token"] /
                                                            row["tokens_per_step"], rel=1e-3)
    assert "sparse" not in r and "synthetic" not in r
    assert r["plots"]["tok_s_vs_bound"] == "tok_s_vs_bound.png" and r["plots"]["accepted_length"] == "accepted_length.png"
    assert r["plots"]["time_vs_active"].startswith("skipped: ")
    assert (tmp_path / "tok_s_vs_bound.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "| sparrow |" in md and "llama.cpp | skipped" in md and "![" in md and "(tok_s_vs_bound.png)" in md
    assert "TTFT ms" in md and "sparrow-scalar" in md and "## Speculative decoding" in md
    words = {"llc": "- Bound: cache-resident (last-level cache), ", "dram": "- Bound: DRAM, "}[b["kind"]]
    assert f"{words}{b['bandwidth_gb_s']:.1f} GB/s: {b['why']}." in md and f"({b['kind'].upper()}) |" in md
    assert md.index("## Headline") < md.index("## Speculative decoding") < md.index("## Plots")


@pytest.mark.parametrize("damage, problem", [
    (lambda r: r.pop("oracle"), "report: missing key 'oracle'"),
    (lambda r: r.update(schema="sparrow.bench/3"), "report.schema: expected 'sparrow.bench/4'"),
    (lambda r: r["engines"]["sparrow"].pop("ttft_ms"), "report.engines.sparrow: missing key 'ttft_ms'"),
    (lambda r: r["engines"]["sparrow"]["decode_tok_s"].update(min=1e9), "decode_tok_s: not min <= median <= max"),
    (lambda r: r.update(energy="not measured"), "report.energy: matches none"),
    (lambda r: r["engines"]["sparrow"].update(peak_rss_mb="big"), "peak_rss_mb: expected int or float, got str"),
    (lambda r: r["model"].update(tied_embeddings=1), "tied_embeddings: expected bool, got int"),
    (lambda r: r["bandwidth"]["pinning"].update(status="maybe"), "pinning.status: matches none"),
    (lambda r: r["speculative"]["c"]["engines"]["prompt-lookup"].update(accepted_hist={"one": 3}),
     "report.speculative.c.engines.prompt-lookup.accepted_hist: expected a non-empty map"),
    (lambda r: r["speculative"]["c"]["engines"]["plain"].pop("bandwidth_bound_tok_s"),
     "report.speculative.c.engines.plain: missing key 'bandwidth_bound_tok_s'"),
    (lambda r: r.update(mode="full", notes=["synthetic section left out (no synthetic shape asked for)"]),
     "report: a full run must hold 'sparse'"),
    (lambda r: r["engines"]["sparrow"].update(fraction_of_bound=1.19),
     "report.engines.sparrow: fraction_of_bound 1.19 > 1 and bound.over_bound does not say why"),
    (lambda r: r["speculative"]["c"]["engines"]["plain"]["bound"].update(kind="l3"),
     "report.speculative.c.engines.plain.bound.kind: matches none"),
    (lambda r: r["bandwidth"].pop("cache_probes"), "report.bandwidth: missing key 'cache_probes'"),
])
def test_schema_validator_names_what_is_wrong(report, damage, problem):
    r = json.loads(json.dumps({**report, "plots": {"tok_s_vs_bound": "tok_s_vs_bound.png"}}))
    assert validate(r) == []
    damage(r)
    problems = validate(r)
    assert len(problems) == 1 and problem in problems[0], problems
    with pytest.raises(ValueError, match="does not match sparrow.bench/4"):
        check(r)


def test_plots_draw_what_the_report_holds(report, tmp_path):
    r = json.loads(json.dumps(report))
    spec = r["speculative"]["c"]["engines"]
    spec["prompt-lookup"]["accepted_hist"] = {"0": 30, "1": 12, "4": 3}
    spec["recycling (chain 4)"]["accepted_hist"] = {"0": 20, "2": 9}
    # any section in the forms plots.py reads
    r["other"] = {"time_vs_active": {"1.2b T=1": [{"active_fraction": 0.2, "ms_per_token": 3.0},
                                                      {"active_fraction": 1.0, "ms_per_token": 11.0}],
                                         "1.2b T=8 chunk": [[0.3, 4.5], [0.1, 2.0]]},
                      "1.2b": {"decode_tok_s": {"median": 40.0, "min": 38.0, "max": 41.0, "n": 3},
                               "bandwidth_bound_tok_s": 70.0},
                      # records as bench_synthetic's sweep writes them: seconds per call of T tokens
                      "records": [{"shape": "0.5b", "kind": "sweep_chain8", "T": 8, "mode": "chunk",
                                   "active_fraction": a, "median_s": s} for a, s in ((0.5, 0.04), (0.1, 0.016))]}
    assert [c["name"] for c in configurations(r)] == ["sparrow", "onnxruntime", "speculative / c / plain",
                                                      "speculative / c / prompt-lookup",
                                                      "speculative / c / recycling (chain 4)", "other / 1.2b"]
    series = active_fraction_series(r)
    assert series["other / 1.2b T=8 chunk"] == [(0.1, 2.0), (0.3, 4.5)]
    assert series["0.5b sweep_chain8 chunk"] == [(0.1, pytest.approx(2.0)), (0.5, pytest.approx(5.0))]  # ms/token
    assert accepted_hists(r) == {"prompt-lookup": {0: 30, 1: 12, 4: 3}, "recycling (chain 4)": {0: 20, 2: 9}}
    files = write_plots(r, tmp_path)
    assert files == {"tok_s_vs_bound": "tok_s_vs_bound.png", "time_vs_active": "time_vs_active.png",
                     "accepted_length": "accepted_length.png"}
    for f in files.values():
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG" and (tmp_path / f).stat().st_size > 5000
    r["plots"] = files
    md = to_markdown(r)
    assert all(f"]({f})" in md for f in files.values())


# cpu0's caches as /sys lists them: the Xeon of DESIGN.md (480 MB L3) and the Zen 4 dev machine (32 MB L3)
XEON = [{"level": 1, "type": "Data", "size": "48K", "bytes": 48 << 10},
        {"level": 1, "type": "Instruction", "size": "32K", "bytes": 32 << 10},
        {"level": 2, "type": "Unified", "size": "2048K", "bytes": 2 << 20},
        {"level": 3, "type": "Unified", "size": "491520K", "bytes": 480 << 20}]
ZEN4 = [{"level": 1, "type": "Data", "size": "32K", "bytes": 32 << 10},
        {"level": 2, "type": "Unified", "size": "1024K", "bytes": 1 << 20},
        {"level": 3, "type": "Unified", "size": "32768K", "bytes": 32 << 20}]
SMOLLM2 = 96_600_000  # weight bytes the default model reads per token


def test_bound_is_the_llc_where_the_weights_fit_and_dram_where_they_do_not():
    xeon, zen4 = last_level_cache(XEON), last_level_cache(ZEN4)
    assert xeon == XEON[3] and zen4 == ZEN4[2] and last_level_cache([]) is None
    assert last_level_cache(XEON[:2]) == XEON[0]  # an instruction cache holds no weights
    kind, why = bound_kind(SMOLLM2, SMOLLM2, xeon)  # the Xeon: the 94 MB model stays in its L3
    assert kind == "llc" and "its 92.1 MiB of weights fit in the L3 cache (480.0 MiB, the last level)" in why
    kind, why = bound_kind(SMOLLM2, SMOLLM2, zen4)
    assert kind == "dram" and "exceed the L3 cache (32.0 MiB, the last level): every token streams them" in why
    # a sparse model: one token reads 20 MB, but over the tokens it touches every expert, more than the cache holds
    kind, why = bound_kind(20e6, SMOLLM2, zen4, sparse=True)
    assert kind == "dram" and "one token reads only 19.1 MiB, but other experts each token" in why
    assert bound_kind(20e6, SMOLLM2, xeon, sparse=True)[0] == "llc"
    # speculation on a dense model: 20 MB per token, but every step reads the whole model
    assert "experts" not in bound_kind(20e6, SMOLLM2, zen4)[1]
    unknown = "the last-level cache size is unknown, so the DRAM figure (the large-buffer probe) applies"
    assert bound_kind(SMOLLM2, SMOLLM2, None) == ("dram", unknown)
    with pytest.raises(ValueError, match="working set"):
        bound_kind(2e6, 1e6, xeon)


def test_roofline_probes_buffers_of_the_weights_size_and_explains_a_fraction_above_one():
    asked = []

    def probe(nbytes):
        asked.append(nbytes)
        return {"median": 150.0, "min": 140.0, "max": 160.0, "n": 3, "threads": 2, "bytes_per_thread": nbytes // 2}

    xeon = Roofline(20.0, threads=2, llc=last_level_cache(XEON), dram_probe_bytes=1 << 30, probe=probe)
    b = xeon.bound(SMOLLM2)
    assert b["kind"] == "llc" and b["bandwidth_gb_s"] == 150.0 and asked == [b["probe_bytes"]]
    assert SMOLLM2 <= b["probe_bytes"] < SMOLLM2 + 512 and b["probe_bytes"] % 512 == 0  # two buffers of 256-byte steps
    assert b["llc_bytes"] == 480 << 20 and b["working_set_bytes"] == b["bytes_per_token"] == SMOLLM2
    sparse = xeon.bound(20e6, SMOLLM2, sparse=True)  # same working set: the same probe, not measured again
    assert sparse["probe_bytes"] == b["probe_bytes"] and len(asked) == 1 and list(xeon.probes) == asked
    # DRAM-bound, the large probe's buffers (64 MiB in all here) no larger than the working set: its figure
    zen4 = Roofline(20.0, threads=2, llc=last_level_cache(ZEN4), dram_probe_bytes=64 << 20, probe=probe)
    d = zen4.bound(SMOLLM2)
    assert (d["kind"], d["bandwidth_gb_s"], d["probe_bytes"], zen4.probes) == ("dram", 20.0, 64 << 20, {})
    # DRAM-bound with a working set smaller than the large probe's buffers: probed with buffers of its own size
    zen4_big = Roofline(20.0, threads=2, llc=last_level_cache(ZEN4), dram_probe_bytes=1 << 30, probe=probe)
    ws = zen4_big.bound(SMOLLM2)
    assert (ws["kind"], ws["bandwidth_gb_s"], ws["probe_bytes"]) == ("dram", 150.0, b["probe_bytes"])
    assert "probed with buffers of its size" in ws["why"] and list(zen4_big.probes) == [b["probe_bytes"]]
    # the "119% of the bandwidth bound": a DRAM bound run above says why
    over = against_bound(d, 1.19 * 20e9 / SMOLLM2)
    assert over["fraction_of_bound"] == pytest.approx(1.19)
    assert over["bandwidth_bound_tok_s"] == pytest.approx(20e9 / SMOLLM2)
    why = "119% of the DRAM bound: the last-level cache (32.0 MiB) can hold 35% of the 92.1 MiB of weights"
    assert over["bound"]["over_bound"].startswith(why)
    assert "over_bound" not in d and "over_bound" not in against_bound(d, 0.5 * 20e9 / SMOLLM2)["bound"]
    assert against_bound(b, 2 * 150e9 / SMOLLM2)["bound"]["over_bound"].startswith("200% of a cache-resident bound")
    # the default probe: the native one, the working set split over the threads
    real = Roofline(20.0, threads=2, llc=last_level_cache(ZEN4)).native_probe(1 << 20)
    assert real["threads"] == 2 and real["bytes_per_thread"] == 1 << 19 and real["n"] == profile.CACHE_REPEATS
    assert 0 < real["min"] <= real["median"] <= real["max"]


def test_a_fraction_above_the_bound_is_explained_wherever_it_is_shown(report, tmp_path):
    r = json.loads(json.dumps(report))
    e = r["engines"]["sparrow"]
    fast = 1.19 * e["bandwidth_bound_tok_s"]
    e["decode_tok_s"] = {"median": fast, "min": fast, "max": fast, "n": 1}
    e.update(against_bound(e["bound"], fast))
    why = e["bound"]["over_bound"]
    assert why.startswith("119% of ")
    write_report(r, tmp_path)  # the validator passes it: the fraction says why
    md = (tmp_path / "report.md").read_text()
    assert "| 119%† |" in md and f"- † sparrow: {why}." in md
    assert "| 119%† |" in headline_table(r) and suite.over_bound_notes(r) == [f"sparrow decodes at {why}"]
    del e["bound"]["over_bound"]
    assert validate(r) == ["report.engines.sparrow: fraction_of_bound 1.19 > 1 and bound.over_bound does not say why"]


def test_read_bytes_per_token_replaces_the_experts_by_those_read():
    # blockffn-tiny: 4,292,608 bytes per token, 2,228,224 of them experts; a token reading 5% of the experts
    assert read_bytes_per_token(4_292_608, 2_228_224, 2_228_224) == 4_292_608
    assert read_bytes_per_token(4_292_608, 2_228_224, 111_411.2) == pytest.approx(2_064_384 + 111_411.2)
    assert read_bytes_per_token(1000, 0, 0) == 1000  # a dense model
    for bad in ((1000, 600, 700), (1000, 1200, 100), (1000, 600, -1)):
        with pytest.raises(ValueError, match="expert bytes"):
            read_bytes_per_token(*bad)


def test_full_report_sections(report, tmp_path, monkeypatch):
    """The full run's sections, measured small: sparse and speculative (a) on the shipped BlockFFN model, (c) on it
    too (a model with experts: its plain bound measured), synthetic and the replay on the tiny synthetic shape."""
    monkeypatch.setenv("SPARROW_SYNTH_CACHE", str(tmp_path / "synth"))
    bw = 20.0
    roof = Roofline(bw, threads=1, llc=None)  # no cache listed: every bound DRAM's, `bw`
    steps = []
    sp = sparse_section(SHIPPED_TARGET, threads=1, tokens=12, rounds=2, n_prompts=2, roofline=roof,
                        progress=steps.append)
    assert len(steps) == 2 * (1 + 2) + 1
    w = weight_bytes_per_token(SHIPPED_TARGET)
    dense, sparse = sp["configs"]["dense"], sp["configs"]["sparse"]
    assert sp["weight_bytes_per_token"] == w["per_token"] and w["expert_bytes"] == dense["dense_expert_bytes_per_token"]
    assert dense["expert_bytes_per_token"] == dense["dense_expert_bytes_per_token"]  # dense reads every expert
    assert dense["read_bytes_per_token"] == w["per_token"]
    assert 0 < sparse["expert_bytes_per_token"] < 0.5 * sparse["dense_expert_bytes_per_token"]  # TLS ~80%
    assert sparse["read_bytes_per_token"] == pytest.approx(w["per_token"] - w["expert_bytes"] +
                                                           sparse["expert_bytes_per_token"])
    # 12 tokens generated: the prompt's last token and each generated one evaluated, 13 single-token steps per prompt
    assert 0.6 < sparse["tls"] < 0.95 and set(sparse["cls"]) == {str(k) for k in range(2, 14)}
    assert sparse["decode_tokens_measured"] == 2 * 13 and sparse["ratio_vs_dense"]["n"] == 4
    for c in (dense, sparse):
        assert c["bandwidth_bound_tok_s"] == pytest.approx(bw * 1e9 / c["read_bytes_per_token"])
        # the working set is the whole model: a sparse token reads other experts than the last
        assert c["bound"]["working_set_bytes"] == w["per_token"] and c["bound"]["kind"] == "dram"
        assert c["bound"]["bytes_per_token"] == c["read_bytes_per_token"] and c["bound"]["sparse"] == (c is sparse)
        assert c["fraction_of_bound"] == pytest.approx(c["decode_tok_s"]["median"] / c["bandwidth_bound_tok_s"])
    cfg = {"c": {"prompts": ["def read_file(path):\n"], "tokens": 8, "rounds": 1, "drafters": ["prompt-lookup"]},
           "a": {"n_prompts": 2, "tokens": 12, "rounds": 1}}
    spec, raw_a = speculative_section(SHIPPED_TARGET, threads=1, quick=False, llama_cpp="not installed",
                                      roofline=roof, sparse=sp, cfg=cfg)
    assert spec["c"]["llama_cpp"] == "not run (not installed)"
    assert spec["c"]["engines"]["plain"]["read_bytes_per_token"] < 0.75 * w["per_token"]  # it decodes sparsely
    a = spec["a"]["engines"]
    assert list(a)[:2] == ["dense plain", "sparse plain"] and len(a) == 9
    assert a["sparse plain"]["read_bytes_per_token"] == sparse["read_bytes_per_token"]
    draft = a["sparse + draft-model (chain 4)"]
    assert sum(draft["accepted_hist"].values()) == draft["steps"] and set(draft["time_split_s"]) >= {"draft", "sample"}
    assert draft["read_bytes_per_token"] > a["sparse + recycling (chain 4)"]["read_bytes_per_token"] * \
        a["sparse + recycling (chain 4)"]["tokens_per_step"] / draft["tokens_per_step"]  # its own weights count too
    draft_w = weight_bytes_per_token(sections.SHIPPED_DRAFT)["per_token"]
    assert draft["bound"]["working_set_bytes"] == w["per_token"] + draft_w  # the draft model stays in cache too
    assert a["sparse + recycling (chain 4)"]["bound"]["working_set_bytes"] == w["per_token"]
    assert [r["bound"]["sparse"] for r in a.values()] == [False] + [True] * 8  # all but dense plain read some experts
    syn = synthetic_section(["tiny"], threads=1, roofline=roof, replay_from=raw_a,
                            settings={"Ts": (4,), "fractions": (0.25, 1.0), "repeats": 1, "decode_steps": 2,
                                      "replay_repeats": 1})
    assert all(r["synthetic"] is True and r["label"] == "SYNTHETIC" for r in syn["records"])
    dec = [r for r in syn["records"] if r["kind"] == "decode"]
    assert {r["mode"] for r in dec} == {"dense", "token"} and all(r["bandwidth_bound_tok_s"] > 0 for r in dec)
    # phase by phase: decode and the chain's passes; a sparse token reads fewer expert bytes than a dense one
    phased = {(r["kind"], r["mode"]): r["phases"] for r in syn["records"] if "phases" in r}
    assert set(phased) == {("decode", "dense"), ("decode", "token"), ("chain", "dense"), ("chain", "chunk")}
    assert 0 < phased["decode", "token"]["experts"]["bytes_per_token"] < phased["decode", "dense"]["experts"][
        "bytes_per_token"]
    assert all(p["s_per_pass"] > 0 for t in phased.values() for p in t.values() if p["bytes_per_pass"])
    assert len([r for r in syn["records"] if "active_fraction" in r]) == 2 * 2 * 2  # 2 fractions, T=1/T=8, 2 modes
    assert syn["replayed"]["label"].startswith("REPLAYED") and len(syn["replayed"]["runs"]) == 3  # 3 chain drafters
    r = json.loads(json.dumps({**report, "mode": "full", "sparse": sp, "speculative": spec, "synthetic": syn}))
    write_report(r, tmp_path / "out")
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert validate(r) == [] and r["plots"]["time_vs_active"] == "time_vs_active.png"
    hists = accepted_hists(r)
    assert "sparse + draft-model (chain 4)" in hists and "prompt-lookup" in hists
    names = [c["name"] for c in configurations(r)]
    assert {"sparse / dense", "sparse / sparse", "speculative / a / sparse + recycling (chain 4)",
            "synthetic / SYNTHETIC tiny decode token"} <= set(names)
    md = (tmp_path / "out" / "report.md").read_text()
    heads = ["## Headline", "## Sparse experts", "## Speculative decoding", "## SYNTHETIC large", "## Plots"]
    assert [md.index(h) for h in heads] == sorted(md.index(h) for h in heads)
    assert "**SYNTHETIC: " in md and "**REPLAYED: " in md and "| tiny | dense |" in md
    assert "Phase by phase (SYNTHETIC" in md and "| tiny | sparse | 1 | experts |" in md
    assert "| sparse + draft-model (chain 4) |" in md and "CLS-8" in md and "(DRAM) |" in md
    del r["synthetic"]["records"][0]["synthetic"]
    assert validate(r) == ["report.synthetic.records[0]: missing key 'synthetic'"]
    del r["synthetic"]
    assert validate(r) == ["report: a full run must hold 'synthetic' or a note 'synthetic section left out'..."]


def test_cli_bench_synthetic_option_is_for_the_full_run():
    from sparrow.bench_device import synthetic
    from sparrow.bench_device.cli import SYNTHETIC_SHAPE_NAMES

    assert set(SYNTHETIC_SHAPE_NAMES) == set(synthetic.SHAPES) - {"tiny"}
    r = CliRunner().invoke(sparrow, ["bench", "--quick", "--synthetic", "0.5b"])
    assert r.exit_code == 2 and "--quick and --tune have no synthetic section" in r.output
    r = CliRunner().invoke(sparrow, ["bench", "--synthetic", "7b"])
    assert r.exit_code == 2 and "'7b' is not one of" in r.output


def test_oracle_logits_comparison_tells_a_near_tie_from_an_error():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 50)).astype(np.float32) * 4
    same = compare_logits(ref.copy(), ref)
    assert same == {"nmse": 0.0, "positions": 4, "top1_forks": 0, "max_fork_gap": 0.0}
    tie = ref.copy()
    top = ref[2].argsort()
    tie[2, top[-2]] = ref[2, top[-1]] + 0.01  # the runner-up pulled just past the winner
    c = compare_logits(tie, ref)
    assert c["top1_forks"] == 1 and c["max_fork_gap"] == pytest.approx(ref[2, top[-1]] - ref[2, top[-2]])
    wrong = ref.copy()
    wrong[1, ref[1].argmin()] = ref[1].max() + 1  # the worst token chosen: a real error, far from a tie
    c = compare_logits(wrong, ref)
    assert c["max_fork_gap"] >= TIE_GAP and c["nmse"] > 0


def _fake_rapl(root: Path, uj: int, max_uj: int = 2**32) -> Path:
    for name, sub in (("intel-rapl:0", "package-0"), ("intel-rapl:0:0", "core"), ("intel-rapl:1", "package-1")):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
        (d / "name").write_text(sub + "\n")
    return root


def test_rapl_reads_package_domains_only_and_undoes_a_wrap(tmp_path):
    meter, why = Rapl.open(tmp_path / "none")
    assert meter is None and why.startswith("no RAPL counters")
    meter, why = Rapl.open(_fake_rapl(tmp_path, 1000))
    assert why == "" and [d.name for d in meter.domains] == ["package-0", "package-1"]  # not the core sub-domain
    before = meter.read()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3500000")
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("500")  # wrapped past 2^32
    assert meter.joules(before, meter.read()) == pytest.approx((3_500_000 - 1000 + 2**32 + 1 - 1000 + 500) / 1e6)
    (tmp_path / "intel-rapl:1" / "max_energy_range_uj").write_text("lots")
    meter, why = Rapl.open(tmp_path)
    assert meter is None and "could not be read" in why


def crash_llama_cpp_worker(engine_name: str, path: str, threads: int, n_ctx: int, conn) -> None:
    """bench_decode's worker, except that llama.cpp dies of SIGSEGV at its first request (as llama.cpp's native build
    does on the Xeon, DESIGN.md). Module level: a spawned worker imports its target."""
    if engine_name == "llama.cpp":
        conn.recv()
        os.kill(os.getpid(), signal.SIGSEGV)
    decode_worker(engine_name, path, threads, n_ctx, conn)


def test_a_dead_worker_is_reported_with_its_signal(tiny):
    with pytest.raises(RuntimeError, match=r"^the llama.cpp worker died \(killed by signal 11 \(SIGSEGV\)\)$"):
        bench_decode.run(str(tiny), threads=1, repeats=1, decode_tokens=2, batch_sizes=(1,),
                         engine_names=("sparrow", "llama.cpp"), worker_target=crash_llama_cpp_worker)


def before_env_worker(engine_name: str, path: str, threads: int, n_ctx: int, conn) -> None:
    """bench_decode's worker, except that sparrow-before exits with status 3 unless its environment says "before"."""
    if engine_name == "sparrow-before" and os.environ.get("SPARROW_TEST_BUILD") != "before":
        os._exit(3)
    decode_worker(engine_name, path, threads, n_ctx, conn)


def test_an_engine_of_another_build_gets_its_environment_and_a_ratio(tiny):
    """--before BUILD_DIR: the sparrow-before worker starts with its own environment (SPARROW_BUILD_DIR there; a
    marker here), the parent's is left as it was, and the report gives sparrow's ratios over it."""
    kw = {"threads": 1, "repeats": 1, "decode_tokens": 2, "batch_sizes": (1, 2),
          "engine_names": ("sparrow", "sparrow-before"), "worker_target": before_env_worker}
    with pytest.raises(RuntimeError, match=r"the sparrow-before worker died \(exit code 3\)"):
        bench_decode.run(str(tiny), **kw)
    r = bench_decode.run(str(tiny), engine_env={"sparrow-before": {"SPARROW_TEST_BUILD": "before"}}, **kw)
    assert "SPARROW_TEST_BUILD" not in os.environ
    ratio = r["ratio_sparrow_over_before"]
    assert set(ratio) == {"decode", "prefill", "batch_time", "long_time"} and set(ratio["batch_time"]) == {1, 2}
    s, b = r["engines"]["sparrow"], r["engines"]["sparrow-before"]
    assert ratio["decode"] == pytest.approx(s["decode_tok_s"]["median"] / b["decode_tok_s"]["median"])
    assert ratio["batch_time"][2] == pytest.approx(s["batch_ms"][2] / b["batch_ms"][2])


def test_two_builds_alternate_pass_by_pass(tiny, tmp_path):
    """bench_builds: each worker loads the runtime of the folder it was given (here this build for both), every T
    gets passes from both builds in every round, and the ratio is the medians'; a folder without a build is refused."""
    from sparrow.bench_device import bench_builds
    from sparrow.runtime import _sparrow
    build = Path(_sparrow.__file__).resolve().parent
    r = bench_builds.run(str(tiny), str(build), str(build), sizes=(1, 3), rounds=2, threads=1, cached=4)
    assert [x["T"] for x in r["results"]] == [1, 3]
    for x in r["results"]:
        assert x["before_ms"]["n"] == x["after_ms"]["n"] == 2 * r["passes_per_turn"][x["T"]]
        assert x["after_over_before"] == pytest.approx(x["after_ms"]["median"] / x["before_ms"]["median"])
    for w in r["workers"].values():
        assert Path(w["library"]).resolve().parent == build and w["kernel_tier"]
    with pytest.raises(SystemExit, match="no _sparrow module"):
        bench_builds.main([str(tiny), "--before", str(tmp_path), "--after", str(build)])
    g = bench_builds.run_generator(str(tiny), str(build), str(build), rounds=2, threads=1, n_prompts=2, tokens=4,
                                   configs=[("greedy", "recycling"), ("sampling", "none")])
    assert [(r["mode"], r["drafter"]) for r in g["results"]] == [("greedy", "recycling"), ("sampling", "none")]
    for r in g["results"]:
        assert r["before"]["tok_s"]["n"] == r["after"]["tok_s"]["n"] == 2 and r["after"]["loop_us_per_step"] > 0


def test_phase_bytes_count_every_weight_once(tiny, tmp_path):
    """phases.phase_bytes: every tensor of the file in one phase, the embedding only where it is the LM head too."""
    import gguf
    from sparrow.bench_device import phases
    untied = write_tiny_llama(tmp_path / "untied.gguf", TinyConfig(tied=False))
    for path in (tiny, untied, SHIPPED_TARGET):
        tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
        pb = phases.phase_bytes(path)
        tied = "output.weight" not in tensors
        assert sum(pb.values()) == sum(tensors.values()) - (0 if tied else tensors["token_embd.weight"])
        assert pb["head"] >= (tensors["token_embd.weight"] if tied else tensors["output.weight"])
        assert (pb["experts"] > 0) == any("ffn_experts" in n for n in tensors)


def test_phase_fractions_above_one_are_marked_and_explained():
    from sparrow.bench_device import phases
    table = phases.phase_table({"attention": 2e6, "ffn": 4e6}, {"attention": 1e-4, "ffn": 1e-4, "other": 1e-6}, 1,
                               25.0)  # 80% and 160% of the bound
    rows = phases.markdown_rows("m", "decode", 1, table)
    assert rows == ["| m | decode | 1 | attention | 2.0 | 0.100 | 80% |", "| m | decode | 1 | ffn | 4.0 | 0.100 | 160%† |",
                    "| m | decode | 1 | other | 0.0 | 0.001 | - |"]
    assert phases.over_bound_lines(rows) == ["", phases.OVER_BOUND + "."] and phases.over_bound_lines(rows[:1]) == []


def test_report_on_a_small_cache_with_rapl_and_a_crashing_llama_cpp(tiny, tmp_path, monkeypatch):
    """One quick run on a machine faked three ways: a last-level cache smaller than the model (the bound is DRAM's),
    RAPL counters (energy), and a llama.cpp worker killed by SIGSEGV (left out, its signal in the report)."""
    monkeypatch.setattr(profile, "caches", lambda: [{"level": 2, "type": "Unified", "size": "64K", "bytes": 64 << 10}])
    monkeypatch.setattr(suite, "llama_cpp_available", lambda: True)
    monkeypatch.setattr(bench_decode, "worker", crash_llama_cpp_worker)
    r = run_suite(tiny, "tiny", quick=True, threads=1, energy_root=_fake_rapl(tmp_path, 7), onnx=False)
    assert r["energy"]["source"] == "RAPL package-0 (intel-rapl:0), package-1 (intel-rapl:1)"
    e = r["engines"]["sparrow"]["energy"]
    assert e["decode_j"]["n"] == 3 and e["decode_j_per_token"]["median"] == 0.0  # the fake counters stand still
    died = "the llama.cpp worker died (killed by signal 11 (SIGSEGV))"
    assert r["llama_cpp"] == f"failed: {died}" and f"llama.cpp left out: {died}" in r["notes"]
    assert list(r["engines"]) == ["sparrow"] and r["oracle"]["engine"] == "sparrow-scalar"
    b = r["engines"]["sparrow"]["bound"]
    # DRAM's, with buffers of the model's size: its weights are fewer than the large probe's buffers
    probes = r["bandwidth"]["cache_probes"]
    assert b["kind"] == "dram" and list(probes) == [str(b["probe_bytes"])]
    assert b["bandwidth_gb_s"] == probes[str(b["probe_bytes"])]["median"]
    assert b["probe_bytes"] < r["bandwidth"]["mb_per_thread"] << 20
    assert "exceed the L2 cache (0.1 MiB, the last level): every token streams them from DRAM" in b["why"]
    assert "probed with buffers of its size" in b["why"] and r["bandwidth"]["last_level_cache"]["bytes"] == 64 << 10
    assert set(r["phases"]["phases"]) >= {"attention", "ffn", "head"}  # the decode phase by phase (a dense model)
    r = json.loads(json.dumps({**r, "plots": {}}))
    assert validate(r) == []
    md = to_markdown(r)
    assert f"- Bound: DRAM, {b['bandwidth_gb_s']:.1f} GB/s: {b['why']}." in md
    assert "and so are those read from DRAM whose weights are fewer than the large probe's buffers" in md
    assert "## Decode phase by phase" in md
    assert f"failed: {died}" in md


def test_cli_bench_writes_report_markdown_and_plot(tiny, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(sparrow, ["bench", str(tiny), "--quick", "--threads", "1", "--no-llama-cpp",
                                     "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["schema"] == "sparrow.bench/4"
    assert (out / "report.md").read_text().startswith("# Sparrow device benchmark (quick)")
    assert (out / "tok_s_vs_bound.png").is_file()
    assert "| sparrow |" in r.output and "report.md" in r.output and "tok_s_vs_bound.png" in r.output


def test_report_side_by_side_with_llama_cpp(tiny):
    pytest.importorskip("llama_cpp")
    r = run_suite(tiny, "tiny", quick=True, threads=1)
    assert r["llama_cpp"] == "ran", r["notes"]
    assert list(r["engines"]) == ["sparrow", "llama.cpp", "onnxruntime"]  # the three side by side
    o = r["oracle"]
    # the greedy continuations agree until a near tie of llama.cpp's logits, if they part at all (measured: 16 of 16)
    fork = o["first_fork"]
    assert (fork is None) == (o["agreement_tokens"] == o["checked_tokens"] == 16), o
    assert fork is None or (fork["step"] == o["agreement_tokens"] and 0 <= fork["gap"] < TIE_GAP), o
    assert o["engine"] == "llama.cpp" and r["engines"]["llama.cpp"]["ttft_ms"]["median"] > 0
    assert list(o["checks"]) == ["sparrow", "onnxruntime"] and o["checks"]["sparrow"]["nmse"] < 1e-2  # meas. 1.1e-3
    assert o["checks"]["onnxruntime"]["nmse"] < 1e-2  # the f32 export: the file's exact function
    assert r["ratio_sparrow_over_llama_cpp"]["decode"] > 0 and r["ratio_sparrow_over_llama_cpp"]["ttft"] > 0
    assert validate(json.loads(json.dumps({**r, "plots": {}}))) == []


def test_arm_cpu_names_from_cpuinfo():
    """ARM Linux and Android name no model in /proc/cpuinfo: the cores come from implementer and part, big.LITTLE
    clusters counted, unknown parts as numbers; an x86 cpuinfo has none."""
    core = "processor\t: {i}\nBogoMIPS\t: 38.40\nCPU implementer\t: {impl}\nCPU architecture: 8\nCPU part\t: {part}\n\n"
    phone = "".join(core.format(i=i, impl="0x41", part="0xd05" if i < 4 else "0xd0b") for i in range(8))
    assert profile.arm_cpu_names(phone) == "4x Cortex-A55 + 4x Cortex-A76"
    odd = core.format(i=0, impl="0x51", part="0x804") + core.format(i=1, impl="0x41", part="zz")
    assert profile.arm_cpu_names(odd) == "1x implementer 0x51 part 0x804"
    assert profile.arm_cpu_names("processor\t: 0\nmodel name\t: AMD EPYC\n") is None
