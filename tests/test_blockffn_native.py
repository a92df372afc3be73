"""BlockFFN in the native runtime: logits against the numpy references, the three FFN paths against each other, the
sparsity statistics, the accum kernels, and files whose metadata lies.

Shape legend: T = tokens, H = hidden, E = experts, F = expert width, L = layers.

Tolerances (NMSE = mean squared error / variance of the reference), a few times above what the ref, avx2 and avx512
tiers measure:
- F32 files vs BlockFFNRef (the HF checkpoint in float64): activations stay float32, the router runs in float32, the
  KV cache (and q, for the scores) are F16 as in llama.cpp: NMSE < 5e-8 (measured 0.8-1.7e-8; 1.3e-7 on the file
  of the paths test, bound 5e-7 there; incremental decode 5.9e-9, bound 2e-8). F16 files vs BlockFFNGGUFRef (same
  dequantized weights): NMSE < 5e-8 (measured 1.0e-8).
- Q8_0 / Q4_0 files vs BlockFFNGGUFRef: activations are quantized to 8 bits per 32-element block: NMSE < 2e-4
  (measured 5.7e-5 / 4.6e-5, that quantization itself; Q4_0 6.4e-5 with the int8 down path, whose coefficients are
  quantized too: kernels.h accum_packed_i8).
- Every file vs BlockFFNGGUFRef rounding as the runtime does (runtime_rounding: 8-bit activation blocks, F16 q/k/v,
  the int8 down path's coefficients where the runtime takes it):
  float32 arithmetic is all that is left: NMSE < 1e-12 for Q8_0 / Q4_0 (measured 0.9-1.4e-15), < 1e-9 for F16
  (measured <= 5e-11). A chunk path that dropped the experts used by a single token of a batch measured 1.3e-4 (Q8_0)
  against this reference and 9e-5 (F16): within the first bound for Q8_0, caught here.
- dense / sparse-token / sparse-chunk paths on the same file: they differ only in float summation order (which
  thread's partial a product lands in; a dense path adds exact zeros): max |difference| <= 1e-5 * max |y|.
- SIMD accum kernels vs accum_ref: FMA rounding only: |difference| <= 1e-5 * (|y| + sum_f |c D|) elementwise; the
  int8 down path (accum_packed_i8) within kernels.h's bound of accum_ref plus that, and within 1e-6 of the same sum of
  its numpy spec (accum_i8_numpy).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from blockffn_fixture import FixtureConfig, write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference.blockffn import BlockFFNGGUFRef, BlockFFNRef, cls, silu, tls
from sparrow.converters.blockffn import convert
from sparrow.runtime import Model, SparrowError, _sparrow
from sparrow.runtime.native import FFN_MODES

Q = gguf.GGMLQuantizationType
TOKENS = [1, 5, 100, 260, 261, 7, 42, 270, 3, 99, 150, 200, 33, 17, 400, 401, 12, 9, 77, 78]
MODES = ["dense", "token", "chunk"]
testing = _sparrow.testing


I8_TIERS = ("avx2", "avx512", "amx")  # the tiers with kernels.h accum_packed_i8 (x86/avx2.c, x86/avx512.c; amx: avx512's)


def runtime_down_i8() -> bool:
    """Whether models loaded here read Q4_0 experts' down rows through the int8 down path (kernels.h accum_packed_i8,
    unless SPARROW_EXPERT_DOWN_INT8=0), which runtime_rounding references then mirror."""
    return _sparrow.kernel_tier() in I8_TIERS and os.environ.get("SPARROW_EXPERT_DOWN_INT8", "1") != "0"


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((a - ref) ** 2) / np.var(ref))


def build(tmp: Path, cfg: FixtureConfig, qtype: str = "f32", **kw) -> tuple[Path, Path]:
    """A checkpoint folder and its GGUF conversion."""
    folder = write_checkpoint(tmp / "ckpt", cfg, **kw)
    return folder, convert(folder, tmp / f"m-{qtype}.gguf", qtype, progress=False)


# ---- logits against the references ----

@pytest.mark.parametrize("ffn_type", ["block", "block_linear"])
@pytest.mark.parametrize("norm", ["rms", "sum", "none"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_f32_logits_match_hf_reference(tmp_path, ffn_type, norm, heads):
    cfg = FixtureConfig(ffn_type=ffn_type, norm_after_router=norm, num_attention_heads=heads[0],
                        num_key_value_heads=heads[1], norm_scale=1.3, tie_word_embeddings=heads == (4, 4))
    folder, path = build(tmp_path, cfg)
    ref, routers = BlockFFNRef.from_hf(folder).forward(TOKENS)
    assert 0.3 < tls(routers) < 0.95  # the fixture's routing really is sparse
    with Model(path) as m, m.session(n_ctx=64, n_threads=2) as s:
        assert m.info.architecture == "blockffn"
        ours = s.eval(TOKENS, logits="all")
    assert nmse(ours, ref) < 5e-8


@pytest.mark.parametrize("qtype,bound,rounded_bound", [("f16", 5e-8, 1e-9), ("q8_0", 2e-4, 1e-12),
                                                       ("q4_0", 2e-4, 1e-12)])
@pytest.mark.parametrize("ffn_type", ["block", "block_linear"])
def test_quantized_logits_match_gguf_reference(tmp_path, qtype, bound, rounded_bound, ffn_type):
    cfg = FixtureConfig(ffn_type=ffn_type, norm_after_router="rms", seed=3)
    _, path = build(tmp_path, cfg, qtype)
    ref, _ = BlockFFNGGUFRef.from_gguf(path).forward(TOKENS)
    rounded, _ = BlockFFNGGUFRef.from_gguf(path, runtime_rounding=True, down_i8=runtime_down_i8()).forward(TOKENS)
    for mode in MODES:
        with Model(path) as m, m.session(n_ctx=64, n_threads=2, ffn_mode=mode) as s:
            ours = s.eval(TOKENS, logits="all")
        err, err_rounded = nmse(ours, ref), nmse(ours, rounded)
        print(f"{qtype} {ffn_type} {mode}: nmse {err:.2e}, {err_rounded:.2e} with the runtime's rounding")
        assert err < bound, mode
        assert err_rounded < rounded_bound, (mode, "only float32 arithmetic should be left")


def test_incremental_decode_matches_reference(tmp_path):
    """Batches of 1..7 tokens over a growing KV cache give the logits of one causal pass."""
    _, path = build(tmp_path, FixtureConfig(seed=5))
    ref, _ = BlockFFNGGUFRef.from_gguf(path).forward(TOKENS)
    with Model(path) as m, m.session(n_ctx=64, n_threads=2) as s:
        rows, i, n = [], 0, 1
        while i < len(TOKENS):
            rows.append(s.eval(TOKENS[i:i + n], logits="all"))
            i, n = i + n, n % 7 + 1
    assert nmse(np.concatenate(rows), ref) < 2e-8


# ---- the three paths agree ----

@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
@pytest.mark.parametrize("lean", [0.2, -1.0, "zero"], ids=["sparse", "all-active", "none-active"])
def test_paths_agree_end_to_end(tmp_path, qtype, lean):
    """Router weights forcing all experts on (lean < 0) or all off (zero router): every path gives the same logits."""
    cfg = FixtureConfig(router_lean=0.2 if lean == "zero" else lean, seed=7)
    replace = None
    if lean == "zero":
        replace = {f"model.layers.{l}.mlp.router_proj.weight": np.zeros((cfg.num_experts, cfg.hidden_size))
                   for l in range(cfg.num_hidden_layers)}
    folder, path = build(tmp_path, cfg, qtype, replace=replace)
    outs, stats = {}, {}
    for mode in MODES:
        for threads in (1, 3):
            with Model(path) as m, m.session(n_ctx=64, n_threads=threads, ffn_mode=mode) as s:
                outs[mode, threads] = s.eval(TOKENS, logits="all")
                stats[mode] = s.sparsity()
    base = outs["dense", 1]
    for key, out in outs.items():
        assert np.max(np.abs(out - base)) <= 1e-5 * np.max(np.abs(base)), key
    if lean == "zero":
        assert stats["chunk"].tls == 1.0 and stats["chunk"].expert_bytes_per_token == 0
    if lean == -1.0:
        assert stats["chunk"].tls == 0.0
    if qtype == "f32":
        ref, _ = BlockFFNRef.from_hf(folder).forward(TOKENS)
        assert nmse(base, ref) < 5e-7


@pytest.fixture(scope="module")
def hook_models(tmp_path_factory):
    """An F32 and a Q4_0 file of one checkpoint with 12 experts of width 48 (not a multiple of the 16-row slices)."""
    tmp = tmp_path_factory.mktemp("hook")
    cfg = FixtureConfig(num_experts=12, expert_size=48, hidden_size=64, num_hidden_layers=1, seed=11)
    folder = write_checkpoint(tmp / "ckpt", cfg)
    return {q: convert(folder, tmp / f"{q}.gguf", q, progress=False) for q in ("f32", "q4_0")}


def ffn_numpy(path: Path, xn: np.ndarray, r: np.ndarray) -> np.ndarray:
    """y [T, H] = sum_e r[:, e] * silu(x U_e^T) D_e^T in float64 from the file's slabs."""
    ref = BlockFFNGGUFRef.from_gguf(path)
    F = ref.meta["expert_width"]
    slabs = ref.weights["blk.0.ffn_experts.weight"]  # [E, 2F, H]
    y = np.zeros(xn.shape)
    for e in range(slabs.shape[0]):
        y += r[:, e:e + 1] * (silu(xn @ slabs[e, :F].T) @ slabs[e, F:])
    return y


