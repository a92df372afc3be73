"""Synthetic BlockFFN configurations: the random-weight GGUF writer (bench_device/synthetic.py) and the native
synthetic-routing switch (native/src/routing_synth.c): stated TLS/CLS measured back by the session's own counters,
sparse execution equal to dense under it, routing keyed by position (alone = in a chunk = as a tree node), and the
numpy oracle tests/reference/synthetic_routing.py. Tiny shapes only: each test runs in well under a second."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reference import synthetic_routing as oracle
from sparrow.bench_device import phases
from sparrow.bench_device import synthetic as sy
from sparrow.runtime import Model, _sparrow

testing = _sparrow.testing
SparrowError = _sparrow.SparrowError
# E = 56 experts as the released 1.2B, at a tiny H so the file takes milliseconds
T56 = sy.Shape("t56", 64, 2, 2, 2, 56, 32, vocab=300, context=512, source="test shape")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = sy.ensure(T56, "Q4_0", seed=3, cache=tmp_path_factory.mktemp("synth"), progress=False)
    with Model(path) as m:
        yield m


def session(m, mode="chunk", **synth):
    s = m.session(n_ctx=256, n_batch=64, n_threads=2, ffn_mode=mode)
    s.set_synthetic_routing(**({"tls": 0.8, "cls": 0.7, "k": 8, "seed": 5} | synth))
    return s


def each_node_as_a_chain(m, mode: str, prefix: list[int], toks: list[int], parents: list[int]) -> np.ndarray:
    """Logits [N, V] of every node of a tree computed independently of the tree: node i's root path (its ancestors,
    then itself) evaluated as a plain causal chain after the prefix, in a fresh session; the last row is node i's."""
    rows = []
    for i in range(len(toks)):
        path, j = [], i
        while j >= 0:
            path.append(toks[j])
            j = parents[j]
        with session(m, mode) as s:
            s.eval(prefix, logits="none")
            rows.append(s.eval(path[::-1], logits="last"))
    return np.stack(rows)


def test_writer_follows_the_layout_and_caches(tmp_path):
    p = sy.ensure("tiny", "Q8_0", seed=1, cache=tmp_path, progress=False)
    mtime = p.stat().st_mtime_ns
    assert sy.ensure("tiny", "Q8_0", seed=1, cache=tmp_path, progress=False) == p and p.stat().st_mtime_ns == mtime
    assert sy.ensure("tiny", "Q8_0", seed=2, cache=tmp_path, progress=False) != p  # another seed, another file
    shape = sy.SHAPES["tiny"]
    with Model(p) as m:
        i = m.info
        assert (i.architecture, i.n_embd, i.n_layer, i.n_head, i.n_head_kv, i.n_vocab) == (
            "blockffn", shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.vocab)
        assert i.n_ff == shape.experts * shape.expert_width
        norms = shape.layers * (2 * shape.hidden + shape.experts + shape.q_lora + shape.kv_lora) + shape.hidden
        assert i.n_params == sum(shape.n_params().values()) + norms
        with m.session(n_ctx=64, n_threads=1) as s:
            assert np.isfinite(s.eval(list(range(3, 40)), logits="all")).all()


def test_released_shapes():
    for name, (H, L, NH, E, F) in {"0.1b": (768, 16, 6, 48, 64), "0.5b": (1280, 27, 10, 40, 128),
                                   "0.8b": (1536, 32, 12, 48, 128), "1.2b": (1792, 35, 14, 56, 128)}.items():
        s = sy.SHAPES[name]
        assert (s.hidden, s.layers, s.heads, s.experts, s.expert_width, s.head_dim) == (H, L, NH, E, F, 128)
        assert s.experts * s.expert_width == 4 * s.hidden and s.vocab == sy.REAL_VOCAB
    assert sy.SHAPES["1.2b"].with_vocab("small").vocab == sy.SMALL_VOCAB
    for name, size in {"0.1b": 0.1e9, "0.5b": 0.5e9, "0.8b": 0.8e9, "1.2b": 1.2e9}.items():
        s = sy.SHAPES[name]
        assert (s.attention, s.q_lora, s.kv_lora, s.qk_nope, s.qk_rope) == ("mla", 768, 256, 128, 64)
        p = s.n_params()  # MLA as released: the non-embedding parameters are the size in the name
        assert abs(p["attention"] + p["experts"] + p["router"] - size) < 0.05 * size + 0.02e9
    # the figures for 1.2b: 22.4 KB of latent cache per token (F16), against 313.6 KB of full keys and values
    assert sy.SHAPES["1.2b"].kv_bytes_per_token() == {"cached": 22400, "full_k_v": 313600}


