"""`sparrow bench`: the device profile on this machine, the report schema of a --quick run on a tiny model, and the
CLI writing report.json and report.md."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_llama import TinyConfig, write_tiny_llama

from bench_device.profile import device_profile, read_bandwidth
from bench_device.suite import SCHEMA, run_suite, to_markdown, weight_bytes_per_token
from runtime.cli import sparrow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("bench") / "tiny.gguf", TinyConfig())


@pytest.fixture(scope="module")
def report(tiny) -> dict:
    return run_suite(tiny, "tiny", quick=True, threads=1, llama_cpp=False)


def test_profile_on_this_machine():
    p = device_profile()
    assert p["physical_cores"] >= 1 and p["logical_cores"] >= p["physical_cores"]
    assert p["kernel_tier"] in ("ref", "avx2", "avx512")
    assert isinstance(p["cpu_features"], list) and isinstance(p["cpu_model"], str) and p["cpu_model"]
    assert p["ram_total_bytes"] >= p["ram_available_bytes"] > 0
    assert all({"level", "type", "size", "bytes"} <= set(c) for c in p["caches"])
    bw = read_bandwidth(1, mb=32, repeats=2)
    assert bw["n"] == 2 and 0 < bw["min"] <= bw["median"] <= bw["max"]


def test_native_bandwidth_probe_pins_threads_and_checks_its_reads():
    from runtime import _sparrow

    r = _sparrow.bench_read_bandwidth(2, 8 << 20, 3, True)
    assert r["n_threads"] == 2 and r["bytes_per_thread"] == 8 << 20 and len(r["gb_s"]) == 3
    assert 0 < r["min"] <= r["median"] <= r["max"] and sorted(r["gb_s"])[1] == r["median"]
    if hasattr(os, "sched_setaffinity"):  # Linux: both threads pinned to CPUs this process may use
        assert r["n_pinned"] == 2 and r["pin_errno"] == 0
    unpinned = _sparrow.bench_read_bandwidth(1, 4096 + 255, 1, False)  # rounded down to a multiple of 256
    assert unpinned["n_pinned"] == 0 and unpinned["bytes_per_thread"] == 4096


@pytest.mark.parametrize("args, message", [
    ((0, 1 << 20, 3, True), "n_threads"), ((257, 1 << 20, 3, True), "n_threads"), ((1, 4095, 3, True), "at least 4096"),
    ((1, 1 << 20, 0, True), "repeats"), ((1, 1 << 20, 65, True), "repeats"),
    ((4, 1 << 61, 1, True), "physical memory"), ((256, 1 << 60, 1, True), "physical memory"),
])
def test_native_bandwidth_probe_rejects_bad_arguments(args, message):
    from runtime import _sparrow

    with pytest.raises(_sparrow.SparrowError, match="SP_ERR_INVALID_ARG.*" + message):
        _sparrow.bench_read_bandwidth(*args)


def test_weight_bytes_per_token_tied_head_reads_the_whole_embedding(tiny):
    w = weight_bytes_per_token(tiny)
    assert w["tied_embeddings"] and w["per_token"] == w["file_tensor_bytes"] > 0


def test_report_schema(report):
    r = json.loads(json.dumps(report))  # what report.json holds
    assert r["schema"] == SCHEMA == "sparrow.bench/1" and r["mode"] == "quick"
    assert {"device", "bandwidth", "model", "engines", "settings", "llama_cpp", "energy", "notes", "created"} <= set(r)
    assert r["llama_cpp"].startswith("skipped") and list(r["engines"]) == ["sparrow"]
    assert r["settings"]["threads"] == 1 and r["bandwidth"]["threads"]["1"]["median"] > 0
    assert isinstance(r["bandwidth"]["method"], str) and "numpy" in r["bandwidth"]["method"]
    assert r["model"]["weight_bytes_per_token"] > 0 and r["model"]["prompt_tokens"] > 0
    e = r["engines"]["sparrow"]
    for key in ("decode_tok_s", "prefill_tok_s"):
        s = e[key]
        assert s["n"] == 3 and 0 < s["min"] <= s["median"] <= s["max"]
    assert e["peak_rss_mb"] > 0 and e["bandwidth_bound_tok_s"] > 0
    assert e["fraction_of_bound"] == pytest.approx(e["decode_tok_s"]["median"] / e["bandwidth_bound_tok_s"])
    assert set(e["batch_ms"]) == {str(t) for t in r["settings"]["batch_sizes"]}
    assert e["batch_cost_vs_t1"]["1"] == 1.0
    md = to_markdown(report)
    assert "| sparrow |" in md and "llama.cpp | skipped" in md


def test_cli_bench_writes_both_files(tiny, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(sparrow, ["bench", str(tiny), "--quick", "--threads", "1", "--no-llama-cpp",
                                     "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["schema"] == "sparrow.bench/1"
    assert (out / "report.md").read_text().startswith("# Sparrow device benchmark (quick)")
    assert "| sparrow |" in r.output and "report.md" in r.output


def test_report_side_by_side_with_llama_cpp(tiny):
    pytest.importorskip("llama_cpp")
    r = run_suite(tiny, "tiny", quick=True, threads=1)
    assert r["llama_cpp"] == "ran", r["notes"]
    assert list(r["engines"]) == ["sparrow", "llama.cpp"] and r["greedy_agreement_tokens"] >= 8
    assert r["ratio_sparrow_over_llama_cpp"]["decode"] > 0