def routing(kind: str, T: int, E: int, rng: np.random.Generator) -> np.ndarray:
    """Router scores [T, E] (float32) with a chosen activation pattern; inactive entries exactly 0."""
    r = rng.uniform(0.1, 2.0, (T, E)) * rng.choice([-1, 1], (T, E), p=[0.1, 0.9])
    if kind == "none":
        return np.zeros((T, E), np.float32)
    if kind == "one":
        keep = np.zeros((T, E), bool)
        keep[:, rng.integers(E)] = True
    elif kind == "all":
        keep = np.ones((T, E), bool)
    else:  # random density per batch, including tokens with no expert
        keep = rng.random((T, E)) < rng.uniform(0.0, 0.6)
    return np.where(keep, r, 0.0).astype(np.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 64), kind=st.sampled_from(["none", "one", "all", "random"]), threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_paths_agree_on_controlled_routing(hook_models, T, kind, threads, seed):
    """The FFN block alone, with router scores set directly: every path equals the float64 sum (F32 file) and the
    paths agree with each other (Q4_0 file)."""
    rng = np.random.default_rng(seed)
    for qtype, path in hook_models.items():
        with Model(path) as m, m.session(n_ctx=8, n_batch=64, n_threads=threads) as s:
            H, E = m.info.n_embd, 12
            xn = rng.standard_normal((T, H)).astype(np.float32)
            r = routing(kind, T, E, rng)
            ys = {mode: testing.ffn_run(s.handle, 0, xn, r, FFN_MODES[mode]) for mode in MODES}
        scale = max(np.max(np.abs(ys["dense"])), 1e-30)
        for mode in MODES:
            assert np.max(np.abs(ys[mode] - ys["dense"])) <= 1e-5 * scale, (qtype, mode)
        if kind == "none":
            assert not np.any(ys["chunk"])
        if qtype == "f32":
            want = ffn_numpy(path, xn.astype(np.float64), r.astype(np.float64))
            assert np.max(np.abs(ys["chunk"] - want)) <= 1e-5 * max(np.max(np.abs(want)), 1e-30)


