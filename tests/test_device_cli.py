"""Choosing where a session runs (issue 20): the device names runtime.native takes ("cpu", "vulkan", "vulkan:N" or
the number), devices(), `sparrow generate --device vulkan` against the CPU on the shipped BlockFFN model, the clear
errors (a bad name, no device, a model routed to llama.cpp), and `sparrow bench`'s device listing and "gpu" section.

Tests that run on a Vulkan device skip when there is none, except under CI (which installs lavapipe), where they
fail."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from sparrow.bench_device import sections
from sparrow.bench_device.bench_decode import TIE_GAP
from sparrow.bench_device.profile import device_profile
from sparrow.bench_device.schema import DEVICE, GPU_DEVICE, GPU_SECTION, validate
from sparrow.bench_device.suite import device_summary
from sparrow.cli import sparrow
from sparrow.runtime import _sparrow, native
from sparrow.runtime.native import Model, device_index, devices, parse_device

TINY = sections.SHIPPED_TARGET  # models/blockffn-tiny.Q8_0.gguf: grouped-query attention, runs on a GPU session
LAVAPIPE = {"index": 1, "name": "llvmpipe (LLVM 15.0.6, 256 bits)", "kind": "cpu", "api": "vulkan",
            "api_version": "1.3.230", "driver": "llvmpipe", "memory_bytes": 2 << 30}


@pytest.fixture
def vulkan() -> dict:
    """The first Vulkan device; skip without one, fail under CI."""
    found = devices()
    if not found:
        why = native.device_error() or "no device"
        if os.environ.get("CI"):
            pytest.fail(f"CI installs lavapipe, but the library found no Vulkan device: {why}")
        pytest.skip(f"no Vulkan device: {why}")
    return found[0]


@pytest.fixture
def no_devices(monkeypatch) -> str:
    """A machine without Vulkan devices, as the library would report it."""
    why = "no Vulkan loader (libvulkan.so.1 not found)"
    monkeypatch.setattr(native, "devices", list)
    monkeypatch.setattr(native, "device_error", lambda: why)
    return why


def run(*args: str):
    return CliRunner().invoke(sparrow, list(args), catch_exceptions=False)


PROMPT = "Once upon a time there was"


def assert_same_greedy(want: list[int], got: list[int], prompt: str = PROMPT) -> None:
    """The device's greedy tokens are the CPU's, or part from them only where the CPU's logits of the two tokens are
    a near tie (< bench_decode.TIE_GAP apart: float sums in another order may pick either); the rest is then a
    different continuation, not compared."""
    fork = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if fork is None:
        assert len(got) == len(want)
        return
    with Model(TINY) as model, model.session(n_ctx=128) as cpu:
        logits = cpu.prefill(model.tokenize(prompt, parse_special=True) + want[:fork])
    gap = float(logits[want[fork]] - logits[got[fork]])
    assert gap < TIE_GAP, f"token {fork}: {got[fork]} instead of the CPU's {want[fork]}, which leads by {gap:.3f}"


# ---- the device names ----

@pytest.mark.parametrize("device, index", [("cpu", 0), ("CPU", 0), (" cpu ", 0), (0, 0), ("vulkan", 1),
                                           ("Vulkan", 1), ("vulkan:1", 1), ("vulkan:2", 2), ("vulkan:12", 12),
                                           (1, 1), (3, 3)])
def test_parse_device_good(device, index):
    assert parse_device(device) == index


@pytest.mark.parametrize("device, message", [
    ("vulkan:0", "numbered from 1"), ("vulkan:x", "numbered from 1"), ("vulkan:", "numbered from 1"),
    ("vulkan:-1", "numbered from 1"), ("vulkan:²", "numbered from 1"), ("cuda", "unknown device 'cuda'"),
    ("gpu", "unknown device"), ("cpu:1", "unknown device"), ("", "unknown device"), (-1, "from 1, not -1")])
def test_parse_device_bad(device, message):
    with pytest.raises(ValueError, match=message):
        parse_device(device)


@pytest.mark.parametrize("device", [None, 1.5, True, ["vulkan"]])
def test_parse_device_wrong_type(device):
    with pytest.raises(TypeError, match="string such as 'cpu'"):
        parse_device(device)


def test_device_index_says_why_there_is_no_device(no_devices):
    assert device_index("cpu") == 0  # the CPU needs no device
    with pytest.raises(ValueError, match="has no Vulkan GPU device: no Vulkan loader"):
        device_index("vulkan")


def test_device_index_past_the_last_lists_the_devices(monkeypatch):
    monkeypatch.setattr(native, "devices", lambda: [LAVAPIPE])
    assert device_index("vulkan:1") == 1
    with pytest.raises(ValueError, match=r"no Vulkan device 2; there are: vulkan:1 \(llvmpipe"):
        device_index("vulkan:2")


def test_devices_shape():
    found = devices()
    assert isinstance(found, list) and isinstance(_sparrow.device_backend_built(), bool)
    assert bool(found) or native.device_error() or not _sparrow.device_backend_built()
    for i, d in enumerate(found, 1):
        assert d["index"] == i and d["api"] == "vulkan" and d["name"]
        assert d["kind"] in ("integrated", "discrete", "virtual", "cpu", "other")
        assert validate(d, GPU_DEVICE) == []
        assert d["memory_bytes"] > 0


# ---- Python API ----

def test_session_on_a_device_decodes_as_the_cpu(vulkan):
    with Model(TINY) as model:
        prompt = model.tokenize("Once upon a time")
        with model.session(n_ctx=128) as cpu, model.session(n_ctx=128, device="vulkan") as gpu:
            assert (cpu.device, gpu.device) == (0, 1)
            want = list(cpu.generate(prompt, max_tokens=12))
            assert_same_greedy(want, list(gpu.generate(prompt, max_tokens=12)), "Once upon a time")
        assert model.session_memory(n_ctx=128, device="vulkan:1").n_ctx == 128
        with pytest.raises(ValueError, match="numbered from 1"):
            model.session(device="vulkan:0")


# ---- the CLI ----

def _generate(device: str, *extra: str) -> dict:
    """`sparrow generate --json` greedy (no repetition penalty), 16 tokens."""
    r = run("generate", "-m", str(TINY), "--temperature", "0", "--repeat-penalty", "1", "--max-tokens", "16",
            "--draft", "none", "--json", "--device", device, *extra, PROMPT)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_generate_on_vulkan_equals_the_cpu(home, vulkan):
    cpu, gpu = _generate("cpu"), _generate("vulkan")
    assert (cpu["device"], gpu["device"], gpu["backend"]) == ("cpu", "vulkan", "native")
    assert len(cpu["tokens"]) == 16
    assert_same_greedy(cpu["tokens"], gpu["tokens"])
    if gpu["tokens"] == cpu["tokens"]:
        assert gpu["text"] == cpu["text"]


def test_generate_on_vulkan_with_a_drafter(home, vulkan):
    """Speculative decoding (the C generator's tree verification, and a draft model on the CPU) on a GPU session:
    greedy tokens as plain decoding on the CPU."""
    plain = _generate("cpu")["tokens"]
    for draft in ("hybrid", str(sections.SHIPPED_DRAFT)):
        assert_same_greedy(plain, _generate("vulkan:1", "--draft", draft)["tokens"])


@pytest.mark.parametrize("device, message", [("vulkan:0", "numbered from 1"), ("cuda", "unknown device 'cuda'"),
                                             ("vulkan:x", "numbered from 1")])
def test_cli_bad_device_is_a_usage_error(home, device, message):
    for command in (["generate", "-m", str(TINY), "hello"], ["chat", str(TINY)]):
        r = run(*command, "--device", device)
        assert r.exit_code == 2 and "Invalid value for '--device'" in r.output and message in r.output, r.output


def test_cli_device_without_vulkan_says_why(home, no_devices):
    r = run("generate", "-m", str(TINY), "--device", "vulkan", "hello")
    assert r.exit_code == 1 and "no Vulkan GPU device: no Vulkan loader" in r.output, r.output
    assert "Traceback" not in r.output


def test_cli_device_on_a_llama_cpp_routed_model(home, monkeypatch):
    """llama.cpp runs on the CPU only here: --device vulkan is refused before the model loads (llama-cpp-python
    need not be installed to see it)."""
    monkeypatch.setattr(native, "devices", lambda: [LAVAPIPE])
    monkeypatch.setenv("SPARROW_BACKEND", "llama.cpp")
    for command in (["generate", "-m", str(TINY), "hello"], ["chat", str(TINY)]):
        r = run(*command, "--device", "vulkan")
        assert r.exit_code == 1, r.output
        assert "device 'vulkan' is for Sparrow's native runtime; this model runs on llama.cpp" in r.output
        assert "use device 'cpu'" in r.output


def test_chat_on_vulkan(home, vulkan):
    r = CliRunner().invoke(sparrow, ["chat", str(TINY), "--device", "vulkan", "--temperature", "0", "--max-tokens",
                                     "4", "--draft", "none"], input="Hello\n/exit\n", catch_exceptions=False)
    assert r.exit_code == 0 and "(native backend on vulkan," in r.output, r.output


# ---- sparrow bench ----

def test_bench_lists_the_devices(monkeypatch):
    lines = sections.gpu_device_lines([LAVAPIPE], "")
    assert lines == [("vulkan:1 llvmpipe (LLVM 15.0.6, 256 bits): cpu (software), vulkan 1.3.230, driver llvmpipe, "
                      "2.0 GiB")]
    assert sections.gpu_device_lines([], "no loader") == ["none (no loader)"]
    gpu = device_profile()["gpu"]
    assert validate(gpu, DEVICE["gpu?"]) == [] and gpu["devices"] == devices()
    report = {"device": {"gpu": gpu}}
    assert device_summary(report)[0].startswith("Vulkan devices: ")
    monkeypatch.setattr(native, "devices", list)
    monkeypatch.setattr(native, "device_error", lambda: "no loader")
    assert device_summary({"device": device_profile()}) == ["Vulkan devices: none (no loader)"]


def test_bench_gpu_section(vulkan):
    s = sections.gpu_section(TINY, "vulkan", threads=1, tokens=8, repeats=1)
    assert validate(s, GPU_SECTION) == []
    assert s["device"] == "vulkan:1" and s["info"] == vulkan and s["greedy_agreement_tokens"] == 8
    assert set(s["engines"]) == {"cpu", "vulkan:1"}
    text = "\n".join(sections.gpu_markdown(s))
    assert "| vulkan:1 |" in text and "| cpu |" in text
    assert s["functional_only"] == (vulkan["kind"] == "cpu")
    assert ("FUNCTIONAL CHECK ONLY" in text) == s["functional_only"]


def test_bench_device_option_errors(no_devices):
    r = CliRunner().invoke(sparrow, ["bench", str(TINY), "--quick", "--device", "cuda"])
    assert r.exit_code == 2 and "unknown device 'cuda'" in r.output, r.output
    r = CliRunner().invoke(sparrow, ["bench", str(TINY), "--quick", "--device", "vulkan"])
    assert r.exit_code == 2 and "no Vulkan GPU device: no Vulkan loader" in r.output, r.output


def test_bench_tune_is_for_the_cpu(monkeypatch):
    monkeypatch.setattr(native, "devices", lambda: [LAVAPIPE])
    r = CliRunner().invoke(sparrow, ["bench", str(TINY), "--tune", "--device", "vulkan"])
    assert r.exit_code == 2 and "--tune searches the CPU settings" in r.output, r.output


def test_cli_bench_quick_on_vulkan(vulkan, tmp_path):
    """`sparrow bench --quick --device vulkan` end to end (seconds on the tiny model): the devices listed and the gpu
    section in the printed summary, report.md and report.json (write_report checks it against the schema)."""
    out = tmp_path / "report"
    r = CliRunner().invoke(sparrow, ["bench", str(TINY), "--quick", "--threads", "1", "--no-llama-cpp", "--no-onnx",
                                     "--device", "vulkan", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["device"]["gpu"]["devices"] == devices() and report["gpu"]["device"] == "vulkan:1"
    md = (out / "report.md").read_text()
    assert f"- Vulkan devices: vulkan:1 {vulkan['name']}" in md and "## GPU device: decode beside the CPU" in md
    assert f"Vulkan devices: vulkan:1 {vulkan['name']}" in r.output and "| vulkan:1 |" in r.output