@pytest.mark.parametrize("tls,cls,k,seed", [(0.8, 0.7, 8, 5), (0.5, 0.2, 4, 0), (0.9, 0.9, 16, 7), (0.0, 0.0, 2, 1)])
def test_native_scores_match_the_oracle(model, tls, cls, k, seed):
    with session(model, tls=tls, cls=cls, k=k, seed=seed) as s:
        positions = list(range(40)) + [1000, 123457, 1 << 24]
        for layer in range(T56.layers):
            got = testing.synthetic_scores(s.handle, layer, positions)
            np.testing.assert_array_equal(got, oracle.scores(56, tls, cls, k, seed, layer, positions))


@pytest.mark.parametrize("tls,cls,k", [(0.8, 0.7, 8), (0.85, 0.6, 4), (0.7, 0.5, 16)])
def test_measured_sparsity_is_the_stated(model, tls, cls, k):
    with session(model, tls=tls, cls=cls, k=k) as s:
        eff = s.synthetic_routing()
        n = 0
        for T in (1, 7, 8, 13, 3, 32):  # counted across eval calls of any size
            s.eval(list(range(10 + n, 10 + n + T)), logits="none")
            n += T
        st = s.sparsity()
        assert st.n_tokens == n
        A, U = oracle.counts(56, tls, cls)
        assert (eff["n_active"], eff["n_union"]) == (A, U)
        assert st.tls == pytest.approx(1 - A / 56, abs=1e-12) == eff["tls"]
        assert st.cls[k] == pytest.approx(1 - U / 56, abs=1e-12) == eff["cls"]
        assert abs(st.tls - tls) <= 0.5 / 56 + 1e-12 and abs(st.cls[k] - cls) <= 0.5 / 56 + 1e-12
        # the union grows with the chunk: fewer positions than k use fewer experts, more use more
        assert st.cls[2] > st.cls[k] and (k == 16 or st.cls[16] < st.cls[k])


