"""Whole models on the scalar `ref` kernels (SPARROW_FORCE_SCALAR=1), the tier ARM runs today.

The kernel tests compare every SIMD tier with `ref` kernel by kernel; the model tests run whatever tier the CPU has.
Here the shipped BlockFFN models and tiny random llamas run end to end on `ref`, in a subprocess (the tier is chosen
once, when the library loads), and must give:
- the shipped models: the golden greedy text of tests/test_shipped_models.py (what the SIMD path gives), and logits
  within the NMSE bound that test states against BlockFFNGGUFRef (1e-4; measured 1.4-3.8e-5);
- the tiny llamas (Q8_0, Q4_0, Q4_1, F16): the SIMD path's greedy tokens, and the bounds of tests/test_tiny_models.py
  against LlamaRef, plain and rounding as the runtime does (measured on ref: <= 5e-15 quantized, 1.6e-10 F16).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import package_root
from sparrow.runtime import Model, Sampler, SamplerParams, generate_tokens

Q = gguf.GGMLQuantizationType
TESTS = Path(__file__).resolve().parent
LLAMAS = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "f16": Q.F16}
BOUNDS = {"q8_0": (3e-4, 1e-12), "q4_0": (3e-4, 1e-12), "q4_1": (3e-4, 1e-12), "f16": (2e-7, 1e-8)}  # test_tiny_models
PROMPT = [1, 5, 100, 260, 261, 7, 42, 270, 3, 99, 150, 200, 33]
N_GREEDY = 24


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((a - ref) ** 2) / np.var(ref))


def greedy_tokens(path: Path) -> list[int]:
    with Model(path) as m, m.session(n_ctx=64, n_threads=2) as s:
        sampler = Sampler(m.info.n_vocab, SamplerParams.greedy())
        return list(generate_tokens(s, PROMPT, max_tokens=N_GREEDY, sampler=sampler, stop_at_eog=False))


def child(folder: str) -> None:
    """Runs in the subprocess, on the scalar tier: measures everything and prints one JSON line."""
    from reference.blockffn import BlockFFNGGUFRef
    from reference.llama import LlamaRef
    from sparrow.runtime import _sparrow
    from test_shipped_models import GOLDEN, NAMES, PROMPTS, greedy, path_of
    from tiny_llama import TinyConfig, write_tiny_llama

    out: dict = {"tier": _sparrow.kernel_tier(), "shipped": {}, "llamas": {}}
    for name in NAMES:
        ref = BlockFFNGGUFRef.from_gguf(path_of(name))
        with Model(path_of(name)) as model:
            texts = [greedy(model, p) for p in PROMPTS]
            errs = []
            for prompt, golden in zip(PROMPTS, GOLDEN[name]):
                tokens = model.tokenize(prompt) + model.tokenize(golden)
                with model.session(n_ctx=256, n_batch=64, n_threads=1) as s:
                    errs.append(nmse(s.eval(tokens, logits="all"), ref.forward(tokens)[0]))
        out["shipped"][name] = {"texts": texts, "nmse": max(errs)}
    for name, wtype in LLAMAS.items():
        path = write_tiny_llama(Path(folder) / f"{name}.gguf", TinyConfig(wtype=wtype))
        with Model(path) as m, m.session(n_ctx=64, n_threads=2) as s:
            ours = s.eval(PROMPT, logits="all")
        out["llamas"][name] = {
            "greedy": greedy_tokens(path),
            "nmse": nmse(ours, LlamaRef.from_gguf(str(path)).forward(PROMPT)),
            "nmse_rounded": nmse(ours, LlamaRef.from_gguf(str(path), runtime_rounding=True).forward(PROMPT))}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def scalar(tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("scalar")
    env = {**os.environ, "SPARROW_FORCE_SCALAR": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    code = f"import test_scalar_tier as t; t.child({str(folder)!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=package_root(), capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), folder


def test_the_subprocess_ran_the_scalar_tier(scalar):
    assert scalar[0]["tier"] == "ref"


def test_shipped_models_on_the_scalar_tier(scalar):
    from test_shipped_models import GOLDEN, NAMES

    for name in NAMES:
        got = scalar[0]["shipped"][name]
        assert got["texts"] == GOLDEN[name], name
        assert got["nmse"] < 1e-4, (name, got["nmse"])


@pytest.mark.parametrize("name", list(LLAMAS))
def test_tiny_llamas_on_the_scalar_tier(scalar, name):
    got, folder = scalar[0]["llamas"][name], scalar[1]
    bound, rounded_bound = BOUNDS[name]
    assert got["nmse"] < bound and got["nmse_rounded"] < rounded_bound, got
    assert got["greedy"] == greedy_tokens(folder / f"{name}.gguf")  # this process: the best tier the CPU has
