"""Tensor-type kernels: GGUF byte compatibility, every SIMD tier against the `ref` tier, `ref` against numpy.

Shape legend: T = tokens (activation rows), K = reduction length, N = weight rows.

Tolerances (stated once, used below):
- quantize / dequantize / f16 / bf16 conversions and quantize_q8a: bit-exact.
- SIMD tier vs ref, quantized weights: both compute each block's integer dot product exactly; they differ only in
  float summation order and fused multiply-adds, so |y - y_ref| <= 1e-5 * (|W| @ |x|) elementwise (rel. to the sum of
  magnitudes, which bounds any reordering error) -- in practice ~1e-7.
- SIMD tier vs ref, float weights: same bound, 1e-5 * (|W| @ |x|).
- ref vs numpy oracle (float64 on dequantized weights and *unquantized* activations): the only difference is the
  activation quantization, at most d_x/2 = amax/254 per element, so |y - y_np| <= sum_blocks (|W_blk| . 1) * amax_x/254
  plus float32 rounding; we check against that bound.
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
SIMD_TIERS = [t for t in TIERS if t != "ref"]
QUANT = [QT.Q4_0, QT.Q4_1, QT.Q8_0]
FLOAT = [QT.F32, QT.F16, QT.BF16]
SUPPORTED = QUANT + FLOAT
T_VALUES = [1, 2, 3, 4, 5, 7, 8, 11, 12, 16, 17, 31, 32, 33, 64]  # 11-12, 31-32: the amx tier's thresholds; 17, 33


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def quantize_np(x: np.ndarray, qt: QT) -> bytes:
    """Reference bytes from the gguf package (BF16 through its own quantizer, F16 through numpy)."""
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), qt).tobytes()


def dequantize_np(data: bytes, qt: QT, n: int, k: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8).reshape(n, -1)
    if qt == QT.F32:
        return raw.view(np.float32).reshape(n, k).copy()
    return gguf.quants.dequantize(raw, qt).reshape(n, k).astype(np.float32)


def weights(qt: QT, n: int, k: int, seed: int = 1) -> tuple[bytes, np.ndarray]:
    """Random weights of type qt (N x K) as bytes, and their dequantized values."""
    w = rng(seed).standard_normal((n, k)).astype(np.float32)
    w[:, ::7] *= 3.0  # uneven magnitudes within blocks
    data = quantize_np(w, qt)
    return data, dequantize_np(data, qt, n, k)


# ---- traits, conversions, (de)quantization --------------------------------------------------------------------


def test_row_sizes_match_gguf():
    for qt in SUPPORTED:
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        assert testing.row_size(int(qt), 64 * bs) == 64 * ts, qt.name


@pytest.mark.parametrize("qt", SUPPORTED, ids=lambda q: q.name)
def test_quantize_matches_gguf_bytes(qt):
    r = rng(2)
    cases = [
        r.standard_normal(32 * 64).astype(np.float32),
        (r.standard_normal(32 * 8) * 1e-3).astype(np.float32),
        r.uniform(0.5, 2.0, 32 * 8).astype(np.float32),  # all positive: Q4_1 min > 0
        -r.uniform(0.5, 2.0, 32 * 8).astype(np.float32),
        np.zeros(64, np.float32),
        np.array([-0.0] + [0.0] * 31 + [1.0] * 32, np.float32),
        np.repeat(np.float32(0.75), 64),  # constant blocks: d = 0 for Q4_1
        (np.arange(96, dtype=np.float32) - 48) / 4,  # exact ties for rounding
    ]
    if qt == QT.Q4_1:
        cases.pop(5)  # min over {-0.0, +0.0}: numpy's SIMD reduction picks either zero; not a format property
    for x in cases:
        assert testing.quantize(int(qt), x) == quantize_np(x, qt), (qt.name, x[:4])


@pytest.mark.parametrize("qt", SUPPORTED, ids=lambda q: q.name)
def test_dequantize_matches_gguf(qt):
    x = rng(3).standard_normal(32 * 16).astype(np.float32) * 5
    data = quantize_np(x, qt)
    got = testing.dequantize(int(qt), data, x.size)
    want = dequantize_np(data, qt, 1, x.size)[0]
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_f16_conversion_all_halves_and_edge_floats():
    # f16 -> f32: all 65536 half values (NaNs compared as NaN, others bit for bit), via the F16 dequantizer
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = testing.dequantize(int(QT.F16), h.tobytes(), h.size)
    want = h.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    # f32 -> f16: random bit patterns over every exponent, halfway cases, subnormals, overflow, inf, quiet NaN
    bits = rng(4).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    bits = bits[(bits & 0x7FFFFFFF) <= 0x7F800000]  # no NaNs here
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    mid = halves[np.isfinite(halves)].astype(np.float32)
    ties = ((mid.view(np.uint32).astype(np.uint64) + (1 << 12)) & 0xFFFFFFFF).astype(np.uint32)  # halfway to next
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.996, 65520, -65520, 1e-8, 2**-25, 2**-24, 5.9e-8,
                        2**-14, 6.1e-5, 1e38, -1e-40, np.nan], np.float32)
    x = np.concatenate([bits.view(np.float32), mid, ties.view(np.float32), special])
    x = x[: x.size - x.size % 1] if x.size else x
    got = np.frombuffer(testing.quantize(int(QT.F16), x), np.uint16)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got, want)


def test_bf16_conversion_matches_ggml():
    bits = rng(5).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (bits & 0xFFFF0000) | 0x8000  # exactly halfway: round to even
    special = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x00000001, 0x807FFFFF,
                        0x7F7FFFFF, 0x3F808000, 0x3F818000], np.uint32)
    x = np.concatenate([bits, ties, special]).view(np.float32)
    assert testing.quantize(int(QT.BF16), x) == quantize_np(x, QT.BF16)
    got = testing.dequantize(int(QT.BF16), testing.quantize(int(QT.BF16), x), x.size)
    want = (np.frombuffer(quantize_np(x, QT.BF16), np.uint16).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_unsupported_types_rejected():
    with pytest.raises(RuntimeError):
        testing.row_size(int(QT.Q4_K), 256)
    with pytest.raises(RuntimeError):
        testing.quantize(99, np.zeros(32, np.float32))


# ---- activation quantization (q8a) ------------------------------------------------------------------------------


def q8a_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Oracle for sp_block_q8a: d = amax/127, q = round-half-even(x * (1/d)), s = d * sum(q); d and s are then stored
    rounded to F16 precision, as ggml's activation blocks store them."""
    b = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.rint(b * inv[:, None]).astype(np.int8)
    s = (d * q.astype(np.int32).sum(axis=1).astype(np.float32)).astype(np.float32)
    return d.astype(np.float16).astype(np.float32), s.astype(np.float16).astype(np.float32), q