def test_hook_router_matches_forward_scores(hook_models):
    """With r=None the hook computes the router itself: same output as passing the reference's scores."""
    path = hook_models["f32"]
    rng = np.random.default_rng(0)
    with Model(path) as m, m.session(n_ctx=8, n_threads=2) as s:
        xn = rng.standard_normal((9, m.info.n_embd)).astype(np.float32)
        ref = BlockFFNGGUFRef.from_gguf(path)
        y_ref, _ = ref.ffn(xn.astype(np.float64), "blk.0.")
        y = testing.ffn_run(s.handle, 0, xn, None, FFN_MODES["auto"])
    assert np.max(np.abs(y - y_ref)) <= 1e-5 * np.max(np.abs(y_ref))


# ---- sparsity statistics ----

def test_stats_match_reference_router_scores(tmp_path):
    cfg = FixtureConfig(num_experts=16, seed=2)
    _, path = build(tmp_path, cfg, "q8_0")
    tokens = (TOKENS * 3)[:53]
    _, routers = BlockFFNGGUFRef.from_gguf(path).forward(tokens)  # [L, T, E]
    slab = 2 * cfg.expert_size * (cfg.hidden_size // 32 * 34)
    with Model(path) as m:
        # chunk path, tokens fed in batches of 5 (CLS chunks span eval calls)
        with m.session(n_ctx=64, n_threads=2, ffn_mode="chunk") as s:
            batches = [tokens[i:i + 5] for i in range(0, len(tokens), 5)]
            for b in batches:
                s.eval(b, logits="none")
            st_all = s.sparsity()
            assert st_all.n_tokens == len(tokens) and st_all.n_expert == 16
            assert st_all.tls == pytest.approx(tls(routers), abs=1e-12)
            for k in range(2, 17):
                assert st_all.cls[k] == pytest.approx(cls(routers, k), abs=1e-12, nan_ok=True), k
            for layer in range(cfg.num_hidden_layers):
                st_l = s.sparsity(layer)
                assert st_l.tls == pytest.approx(tls(routers[layer]), abs=1e-12)
                assert st_l.cls[8] == pytest.approx(cls(routers[layer], 8), abs=1e-12)
            union = sum(int(np.any(routers[l, i:i + 5] != 0, axis=0).sum()) for l in range(cfg.num_hidden_layers)
                        for i in range(0, len(tokens), 5))
            assert st_all.expert_bytes_per_token == pytest.approx(union * slab / len(tokens))
            assert st_all.dense_bytes_per_token == cfg.num_hidden_layers * cfg.num_experts * slab
            s.reset_sparsity()
            assert s.sparsity().n_tokens == 0 and math.isnan(s.sparsity().tls)
        # token path reads one slab per active (token, expert) pair
        with m.session(n_ctx=64, n_threads=1, ffn_mode="token") as s:
            s.eval(tokens, logits="none")
            active = int(np.count_nonzero(routers))
            assert s.sparsity().expert_bytes_per_token == pytest.approx(active * slab / len(tokens))


def test_dense_model_has_no_sparsity_stats(tmp_path):
    from tiny_llama import TinyConfig, write_tiny_llama

    path = write_tiny_llama(tmp_path / "l.gguf", TinyConfig())
    with Model(path) as m, m.session(n_ctx=16) as s:
        assert s.sparsity() is None


def test_bad_ffn_mode_is_rejected(tmp_path):
    _, path = build(tmp_path, FixtureConfig())
    with Model(path) as m:
        with pytest.raises(ValueError, match="ffn_mode"):
            m.session(ffn_mode="fast")
        with pytest.raises(SparrowError, match="ffn_mode"):
            _sparrow.Session(m._m, 16, 8, 1, 9)


# ---- accum kernels: every tier equals ref ----

ACCUM_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


@pytest.mark.parametrize("wtype", ACCUM_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("T,F,H", [(1, 16, 64), (3, 5, 96), (8, 48, 256), (13, 7, 2048), (64, 32, 128)])
@pytest.mark.parametrize("scatter", [False, True])
def test_accum_tiers_match_ref(wtype, T, F, H, scatter):
    rng = np.random.default_rng(T * 1000 + F + H)
    d = rng.standard_normal((F, H)).astype(np.float32)
    raw = b"".join(testing.quantize(int(wtype), row) for row in d)
    ldc = F + 3
    c = rng.standard_normal((T, ldc)).astype(np.float32)
    rows = T + 5 if scatter else T
    y = rng.standard_normal((rows, H)).astype(np.float32)
    idx = list(rng.permutation(rows)[:T].astype(np.int32)) if scatter else []
    ref = testing.accum("ref", int(wtype), raw, F, H, c, y, idx)
    deq = np.stack([testing.dequantize(int(wtype), testing.quantize(int(wtype), row), H) for row in d])
    want = y.astype(np.float64).copy()
    want[idx if scatter else slice(0, T)] += c[:, :F].astype(np.float64) @ deq
    mag = np.abs(y) + 0.0
    mag[idx if scatter else slice(0, T)] += np.abs(c[:, :F]) @ np.abs(deq)
    assert np.all(np.abs(ref - want) <= 1e-5 * mag + 1e-30)
    for tier in testing.tiers():
        got = testing.accum(tier, int(wtype), raw, F, H, c, y, idx)
        assert np.all(np.abs(got - ref) <= 1e-5 * mag + 1e-30), tier


@pytest.mark.parametrize("T,F,H,f0,f1", [(1, 16, 64, 0, 16), (1, 128, 1280, 64, 128), (1, 40, 96, 16, 40),
                                         (3, 40, 96, 16, 40), (8, 48, 256, 0, 48), (13, 7, 2048, 0, 7),
                                         (20, 64, 128, 32, 48)])
@pytest.mark.parametrize("scatter", [False, True])
def test_accum_packed_down_matches_ref(T, F, H, f0, f1, scatter):
    """The "down" streaming layout (kernels.h pack_down / accum_packed), where a tier has it: equals ref's accum
    over the same row range within accum's bound."""
    rng = np.random.default_rng(T * 1000 + F + H + f0)
    d = rng.standard_normal((F, H)).astype(np.float32)
    raw = b"".join(testing.quantize(int(Q.Q4_0), row) for row in d)
    ldc = F + 3
    c = rng.standard_normal((T, ldc)).astype(np.float32)
    rows = T + 5 if scatter else T
    y = rng.standard_normal((rows, H)).astype(np.float32)
    idx = list(rng.permutation(rows)[:T].astype(np.int32)) if scatter else []
    raw_rows = raw[f0 * (H // 32) * 18:f1 * (H // 32) * 18]
    ref = testing.accum("ref", int(Q.Q4_0), raw_rows, f1 - f0, H, np.ascontiguousarray(c[:, f0:]), y, idx)
    deq = np.stack([testing.dequantize(int(Q.Q4_0), testing.quantize(int(Q.Q4_0), row), H) for row in d])
    mag = np.abs(y) + 0.0
    mag[idx if scatter else slice(0, T)] += np.abs(c[:, f0:f1]) @ np.abs(deq[f0:f1])
    ran = 0
    for tier in testing.tiers():
        try:
            got = testing.accum_packed(tier, int(Q.Q4_0), raw, F, H, c, y, idx, f0, f1)
        except SparrowError as e:
            assert "UNSUPPORTED" in str(e)
            continue
        ran += 1
        assert np.all(np.abs(got - ref) <= 1e-5 * mag + 1e-30), tier
    if "avx512" in testing.tiers():
        assert ran


def accum_i8_numpy(raw: bytes, F: int, H: int, c: np.ndarray, y: np.ndarray, idx: list, f0: int, f1: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """kernels.h accum_packed_i8 as numpy (the executable spec): y [R, H] after the call, and its bound over ref's
    accum. Per token, 16-row group and column block: a = c d (float32), s = max |a| / 127, q = rint(a * (127 / max)),
    y += float32(sum q (w - 8)) * s, one rounding per group, groups in order."""
    nb = H // 32
    blocks = np.frombuffer(raw, np.uint8).reshape(F, nb, 18)
    d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)               # [F, nb]
    qs = blocks[:, :, 2:].astype(np.int32)
    w8 = np.concatenate([qs & 15, qs >> 4], axis=2) - 8                                    # [F, nb, 32]: q - 8
    out, bound = y.copy(), np.zeros(y.shape)
    rows = idx if idx else list(range(c.shape[0]))
    for t, row in enumerate(rows):
        for g in range(f0, f1, 16):
            r = slice(g, min(g + 16, f1))
            a = c[t, r, None].astype(np.float32) * d[r]                                     # [16, nb]
            mx = np.abs(a).max(axis=0)
            live = mx >= np.float32(2.0 ** -100)
            inv = np.where(live, np.float32(127) / np.where(live, mx, 1), 0).astype(np.float32)
            q = np.rint(a * inv).astype(np.int64)
            s = np.where(live, mx / np.float32(127), 0).astype(np.float32)
            isum = np.einsum("fb,fbj->bj", q, w8[r]).astype(np.float32)                      # exact: |isum| < 2^24
            out[row] = (out[row].reshape(nb, 32) + isum * s[:, None]).reshape(H).astype(np.float32)
            bound[row] += (mx[:, None].astype(np.float64) / 254 * np.abs(w8[r]).sum(axis=0)).reshape(H)
    return out, bound


@pytest.mark.parametrize("T,F,H,f0,f1", [(1, 16, 64, 0, 16), (1, 128, 1280, 64, 128), (1, 40, 96, 16, 40),
                                         (3, 40, 96, 16, 40), (8, 48, 256, 0, 48), (13, 7, 2048, 0, 7),
                                         (20, 64, 128, 32, 48), (9, 32, 2304, 0, 32)])
@pytest.mark.parametrize("scatter", [False, True])
def test_accum_packed_i8_matches_its_spec_and_ref_within_the_bound(T, F, H, f0, f1, scatter):
    """The int8 down path (kernels.h accum_packed_i8), where a tier has it: equal to its numpy spec up to float32
    summation rounding (one FMA per group instead of numpy's add of a rounded product), and within the stated bound of
    ref's exact float accum. The bound is not loose: the largest error measured here is a sizeable part of it. The
    tiers that have it give the same bits (the same integer sums and one FMA per element and group)."""
    rng = np.random.default_rng(T * 1000 + F + H + f0 + 7)
    d = rng.standard_normal((F, H)).astype(np.float32)
    raw = b"".join(testing.quantize(int(Q.Q4_0), row) for row in d)
    ldc = F + 3
    c = rng.standard_normal((T, ldc)).astype(np.float32)
    rows = T + 5 if scatter else T
    y = rng.standard_normal((rows, H)).astype(np.float32)
    idx = list(rng.permutation(rows)[:T].astype(np.int32)) if scatter else []
    raw_rows = raw[f0 * (H // 32) * 18:f1 * (H // 32) * 18]
    ref = testing.accum("ref", int(Q.Q4_0), raw_rows, f1 - f0, H, np.ascontiguousarray(c[:, f0:]), y, idx)
    spec, bound = accum_i8_numpy(raw, F, H, c, y, idx, f0, f1)
    deq = np.stack([testing.dequantize(int(Q.Q4_0), testing.quantize(int(Q.Q4_0), row), H) for row in d])
    mag = np.abs(y) + 0.0
    mag[idx if scatter else slice(0, T)] += np.abs(c[:, f0:f1]) @ np.abs(deq[f0:f1])
    assert np.all(np.abs(spec - ref) <= bound + 1e-5 * mag)
    outs = {}
    for tier in testing.tiers():
        try:
            got = testing.accum_packed(tier, int(Q.Q4_0), raw, F, H, c, y, idx, f0, f1, i8=True)
        except SparrowError as e:
            assert "UNSUPPORTED" in str(e) and tier not in I8_TIERS
            continue
        outs[tier] = got
        assert np.all(np.abs(got - spec) <= 1e-6 * mag), tier
        err = np.abs(got - ref)
        assert np.all(err <= bound + 1e-5 * mag), tier
        assert np.max(err / (bound + 1e-30)) > 0.05, tier  # quantized: not the float path by mistake
    assert set(outs) == set(I8_TIERS) & set(testing.tiers())
    for got in outs.values():
        np.testing.assert_array_equal(got, next(iter(outs.values())))


def test_accum_packed_i8_zero_tiny_and_nonfinite_activations():
    """A group of zero coefficients adds exactly nothing (the dense path's unused experts), one below 2^-100 counts as
    zero, and a NaN or infinite coefficient makes its columns NaN instead of a finite guess."""
    tiers = [t for t in I8_TIERS if t in testing.tiers()]
    if not tiers:
        pytest.skip("no tier with the int8 down path on this CPU")
    rng = np.random.default_rng(3)
    F, H = 32, 96
    raw = b"".join(testing.quantize(int(Q.Q4_0), row) for row in rng.standard_normal((F, H)).astype(np.float32))
    y = rng.standard_normal((3, H)).astype(np.float32)
    c = np.zeros((3, F), np.float32)
    c[1, :16] = 1e-35
    c[2, 3] = np.nan
    c[2, 20] = 1.0
    for tier in tiers:
        c[2, 3] = np.nan
        got = testing.accum_packed(tier, int(Q.Q4_0), raw, F, H, c, y, i8=True)
        np.testing.assert_array_equal(got[0], y[0])
        np.testing.assert_array_equal(got[1], y[1])
        assert np.all(np.isnan(got[2])), tier
        c[2, 3] = np.inf
        assert np.all(np.isnan(testing.accum_packed(tier, int(Q.Q4_0), raw, F, H, c, y, i8=True)[2])), tier


@pytest.mark.parametrize("wtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_accum_float_rows_not_multiple_of_32(wtype):
    rng = np.random.default_rng(1)
    F, H, T = 6, 45, 4
    d = rng.standard_normal((F, H)).astype(np.float32)
    raw = b"".join(testing.quantize(int(wtype), row) for row in d)
    c = rng.standard_normal((T, F)).astype(np.float32)
    y = np.zeros((T, H), np.float32)
    ref = testing.accum("ref", int(wtype), raw, F, H, c, y)
    for tier in testing.tiers():
        np.testing.assert_allclose(testing.accum(tier, int(wtype), raw, F, H, c, y), ref, rtol=1e-5, atol=1e-5)


# ---- files whose metadata lies ----

def rewrite(src: Path, dst: Path, overrides: dict | None = None, drop: tuple[str, ...] = (),
            drop_keys: tuple[str, ...] = ()) -> Path:
    """Copy an F32 GGUF, changing metadata values (same value type) and leaving out tensors or keys."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), str(r.fields["general.architecture"].contents()))
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, (overrides or {}).get(key, field.contents()), vtype, sub)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


LIES = [
    ({"overrides": {"blockffn.expert_count": 4}}, "expert_count x expert_width"),
    ({"overrides": {"blockffn.expert_count": 4, "blockffn.feed_forward_length": 64}}, "ffn_router.weight.*shape"),
    ({"overrides": {"blockffn.expert_width": 8, "blockffn.feed_forward_length": 64}}, "ffn_experts.weight.*shape"),
    ({"overrides": {"blockffn.feed_forward_length": 100}}, "feed_forward_length 100"),
    ({"overrides": {"blockffn.router_norm": "softmax"}}, "router_norm 'softmax'"),
    ({"overrides": {"blockffn.router_norm": "sum"}}, "ffn_router_norm.weight' is present"),
    ({"overrides": {"blockffn.router_activation": "gelu"}}, "router_activation"),
    ({"overrides": {"blockffn.expert_activation": "gelu"}}, "expert_activation"),
    ({"overrides": {"blockffn.block_count": 1}}, "block_count is 1"),
    ({"overrides": {"blockffn.rope.dimension_count": 8}}, "dimension_count"),
    ({"overrides": {"blockffn.vocab_size": 1000}}, "vocab_size"),
    ({"drop": ("blk.1.ffn_experts.weight",)}, "blk.1.ffn_experts.weight' is missing"),
    ({"drop": ("blk.0.ffn_router_norm.weight",)}, "blk.0.ffn_router_norm.weight' is missing"),
    ({"drop_keys": ("blockffn.residual_scale",)}, "residual_scale"),
    ({"drop_keys": ("blockffn.expert_count",)}, "expert_count"),
]


@pytest.fixture(scope="module")
def honest_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lies")
    folder = write_checkpoint(tmp / "ckpt", FixtureConfig())
    return convert(folder, tmp / "m.gguf", "f32", progress=False)


@pytest.mark.parametrize("kwargs,message", LIES, ids=[str(k) for k, _ in LIES])
def test_metadata_that_lies_is_rejected(honest_file, tmp_path, kwargs, message):
    path = rewrite(honest_file, tmp_path / "lie.gguf", **kwargs)
    with pytest.raises(SparrowError, match=message):
        Model(path)


def test_unexpected_tensor_is_rejected(honest_file, tmp_path):
    r = gguf.GGUFReader(str(honest_file))
    path = rewrite(honest_file, tmp_path / "x.gguf")
    assert Model(path).info.n_layer == 2  # the rewrite itself is faithful
    w = gguf.GGUFWriter(str(tmp_path / "extra.gguf"), "blockffn")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        w.add_key_value(key, field.contents(), vtype,
                        gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor("blk.0.ffn_gate.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SparrowError, match="unexpected tensors"):
        Model(tmp_path / "extra.gguf")