def test_sparse_paths_equal_dense(model):
    toks = [5, 77, 12, 250, 31, 9, 140, 66, 3, 199, 45, 18]
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 8]  # a tree of 12 nodes
    depth = [0] * 12
    mask = np.zeros((12, 12), np.uint8)
    for i, p in enumerate(parents):
        mask[i] = mask[p] if p >= 0 else 0
        mask[i, i] = 1
        depth[i] = depth[p] + 1 if p >= 0 else 0
    out = {}
    for mode in ("dense", "token", "chunk"):
        with session(model, mode) as s:
            s.eval(list(range(20, 36)), logits="none")
            chain = s.eval(toks, logits="all")
            s.truncate(16)
            tree = s.eval(toks, pos=[16 + d for d in depth], mask=mask, logits="all")
            s.truncate(16)
            single = s.eval(toks[:1], logits="last")
            out[mode] = (chain, tree, single, s.sparsity().expert_bytes_per_token)
    for mode in ("token", "chunk"):
        for got, want in zip(out[mode][:3], out["dense"][:3]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # every node of the tree, not only the paths agreeing with each other: node i = its root path as a chain
    want = each_node_as_a_chain(model, "dense", list(range(20, 36)), toks, parents)
    np.testing.assert_allclose(out["chunk"][1], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # expert bytes read per token: the chunk path reads each expert of a batch's union once; the token path reads A
    # experts per token; dense all E once per batch
    assert out["chunk"][3] < min(out["token"][3], out["dense"][3])


def test_routing_is_keyed_by_position(model):
    toks = [40, 41, 42, 43, 44, 45, 46, 47, 48]
    with session(model) as a, session(model) as b, session(model) as c:
        for s in (a, b, c):
            s.eval(list(range(100, 108)), logits="none")  # the same 8-token prefix
        chunk = a.eval(toks, logits="all")
        chunk_r = testing.last_router_scores(a.handle, len(toks))
        alone, alone_r = [], []
        for t in toks:
            alone.append(b.eval([t], logits="last"))
            alone_r.append(testing.last_router_scores(b.handle, 1)[0])
        np.testing.assert_array_equal(np.stack(alone_r), chunk_r)
        np.testing.assert_allclose(np.stack(alone), chunk, rtol=1e-4, atol=1e-4 * np.abs(chunk).max())
        np.testing.assert_array_equal(chunk_r, testing.synthetic_scores(a.handle, T56.layers - 1, list(range(8, 17))))
        # a tree whose first branch is the chain: node i at depth d has position 8 + d
        parents = [-1, 0, 1, 2, 1, 4, 0, 6, 7]
        depth = [0, 1, 2, 3, 2, 3, 1, 2, 3]
        mask = np.zeros((9, 9), np.uint8)
        for i, p in enumerate(parents):
            mask[i] = mask[p] if p >= 0 else 0
            mask[i, i] = 1
        tree_toks = [toks[0], toks[1], toks[2], toks[3], 7, 8, 9, 10, 11]
        tree = c.eval(tree_toks, pos=[8 + d for d in depth], mask=mask, logits="all")
        tree_r = testing.last_router_scores(c.handle, 9)
        for i, d in enumerate(depth):
            np.testing.assert_array_equal(tree_r[i], chunk_r[d])
        np.testing.assert_allclose(tree[:4], chunk[:4], rtol=1e-4, atol=1e-4 * np.abs(chunk).max())
    # every node, the side branches too (a mask that let a node see its siblings kept the chain nodes right)
    want = each_node_as_a_chain(model, "chunk", list(range(100, 108)), tree_toks, parents)
    np.testing.assert_allclose(tree, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_off_restores_the_router_and_bad_arguments_fail_cleanly(model):
    with session(model) as s:
        before = s.synthetic_routing()
        for bad, msg in (({"tls": 1.5, "cls": 0.1}, "tls must be"), ({"tls": 0.5, "cls": -0.1}, "cls must be"),
                         ({"tls": 0.5, "cls": 0.7}, "must not exceed tls"), ({"tls": float("nan"), "cls": 0.1}, "tls"),
                         ({"tls": 0.8, "cls": 0.7, "k": 1}, "k must be")):
            with pytest.raises(SparrowError, match=msg):
                s.set_synthetic_routing(**bad)
        assert s.synthetic_routing() == before  # unchanged by the failed calls
        with pytest.raises(SparrowError, match="out of range"):
            testing.synthetic_scores(s.handle, T56.layers, [0])
        s.eval([1, 2, 3, 4], logits="none")
        synth = testing.last_router_scores(s.handle, 4)
        s.clear_synthetic_routing()
        assert s.synthetic_routing() is None
        with pytest.raises(SparrowError, match="off"):
            testing.synthetic_scores(s.handle, 0, [0])
        s.truncate(0)
        s.eval([1, 2, 3, 4], logits="none")
        assert not np.array_equal(testing.last_router_scores(s.handle, 4), synth)  # the random router's own routing


def test_tree_shapes_and_replayed_speculation(tmp_path, monkeypatch):
    from sparrow.bench_device import bench_synthetic as bs

    assert bs.tree_parents(6, (2, 2, 1)) == [-1, 0, 0, 1, 1, 2, 2]
    assert bs.tree_parents(3, (1,)) == [-1, 0, 1, 2]  # a chain
    depth, mask = bs.tree_layout([-1, 0, 0, 1])
    assert depth == [0, 1, 1, 2] and mask[3].tolist() == [1, 1, 0, 1]
    monkeypatch.setenv("SPARROW_SYNTH_CACHE", str(tmp_path))
    hist = {0: 5, 1: 3, 2: 2}
    r = bs.replayed_speculation("tiny", hist, 6, (2, 2, 1), repeats=1, draft_s_per_step=1e-4)
    assert r["label"] == "replayed" and r["synthetic"] and r["draft"]["T"] == 7
    assert r["tokens_per_step"] == pytest.approx((5 * 1 + 3 * 2 + 2 * 3) / 10)
    st = r["step_s"]
    assert r["tok_s"]["sparse_speculation"] == pytest.approx(
        r["tokens_per_step"] / (st["sparse_verify"]["median_s"] + 1e-4))
    assert r["tok_s"]["dense_decode"] == pytest.approx(1 / st["dense_decode"]["median_s"])
    with pytest.raises(ValueError, match="accepted lengths must be 0..2"):
        bs.replayed_speculation("tiny", {3: 1}, 6, (2, 2, 1))
    with pytest.raises(ValueError, match="accepted_hist"):
        bs.replayed_speculation("tiny", {}, 4)


def test_down_streaming_layout_equals_the_file_view_and_ffn_phases_are_timed(model, monkeypatch):
    """Experts' down halves repacked at load into the tier's float streaming layout (SPARROW_EXPERT_DOWN_INT8=0) give
    the logits of the file view (SPARROW_EXPERT_DOWN_PACK=0): the same sums, rounded in another order; in the int8 form
    (the default where the tier has one: kernels.h accum_packed_i8) they stay within the activation rounding's reach
    (logits NMSE < 2e-4, the bound of the 8-bit activations of the up half; measured 4.5e-5). And the BlockFFN phases
    of Session.timings() are filled in and lie within ffn_s."""
    toks = [5, 77, 12, 250, 31, 9, 140, 66]
    out = {}
    for flag in ("0", "1", "i8"):
        monkeypatch.setenv("SPARROW_EXPERT_DOWN_PACK", "0" if flag == "0" else "1")
        monkeypatch.setenv("SPARROW_EXPERT_DOWN_INT8", "1" if flag == "i8" else "0")
        with Model(model.path) as m:
            for mode in ("dense", "token", "chunk"):
                with session(m, mode) as s:
                    s.eval(list(range(20, 36)), logits="none")
                    out[(flag, mode)] = np.concatenate([s.eval(toks, logits="all"), s.eval([3], logits="last")[None]])
                    tm = s.timings()
                    parts = [tm.ffn_router_s, tm.ffn_plan_s, tm.ffn_experts_s, tm.ffn_reduce_s]
                    assert all(p > 0 for p in parts) and sum(parts) <= tm.ffn_s
                    assert 0 < tm.ffn_up_s + tm.ffn_down_s <= tm.ffn_experts_s
    for mode in ("dense", "token", "chunk"):
        want = out[("0", mode)]
        np.testing.assert_allclose(out[("1", mode)], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        err = np.mean((out[("i8", mode)] - want) ** 2) / np.var(want)
        print(f"{mode}: int8 down path vs file view, logits nmse {err:.1e}")
        assert err < 2e-4, mode


def test_one_thread_paths_are_bit_identical_with_the_down_streaming_layout(model):
    """With one thread the token, chunk and dense paths add each expert's terms in the same order whatever the batch
    (the prefix is a 16-token batch, decode steps single tokens): their logits are equal, not only close."""
    out = {}
    for mode in ("dense", "token", "chunk"):
        with model.session(n_ctx=256, n_batch=64, n_threads=1, ffn_mode=mode) as s:
            s.set_synthetic_routing(tls=0.8, cls=0.7, k=8, seed=5)
            s.eval(list(range(20, 36)), logits="none")
            out[mode] = np.stack([s.eval([t], logits="last") for t in (5, 77, 12, 250)])
    np.testing.assert_array_equal(out["token"], out["dense"])
    np.testing.assert_array_equal(out["chunk"], out["dense"])


def test_expert_stream_bench_runs_its_three_down_forms(tmp_path, monkeypatch):
    """bench_expert_stream on the tiny shape: a record per down-half form (file view, float streaming, int8) and path,
    each form's sparse paths checked against its dense one before timing, float equal to the file view but for
    summation order and int8 within the activation rounding's bound."""
    from sparrow.bench_device import bench_expert_stream as be

    monkeypatch.setenv("SPARROW_SYNTH_CACHE", str(tmp_path))
    # probe(bytes per thread): the working set (the bound) and the large buffers, before and after the timings
    asked, passes = [], iter([[10.0, 11.0], [3.0, 4.0], [13.0, 12.0], [5.0, 6.0]])
    recs = be.bench_shape("tiny", threads=2, steps=2, repeats=1, chunk=4, cpus=None, progress=False, dram_mb=64,
                          probe=lambda n: asked.append(n) or next(passes))
    ws = -(-sum(phases.phase_bytes(sy.ensure("tiny", "Q4_0", 0, vocab="small", progress=False)).values()) // 2)
    assert asked == [ws, 64 << 20] * 2
    assert sorted((r["variant"], r["mode"]) for r in recs) == sorted((v, m) for v in be.VARIANTS for m in be.MODES)
    for r in recs:
        assert r["bandwidth_gb_s"] == 11.5 and r["bound_s_per_pass"] == r["bytes_per_pass"] / 11.5e9
        assert r["dram_bandwidth_gb_s"] == 4.5 and r["bandwidth_probe_bytes_per_thread"] == ws
        assert r["s_per_pass"]["n"] == (2 if r["T"] == 1 else 4) and r["fraction_of_bound"] > 0
        # phase by phase: the bytes add up to the pass's, and every phase that reads weights took time
        ph = r["phases"]
        assert sum(p["bytes_per_pass"] for p in ph.values()) == r["bytes_per_pass"]
        assert all(p["s_per_pass"] > 0 and p["fraction_of_bound"] > 0 for p in ph.values() if p["bytes_per_pass"]), ph
        assert set(ph) >= {"attention", "router", "experts", "head"} and "ffn" not in ph
        assert r["vs_file_logits_nmse"] < (2e-4 if r["variant"] == "int8" else 1e-10)
    int8_differs = any(r["vs_file_logits_nmse"] > 0 for r in recs if r["variant"] == "int8")
    assert int8_differs == (_sparrow.kernel_tier() in ("avx2", "avx512", "amx"))  # the int8 form where the tier has it


def test_expert_stream_compares_two_builds_in_alternating_rounds(tmp_path, monkeypatch):
    """--builds: rounds alternate the order (A B, B A), each run gets its build's SPARROW_BUILD_DIR, and a path's
    steps are pooled over the rounds (their median, the phases from the summed timings, the probes' median)."""
    import json
    import subprocess

    from sparrow.bench_device import bench_expert_stream as be

    order = []

    def fake_run(cmd, env, check):  # one run of the int8 form: before steps 2 ms, after 1 ms
        build = Path(env["SPARROW_BUILD_DIR"]).name
        order.append(build)
        assert cmd[cmd.index("--variants") + 1] == "int8" and check
        k = 2e-3 if build == "old" else 1e-3
        tm = {"attention_s": 3 * k, "ffn_s": 0.0, "head_s": 0.0, "ffn_router_s": 0.0, "ffn_plan_s": 0.0,
              "ffn_experts_s": 0.0, "ffn_up_s": 0.0, "ffn_down_s": 0.0, "ffn_reduce_s": 0.0, "embed_s": 0.0,
              "n_evals": 3}
        rec = {"shape": "tiny", "mode": "dense", "T": 1, "s_per_pass_all": [k, k, 1.5 * k], "timings_summed": tm,
               "bandwidth_runs": [10.0, 12.0], "bytes_per_token": 1e6, "bytes_per_pass": 1e6,
               "phases": {"attention": {"bytes_per_pass": 1e6}}}
        doc = {"cpu": "test", "machine": "x", "tier": "t", "threads": 2, "pinned": False, "records": [rec]}
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(doc))

    monkeypatch.setattr(subprocess, "run", fake_run)
    doc = be.compare_builds([str(tmp_path / "old"), str(tmp_path / "new")], rounds=3, args=[])
    assert order == ["old", "new", "new", "old", "old", "new"]
    by = {r["build"]: r for r in doc["records"]}
    assert by["before"]["rounds"] == 3 and by["before"]["s_per_pass"]["n"] == 9
    assert by["before"]["s_per_pass"]["median"] == 2e-3 and by["after"]["s_per_pass"]["median"] == 1e-3
    assert doc["speedup_after_over_before"] == {"tiny dense": 2.0}
    assert by["after"]["bandwidth_gb_s"] == 11.0 and by["after"]["fraction_of_bound"] == 1e6 / 11e9 / 1e-3
    assert by["after"]["phases"]["attention"]["s_per_pass"] == 1e-3