def parse_q8a(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.frombuffer(data, dtype=np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)]))
    return a["d"], a["s"], a["qs"]


@pytest.mark.parametrize("tier", TIERS)
def test_quantize_q8a_exact(tier):
    r = rng(6)
    x = np.concatenate([r.standard_normal(32 * 40) * 3, np.zeros(32), (np.arange(64) - 32) * 0.5,
                        r.standard_normal(32) * 1e-30]).astype(np.float32)
    got = parse_q8a(testing.quantize_q8a(tier, x))
    want = q8a_np(x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert testing.quantize_q8a(tier, x) == testing.quantize_q8a("ref", x)


# ---- matmul -------------------------------------------------------------------------------------------------------


def magnitude(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|x| @ |W|^T in float64: the scale of any summation-order error, shape [T, N]."""
    return np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T


@pytest.mark.parametrize("qt", SUPPORTED, ids=lambda q: q.name)
def test_ref_matmul_matches_numpy(qt):
    N, K, T = 37, 256, 5
    data, wd = weights(qt, N, K, seed=7)
    x = rng(8).standard_normal((T, K)).astype(np.float32)
    y = testing.matmul("ref", int(qt), data, N, x)
    want = x.astype(np.float64) @ wd.astype(np.float64).T
    mag = magnitude(wd, x)
    if qt in QUANT:
        # activation quantization: |x - q*d| <= d/2 per element, d = amax_block/127; d itself rounded to F16
        # (relative error <= 2^-11 on every product)
        amax = np.abs(x.reshape(T, -1, 32)).max(axis=2)  # [T, K/32]
        wblk = np.abs(wd.astype(np.float64)).reshape(N, -1, 32).sum(axis=2)  # [N, K/32]
        bound = (amax / 254.0) @ wblk.T + (2.0**-11 + 1e-5) * mag
    else:
        bound = 1e-5 * mag
    assert (np.abs(y - want) <= bound).all(), np.abs(y - want).max()


@pytest.mark.parametrize("tier", SIMD_TIERS)
@pytest.mark.parametrize("qt", SUPPORTED, ids=lambda q: q.name)
def test_tier_matmul_matches_ref(tier, qt):
    for N, K in [(37, 576), (16, 32), (1, 64), (129, 160)]:
        data, wd = weights(qt, N, K, seed=N)
        xall = rng(K).standard_normal((max(T_VALUES), K)).astype(np.float32)
        for T in T_VALUES:
            x = np.ascontiguousarray(xall[:T])
            y = testing.matmul(tier, int(qt), data, N, x)
            y_ref = testing.matmul("ref", int(qt), data, N, x)
            tol = 1e-5 * magnitude(wd, x)
            err = np.abs(y.astype(np.float64) - y_ref)
            assert (err <= tol).all(), (tier, qt.name, N, K, T, err.max())


@pytest.mark.parametrize("tier", SIMD_TIERS)
def test_tier_matmul_extreme_int_values(tier):
    """Saturation check: Q8_0 weights of +-127 (and -128 written by hand) against activations of +-127."""
    N, K, T = 19, 128, 6
    r = rng(9)
    raw = np.zeros((N, K // 32, 34), np.uint8)
    raw[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    q = r.choice(np.array([-128, -127, 127], np.int8), size=(N, K // 32, 32))
    raw[:, :, 2:] = q.view(np.uint8)
    x = np.where(r.random((T, K)) < 0.5, -1.0, 1.0).astype(np.float32)
    data = raw.tobytes()
    y = testing.matmul(tier, int(QT.Q8_0), data, N, x)
    y_ref = testing.matmul("ref", int(QT.Q8_0), data, N, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for qt in (QT.Q4_0, QT.Q4_1):  # all nibbles 15 / 0 against +-127
        _bs, ts = gguf.GGML_QUANT_SIZES[qt]
        raw = np.full((N, K // 32, ts), 0xFF, np.uint8)
        raw[:, :, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
        if qt == QT.Q4_1:
            raw[:, :, 2:4] = np.frombuffer(np.float16(-0.25).tobytes(), np.uint8)
        raw[::2, :, ts - 16:] = 0x00
        data = raw.tobytes()
        y = testing.matmul(tier, int(qt), data, N, x)
        y_ref = testing.matmul("ref", int(qt), data, N, x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tier", TIERS)
def test_dot_f32(tier):
    for n in [1, 7, 16, 31, 64, 577, 1000]:
        a, b = rng(n).standard_normal((2, n)).astype(np.float32)
        got = testing.dot_f32(tier, a, b)
        want = float(a.astype(np.float64) @ b.astype(np.float64))
        assert abs(got - want) <= 1e-5 * float(np.abs(a) @ np.abs(b)) + 1e-30


# ---- dispatch ----------------------------------------------------------------------------------------------------


def test_tiers_and_features():
    assert TIERS[0] == "ref"
    feats = _sparrow.cpu_features().split()
    if "avx512" in TIERS:
        assert {"avx512f", "avx512bw", "avx512vl", "avx512vnni"} <= set(feats)
    if "avx2" in TIERS:
        assert {"avx2", "fma", "f16c"} <= set(feats)
    if "amx" in TIERS:
        assert {"amx_tile", "amx_int8"} <= set(feats) and "avx512" in TIERS


def _tier_in_subprocess(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARROW_FORCE_SCALAR", "SPARROW_KERNEL_TIER")}
    env.update(env_extra)
    code = "from sparrow.runtime import _sparrow; print(_sparrow.kernel_tier())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=package_root())
    return out.stdout.strip()


def test_force_scalar_env_selects_ref():
    """The library runs the best tier this CPU has (testing.tiers() lists those it can run, best last); an empty name
    means dispatch failed (sp_kernel_tier() returns "" when sp_kernels_get() has no table)."""
    best = _tier_in_subprocess({"SPARROW_FORCE_SCALAR": "0"})
    assert best != "", "kernel dispatch failed: sp_kernel_tier() is empty"
    assert best == TIERS[-1], (best, TIERS)
    assert _tier_in_subprocess({"SPARROW_FORCE_SCALAR": "1"}) == "ref"


def test_kernel_tier_env_selects_tier():
    """SPARROW_KERNEL_TIER=<name> runs that tier for the whole process when this CPU has it; a name it cannot run (or
    does not know) is ignored; SPARROW_FORCE_SCALAR wins over it."""
    for tier in TIERS:
        assert _tier_in_subprocess({"SPARROW_KERNEL_TIER": tier}) == tier
    assert _tier_in_subprocess({"SPARROW_KERNEL_TIER": "no-such-tier"}) == TIERS[-1]
    assert _tier_in_subprocess({"SPARROW_KERNEL_TIER": TIERS[-1], "SPARROW_FORCE_SCALAR": "1"}) == "ref"


# ---- F16 vectors of the KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("M,D,ld,n", [(3, 64, 192, 7), (24, 64, 64, 33), (5, 48, 100, 5), (1, 128, 128, 9),
                                      (17, 80, 96, 40), (2, 64, 64, 0), (9, 1, 3, 70), (7, 8, 8, 16)])
def test_attention_kernels_elementwise_and_near_float64(tier, M, D, ld, n):
    """attn_scores_f16 / attn_sum_f16 with M queries at once: every element equals what the same kernel gives for its
    query alone and its slot alone (bit for bit: a token's attention is the same in a draft tree as decoded alone),
    the key blocks' NaN padding never shows, and the results are float64 sums within float32 summation error.
    Rows whose p is 0 add nothing, even rows holding inf."""
    r = rng(M * 1000 + D + n)
    rows = (r.standard_normal((n, ld)) * 2).astype(np.float16)
    q = r.standard_normal((M, D)).astype(np.float32)
    keys = np.ascontiguousarray(rows[:, :D]).view(np.uint16)
    got = testing.attn_scores_f16(tier, q, keys, 0.125)
    assert got.shape == (M, n) and np.isfinite(got).all()
    for m in range(M):
        for j in {0, n // 2, n - 1} if n else ():
            one = testing.attn_scores_f16(tier, q[m:m + 1], keys[j:j + 1], 0.125)
            assert one[0, 0] == got[m, j], (m, j)
    exact = q.astype(np.float64) @ rows[:, :D].astype(np.float64).T * 0.125
    bound = 1e-6 * np.abs(q).astype(np.float64) @ np.abs(rows[:, :D].astype(np.float64)).T * 0.125 + 1e-30
    assert (np.abs(got - exact) <= 2 * bound * max(D, 1) ** 0.5 + 1e-7).all()

    p = r.random((M, n)).astype(np.float32)
    p[:, ::3] = 0.0  # masked slots
    if n > 3:
        rows[3, :D] = np.inf  # a masked slot holding inf adds nothing
    vrows = rows.view(np.uint16)
    start = r.standard_normal((M, D)).astype(np.float32)
    out = testing.attn_sum_f16(tier, start, p, vrows)
    assert out.shape == (M, D) and np.isfinite(out).all()
    for m in {0, M // 2, M - 1}:  # a query alone, and a part of D alone, give the same bits
        alone = testing.attn_sum_f16(tier, start[m:m + 1], p[m:m + 1], vrows)
        np.testing.assert_array_equal(alone[0], out[m])
        if D > 16:
            part = testing.attn_sum_f16(tier, np.ascontiguousarray(start[m:m + 1, 16:]), p[m:m + 1],
                                        np.ascontiguousarray(vrows[:, 16:]))
            np.testing.assert_array_equal(part[0, :D - 16], out[m, 16:])
    with np.errstate(invalid="ignore"):  # 0 * inf where p is 0: dropped by the where
        v64 = np.where(p[:, :, None] == 0, 0.0, p[:, :, None].astype(np.float64) * rows[None, :, :D].astype(np.float64))
    exact = start + v64.sum(axis=1)
    bound = 1e-6 * (np.abs(start) + np.abs(v64).sum(axis=1)) * max(n, 1) ** 0.5 + 1e-7
    assert (np.abs(out - exact) <= bound).all()


@pytest.mark.parametrize("tier", TIERS)
def test_round_f16_kernel(tier):
    """round_f16: each value rounded to the nearest F16 (ties to even), as numpy's float16 conversion: normal,
    subnormal, overflowing (to inf), infinite and NaN values, at every tail length."""
    r = rng(7)
    for n in [0, 1, 7, 8, 15, 16, 17, 33, 1000]:
        x = (r.standard_normal(n) * np.exp(r.uniform(-20, 12, n))).astype(np.float32)
        x[::11] = np.float32(6.1e-5) * r.uniform(0, 1, x[::11].size).astype(np.float32)  # subnormal F16 range
        x[5::13] = 70000.0  # beyond F16's largest: inf
        x[7::17] = -np.inf
        got = np.array(testing.round_f16(tier, x), np.float32)
        with np.errstate(over="ignore"):  # 70000 overflows F16: inf, as the kernel gives
            want = x.astype(np.float16).astype(np.float32)
        assert np.array_equal(got, want), (tier, n)
    y = np.array([np.nan, 1.0], np.float32)
    out = np.array(testing.round_f16(tier, y), np.float32)
    assert np.isnan(out[0]) and out[1] == 1.0


@pytest.mark.parametrize("tier", TIERS)
def test_max_f32_kernel(tier):
    """max_f32: the largest value and whether any is NaN or +inf (-inf allowed), at every length and position (the
    sampler's checked pass over the logits)."""
    r = rng(6)
    for n in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 100, 1000]:
        x = r.standard_normal(n).astype(np.float32)
        x[2::9] = -np.inf
        mx, bad = testing.max_f32(tier, x)
        assert not bad and (mx == (x.max() if n else -np.inf)), (tier, n)
        for at in range(n):
            for v in (np.nan, np.inf):
                y = x.copy()
                y[at] = v
                assert testing.max_f32(tier, y)[1], (tier, n, at, v)
            y = x.copy()
            y[at] = 50.0
            assert testing.max_f32(tier, y) == (50.0, False), (tier, n, at)
    assert testing.max_f32(tier, np.full(40, -np.inf, np.float32)) == (-np.inf, False)


@pytest.mark.parametrize("tier", TIERS)
def test_first_above_kernel(tier):
    """first_above: the index of the first element above the threshold, or n; NaN never above, -inf never; a hit in
    every position of the vector blocks and the tail (the top-k scan of Token Recycling relies on it)."""
    r = rng(5)
    for n in [0, 1, 15, 16, 17, 31, 32, 63, 64, 65, 200, 1000]:
        x = r.standard_normal(n).astype(np.float32)
        x[::7] = np.nan
        x[3::11] = -np.inf
        for t in [-np.inf, -1.0, 0.5, 2.0, np.inf]:
            hits = np.flatnonzero(x > np.float32(t))
            assert testing.first_above(tier, x, t) == (hits[0] if hits.size else n), (tier, n, t)
        for at in range(n):  # exactly one element above: found wherever it sits
            y = np.zeros(n, np.float32)
            y[at] = 1.0
            assert testing.first_above(tier, y, 0.5) == at, (tier, n, at)
            y[at] = 0.5  # equal is not above
            assert testing.first_above(tier, y, 0.5) == n


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 16, 33, 300])
def test_softmax_exp_kernel(tier, n):
    """exp_sum: exp(x - max) within 4 float32 ulp of float64 (the SIMD polynomials; ref is expf), exactly 0 for -inf
    (masked slots) and for arguments far below the maximum, and the sum of what it wrote, exactly in units of 2^-36:
    the same bits whatever the order and wherever exact zeros (masked slots) sit (kernels.h: trees and plain decoding
    agree)."""
    r = rng(n + 1)
    x = (r.standard_normal(n) * 30).astype(np.float32)
    x[::5] = -np.inf
    if n > 3:
        x[3] = x.max() - 200  # underflows: e^-200 is 0 in float32
    mx = float(np.max(x[np.isfinite(x)])) if np.isfinite(x).any() else 0.0
    y, total = testing.exp_sum(tier, x, mx)
    y = np.array(y, np.float32)
    want = np.exp((x - np.float32(mx)).astype(np.float64))  # of the float32 argument, as every tier rounds it
    assert np.all(y[x == -np.inf] == 0) and (n <= 3 or y[3] < 1e-37)
    tiny = want < 1e-30  # the AVX2 clamp at -87: ~1e-38 where float32 itself would give a denormal or 0
    np.testing.assert_allclose(y[~tiny], want[~tiny], rtol=4 * 2.0 ** -23, atol=0)
    exact = np.float32(np.rint(np.minimum(y, 1).astype(np.float64) * 2.0**36).sum() * 2.0**-36)
    assert np.float32(total) == exact
    if n > 1:  # reversed, with masked slots in other places: the same exponentials and the same sum, bit for bit
        x2 = np.concatenate([x[::-1], np.full(5, -np.inf, np.float32)])
        y2, total2 = testing.exp_sum(tier, x2, mx)
        np.testing.assert_array_equal(np.array(y2, np.float32)[:n], y[::-1])
        assert np.float32(total2) == np.float32(total)
    z = x.copy()
    if n:
        z[n // 2] = np.nan
        assert np.isnan(testing.exp_sum(tier, z, mx)[1])


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("n", [0, 1, 7, 16, 33, 1536])
def test_silu_mul_kernel(tier, n):
    """silu_mul (SwiGLU's gate): silu(x) * m, or silu(x) * s, within 8 float32 ulp of float64 (SIMD tiers: the softmax's
    exp polynomial), 0 far below zero, x far above; the same value for an element wherever it sits in the row (vector
    or tail); +inf stays inf, -inf gives no finite value, NaN stays NaN."""
    r = rng(7 + n)
    x = (r.standard_normal(n) * 6).astype(np.float32)
    if n > 3:
        x[:3] = [-120.0, 95.0, 0.0]
    m = r.standard_normal(n).astype(np.float32)
    x64 = x.astype(np.float64)
    silu = x64 / (1 + np.exp(-x64))
    for got, want in ((testing.silu_mul(tier, x, m), silu * m), (testing.silu_mul(tier, x, None, 0.75), silu * 0.75)):
        assert got.shape == (n,)
        np.testing.assert_allclose(got, want, rtol=8 * 2.0**-23, atol=1e-30)
    if n > 3:
        tail = testing.silu_mul(tier, x[n // 2:].copy(), m[n // 2:].copy())  # elements move between vector and tail
        np.testing.assert_array_equal(tail, testing.silu_mul(tier, x, m)[n // 2:])
        odd = np.array([np.inf, -np.inf, np.nan], np.float32)
        got = testing.silu_mul(tier, odd, None, 1.0)
        assert got[0] == np.inf and not np.isfinite(got[1]) and np.isnan(got[2])


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("n", [1, 7, 16, 31, 64, 100])
def test_f16_vector_kernels(tier, n):
    """f32 -> f16 rows are bit-exact with numpy (nearest even)."""
    r = rng(40 + n)
    x = (r.standard_normal(n) * 3).astype(np.float32)
    half = np.array(testing.f32_to_f16(tier, x), dtype=np.uint16)
    np.testing.assert_array_equal(half, x.astype(np.float16).view(np.uint16))


# ---- packed weights (load-time repacking, kernels.h packed_size/pack/matmul_packed) ---------------------------------

PACKING_TIERS = [t for t in TIERS if testing.pack_rows(t) > 0]


@pytest.mark.parametrize("tier", PACKING_TIERS)
@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_packed_matmul_equals_unpacked(tier, qt):
    """The packed kernel reads the same bytes in the same summation order as the tier's unpacked kernel: bit-exact,
    for N not a multiple of the row group, T = 1..64, and row ranges [r0, r1) at group boundaries."""
    rg = testing.pack_rows(tier)
    for N, K in [(37, 576), (16, 32), (1, 64), (129, 160), (50, 2304)]:  # K = 2304: two K chunks
        data, _ = weights(qt, N, K, seed=N + 3)
        G = (N + rg - 1) // rg
        size = testing.packed_size(tier, int(qt), N, K)
        assert size >= len(data) and size % 64 == 0 and size == G * (size // G)
        xall = rng(K + 1).standard_normal((64, K)).astype(np.float32)
        for T in T_VALUES:
            x = np.ascontiguousarray(xall[:T])
            y = testing.matmul(tier, int(qt), data, N, x)
            np.testing.assert_array_equal(testing.matmul_packed(tier, int(qt), data, N, x), y)
            for r0, r1 in [(0, min(N, rg)), (rg * (G // 2), N), (rg, min(N, 3 * rg))]:
                if r0 >= r1:
                    continue
                yp = testing.matmul_packed(tier, int(qt), data, N, x, r0, r1)
                np.testing.assert_array_equal(yp[:, r0:r1], y[:, r0:r1])
                assert not yp[:, :r0].any() and not yp[:, r1:].any()


@pytest.mark.parametrize("tier", PACKING_TIERS)
def test_packed_layout(tier):
    """Spot-check the documented layout (kernels/pack.c): group 0, block 0: dword j of row l at (j*rg + l)*4, then
    the f16 scales in lane order after all quants; rows past N are zero."""
    rg = testing.pack_rows(tier)
    N, K = rg + 3, 64
    data, _ = weights(QT.Q4_0, N, K, seed=5)
    raw = np.frombuffer(data, np.uint8).reshape(N, K // 32, 18)
    packed = np.frombuffer(testing.pack(tier, int(QT.Q4_0), data, N, K), np.uint8)
    gbytes = len(packed) // 2
    q = packed[: 2 * 4 * rg * 4].reshape(2, 4, rg, 4)  # [block, j, lane, byte]
    np.testing.assert_array_equal(q[0, :, :, :].transpose(1, 0, 2).reshape(rg, 16), raw[:rg, 0, 2:])
    d = packed[2 * 4 * rg * 4:].view(np.uint16)[: 2 * rg].reshape(2, rg)
    np.testing.assert_array_equal(d[1], raw[:rg, 1, :2].copy().view(np.uint16)[:, 0])
    g1 = packed[gbytes:].reshape(-1)
    q1 = g1[: 2 * 4 * rg * 4].reshape(2, 4, rg, 4)
    assert not q1[:, :, 3:, :].any()
    np.testing.assert_array_equal(q1[0, :, :3, :].transpose(1, 0, 2).reshape(3, 16), raw[rg:, 0, 2:])


def test_non_packing_tiers_report_zero():
    for tier in TIERS:
        if testing.pack_rows(tier) == 0:
            assert testing.packed_size(tier, int(QT.Q4_0), 16, 32) == 0


def test_attention_timing_hook():
    """testing.attn_time (bench_kernels' attention rows): positive seconds per repeat for each tier; bad shapes are
    refused with a clear error."""
    for tier in TIERS:
        s = testing.attn_time(tier, 3, 4, 40, 64, 3)
        assert len(s) == 3 and all(0 < x < 1 for x in s)
    for bad in ((0, 1, 10, 64), (3, 0, 10, 64), (3, 1, -1, 64), (3, 1, 10, 0)):
        with pytest.raises(_sparrow.SparrowError, match="attn_time"):
            testing.attn_time("ref", *bad, 2)
