"""AArch64: libsparrow, its check programs and the C example cross-built for aarch64 (native/cmake/aarch64-linux-gnu.cmake)
and run under qemu-aarch64 on three CPU models, each selecting its own kernel tier from HWCAP:
cortex-a53 (NEON only: "neon"), neoverse-n1 (+ dot product: "dotprod") and max (+ int8 matrix multiply: "i8mm").

- tests/native/kernels_check.c: every tier the emulated CPU can run against "ref" (the bounds of test_kernels.py);
- tests/native/logits_dump.c on the shipped tiny BlockFFN and tiny llamas of each weight type: every logit within
  NMSE 1e-4 of this host's (x86) forward pass, and the greedy continuation equal to the host's or forking only
  where the host's top-2 logits are within 0.5 (engines that round differently may break a near tie differently);
- the C example sparrow-generate runs a prompt to the end.

Needs the cross compiler and qemu (.ci/run installs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user);
without them the tests skip, except under CI, where they fail. qemu timings mean nothing: nothing here is timed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sparrow.runtime import Model
from tiny_llama import TinyConfig, write_tiny_llama

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parent.parent
SYSROOT = Path("/usr/aarch64-linux-gnu")
CPUS = {"cortex-a53": "neon", "neoverse-n1": "dotprod", "max": "i8mm"}  # CPU model -> the tier it must select
TIERS_OF = {"cortex-a53": ["ref", "neon"], "neoverse-n1": ["ref", "neon", "dotprod"],
            "max": ["ref", "neon", "dotprod", "i8mm"]}
PROMPT = [1, 5, 77, 270, 12, 9, 260, 41, 8, 150, 33, 2, 101]  # ids every test model has (the tiny llama: 275)
N_GEN = 12


@pytest.fixture(scope="module")
def arm_build(tmp_path_factory) -> Path:
    missing = [t for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64", "cmake") if not shutil.which(t)]
    if missing or not (SYSROOT / "lib").is_dir():
        reason = f"no aarch64 cross toolchain / qemu ({', '.join(missing) or SYSROOT} missing)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    build = tmp_path_factory.mktemp("aarch64")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT / "native"), "-B", str(build), *gen,
                    f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'native' / 'cmake' / 'aarch64-linux-gnu.cmake'}",
                    "-DSPARROW_PYTHON=OFF", "-DSPARROW_JAVA=OFF", "-DSPARROW_CHECKS=ON", "-DSPARROW_EXAMPLES=ON"],
                   check=True, capture_output=True)
    out = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "warning:" not in out.stdout + out.stderr, (out.stdout + out.stderr)[-4000:]
    return build


def qemu(cpu: str, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-aarch64", "-cpu", cpu, "-L", str(SYSROOT), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("cpu", CPUS)
def test_every_tier_matches_ref_under_qemu(arm_build, cpu):
    out = qemu(cpu, arm_build / "kernels_check")
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    lines = out.stdout.splitlines()
    assert lines[0].endswith(f"best tier: {CPUS[cpu]}"), lines[0]
    assert lines[1:] == [f"{t}: ok" for t in TIERS_OF[cpu]]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The shipped tiny BlockFFN and a tiny llama per weight type (K = 128 and 256: whole quantization blocks)."""
    folder = tmp_path_factory.mktemp("arm-models")
    out = {"blockffn-tiny": ROOT / "models" / "blockffn-tiny.Q8_0.gguf"}
    Q = gguf.GGMLQuantizationType
    for name, wtype in (("Q4_0", Q.Q4_0), ("Q4_1", Q.Q4_1), ("Q8_0", Q.Q8_0), ("F16", Q.F16)):
        cfg = TinyConfig(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256, wtype=wtype, seed=3)
        out[f"llama-{name}"] = write_tiny_llama(folder / f"llama-{name}.gguf", cfg)
    return out


def host_run(path: Path) -> tuple[np.ndarray, list[int]]:
    """The rows logits_dump writes, from this host's forward pass: the prompt's positions, then one row per greedy
    step but the last; and the greedy tokens."""
    with Model(path) as model, model.session(n_ctx=len(PROMPT) + N_GEN + 1, n_batch=len(PROMPT),
                                             n_threads=2) as s:
        rows = list(s.eval(PROMPT, logits="all"))
        toks = []
        for i in range(N_GEN):
            toks.append(int(np.argmax(rows[-1])))
            if i + 1 < N_GEN:
                rows.append(s.eval([toks[-1]]))
    return np.array(rows, np.float32), toks


def read_dump(path: Path) -> tuple[np.ndarray, list[int], int]:
    raw = path.read_bytes()
    n_vocab, n_rows, n_gen = np.frombuffer(raw[:12], np.int32)
    logits = np.frombuffer(raw[12:12 + 4 * n_rows * n_vocab], np.float32).reshape(n_rows, n_vocab)
    toks = np.frombuffer(raw[12 + 4 * n_rows * n_vocab:], np.int32).tolist()
    assert len(toks) == n_gen
    return logits, toks, int(n_vocab)


@pytest.mark.parametrize("name", ["blockffn-tiny", "llama-Q4_0", "llama-Q4_1", "llama-Q8_0", "llama-F16"])
@pytest.mark.parametrize("cpu", CPUS)
def test_end_to_end_logits_and_greedy_match_the_host(arm_build, models, tmp_path, cpu, name):
    dump = tmp_path / "out.bin"
    out = qemu(cpu, arm_build / "logits_dump", models[name], dump, ",".join(map(str, PROMPT)), N_GEN)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == CPUS[cpu]
    got, toks, _ = read_dump(dump)
    want, host_toks = host_run(models[name])
    assert got.shape == want.shape
    nmse = float(((got - want) ** 2).mean() / max((want ** 2).mean(), 1e-30))
    assert nmse < 1e-4, f"{cpu} {name}: NMSE {nmse:.2e} against the host"
    fork = next((i for i, (a, b) in enumerate(zip(toks, host_toks)) if a != b), None)
    if fork is not None:  # a near tie in the host's logits at the first differing step, nothing else
        row = want[len(PROMPT) - 1 + fork]
        gap = float(row[host_toks[fork]] - row[toks[fork]])
        assert gap < 0.5, f"{cpu} {name}: greedy forks at step {fork} where the host's top token leads by {gap:.3f}"


@pytest.mark.parametrize("cpu", ["cortex-a53", "max"])
def test_c_example_runs_under_qemu(arm_build, models, cpu):
    out = qemu(cpu, arm_build / "sparrow-generate", models["llama-Q4_0"], "the cat", 8)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "no text generated"
