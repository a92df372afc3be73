"""The "amx" kernel tier (native/src/kernels/x86/amx.c): the avx512 tier with its packed Q4_0/Q4_1/Q8_0 matmuls on
AMX-INT8 tiles for calls of several tokens.

Tolerance: none. The tiles compute each (token, row, block) integer dot product exactly, as vpdpbusd does, and the
float epilogue is avx512's, operation for operation and in the same order, so every output is bit-identical to the
avx512 tier -- matmuls for any T and row range, and a whole model's logits. (Speculative decoding and multi-sequence
batching rely on a token's logits not depending on how many tokens share the forward pass.)

Skipped where the CPU, OS or compiler has no AMX-INT8 (AMD Zen, Intel before Sapphire Rapids, Linux before 5.16).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import package_root

gguf = pytest.importorskip("gguf")
from sparrow.runtime import _sparrow

testing = _sparrow.testing
QT = gguf.GGMLQuantizationType
TIERS = testing.tiers()
pytestmark = pytest.mark.skipif("amx" not in TIERS, reason="no amx tier here: the CPU/OS lacks AMX-INT8 tiles "
                                f"(features: {_sparrow.cpu_features()}) or the compiler lacked -mamx-int8")

T_VALUES = [1, 3, 8, 11, 12, 15, 16, 17, 31, 32, 33, 48, 64, 70]  # thresholds (Q8_0: 12, Q4: 32), tiles, passes


def weights(qt: QT, n: int, k: int, seed: int) -> bytes:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[:, ::7] *= 3.0
    return gguf.quants.quantize(w, qt).tobytes()


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_amx_matmul_bit_identical_to_avx512(qt):
    """N not a multiple of 16, one to three K chunks of 64 blocks (K = 4096: two), SmolLM2's shapes, row ranges."""
    for N, K in [(37, 576), (16, 32), (1, 64), (129, 160), (50, 2304), (64, 1536), (576, 576), (17, 4096)]:
        data = weights(qt, N, K, seed=N + K)
        xall = np.random.default_rng(K).standard_normal((max(T_VALUES), K)).astype(np.float32)
        xall[3] *= 100.0  # a token of large activations next to small ones in the same tile
        for T in T_VALUES:
            x = np.ascontiguousarray(xall[:T])
            ya = testing.matmul_packed("amx", int(qt), data, N, x)
            yb = testing.matmul_packed("avx512", int(qt), data, N, x)
            assert np.isfinite(ya).all()
            np.testing.assert_array_equal(ya, yb, err_msg=f"{qt.name} N={N} K={K} T={T}")
            if N > 16:
                r0, r1 = 16, min(N, 48)
                yr = testing.matmul_packed("amx", int(qt), data, N, x, r0, r1)
                np.testing.assert_array_equal(yr[:, r0:r1], yb[:, r0:r1], err_msg=f"rows {r0}..{r1} T={T}")
                assert not yr[:, :r0].any() and not yr[:, r1:].any()


def test_amx_token_results_do_not_depend_on_batch():
    """A token's outputs are the same whether its call has 1, 4 or 16 tokens or 40 (avx512 kernels below the type's
    threshold, tiles from it)."""
    N, K = 96, 576
    for qt in (QT.Q4_1, QT.Q8_0):
        data = weights(qt, N, K, seed=7)
        x = np.random.default_rng(8).standard_normal((40, K)).astype(np.float32)
        full = testing.matmul_packed("amx", int(qt), data, N, x)
        for t in (0, 3, 17, 39):
            np.testing.assert_array_equal(testing.matmul_packed("amx", int(qt), data, N, x[t:t + 1]), full[t:t + 1])
        np.testing.assert_array_equal(testing.matmul_packed("amx", int(qt), data, N, x[16:20]), full[16:20])
        np.testing.assert_array_equal(testing.matmul_packed("amx", int(qt), data, N, x[8:24]), full[8:24])


LOGITS_SCRIPT = """
import sys
import numpy as np
from sparrow.runtime import Model, _sparrow
assert _sparrow.kernel_tier() == sys.argv[2], (_sparrow.kernel_tier(), sys.argv[2])
s = Model(sys.argv[1]).session(n_ctx=256, n_batch=64, n_threads=2)
tokens = [int(t) for t in np.random.default_rng(0).integers(0, 49152, 40)]
logits = s.eval(tokens, logits="all")  # [40, V]: one forward pass of 40 tokens
s.truncate(0)
last = np.stack([s.eval(tokens[:36], logits="all")[-1], s.eval(tokens[36:], logits="all")[-1]])  # 36 then 4 tokens
np.save(sys.argv[3], logits)
np.save(sys.argv[4], last)
"""


def test_smollm2_logits_bit_identical_to_avx512(smollm_path, tmp_path):
    """SmolLM2-135M (Q4_1 and Q8_0 weights) on a 40-token batch: every logit of the amx tier equals avx512's, and the
    same prompt split 36 + 4 gives the same last logits as the single batch."""
    out = {}
    for tier in ("avx512", "amx"):
        env = {k: v for k, v in os.environ.items() if k != "SPARROW_FORCE_SCALAR"}
        env["SPARROW_KERNEL_TIER"] = tier
        files = (tmp_path / f"{tier}.npy", tmp_path / f"{tier}-split.npy")
        subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(smollm_path), tier, *map(str, files)], env=env,
                       cwd=package_root(), check=True)
        out[tier] = [np.load(f) for f in files]
    a, b = out["amx"][0], out["avx512"][0]
    assert a.shape == (40, 49152) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out["amx"][1], out["avx512"][1])
    np.testing.assert_array_equal(out["amx"][1], a[[35, 39]])  # split 36 + 4: the batch's logits of those tokens
