"""Session contracts on the real model: tree masks, KV rollback/compaction, and clear errors on bad requests.

Tolerance: the same token at the same position seen through a different batch layout goes through the same kernels
with the same inputs, except that activation quantization and attention sums may group differently; logits agree to
within 1e-3 of their range."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sparrow.runtime import Model, SparrowError


@pytest.fixture(scope="module")
def model(smollm_path):
    with Model(smollm_path) as m:
        yield m


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * float(np.abs(b).max()))


PROMPT = "The old lighthouse keeper looked out at the"


def test_causal_mask_given_explicitly_equals_default(model):
    toks = model.tokenize(PROMPT)
    T = len(toks)
    causal = np.tril(np.ones((T, T), dtype=np.uint8))
    with model.session(n_ctx=128) as a, model.session(n_ctx=128) as b:
        close(a.eval(toks, mask=causal, logits="all"), b.eval(toks, logits="all"))


def test_tree_mask_gives_each_branch_its_own_path_logits(model):
    """A tree: prefix p, then two branches [x1, x2] and [y1]; each node's logits equal a plain run of its path."""
    prefix = model.tokenize(PROMPT)
    x = model.tokenize(" sea and", add_special=False)[:2]
    y = model.tokenize(" storm", add_special=False)[:1]
    with model.session(n_ctx=128) as s:
        s.eval(prefix, logits="none")
        P = len(prefix)
        # nodes: 0=x1, 1=x2, 2=y1; positions follow the path depth
        tree = [x[0], x[1], y[0]]
        pos = [P, P + 1, P]
        mask = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=np.uint8)
        tree_logits = s.eval(tree, pos=pos, mask=mask, logits="all")
        # accept the x path: keep prefix slots and the slots of x1, x2
        s.keep(list(range(P)) + [P, P + 1])
        assert s.n_past == P + 2
        after_keep = s.eval([y[0]], logits="last")
    with model.session(n_ctx=128) as ref:
        ref.eval(prefix, logits="none")
        path_x = ref.eval(x, logits="all")
        ref_next = ref.eval([y[0]], logits="last")
        ref.truncate(P)
        path_y = ref.eval(y, logits="all")
    close(tree_logits[:2], path_x)
    close(tree_logits[2:], path_y)
    close(after_keep, ref_next)


def test_eval_writes_logits_into_a_given_buffer_and_rejects_bad_ones(model):
    toks = model.tokenize(PROMPT)[:4]
    V = model.info.n_vocab
    with model.session(n_ctx=128) as s:
        want = s.eval(toks, logits="all")
        s.truncate(0)
        buf = np.full((8, V), np.nan, np.float32)
        got = s.eval(toks, logits="all", out=buf[:4])
        assert np.shares_memory(got, buf) and np.array_equal(buf[:4], want) and np.isnan(buf[4:]).all()
        last = np.empty(V, np.float32)
        assert s.eval([toks[0]], out=last) is last
        n = s.n_past
        for bad in (np.zeros((4, V)), buf[:4, ::2], buf[:3], np.zeros(V, np.float32)):
            with pytest.raises((ValueError, SparrowError)):
                s.eval(toks, logits="all", out=bad)
        assert s.n_past == n and len(s.tokens) == n  # nothing evaluated


def test_phase_timings_account_for_the_forward_passes(model):
    import time

    toks = model.tokenize(PROMPT)
    with model.session(n_ctx=128, n_threads=2) as s:
        assert s.timings().n_evals == 0 and s.timings().total_s == 0
        t0 = time.perf_counter()
        s.eval(toks[:-1], logits="none")
        s.eval(toks[-1:], logits="all")
        wall = time.perf_counter() - t0
        tm = s.timings()
        assert (tm.n_evals, tm.n_tokens) == (2, len(toks))
        assert tm.attention_s > 0 and tm.ffn_s > 0 and tm.head_s > 0 and tm.embed_s >= 0
        assert tm.total_s <= wall  # the phases are parts of the calls
        assert tm.total_s > 0.5 * wall  # ... and most of them (the rest: binding, thread wake-up)
        head_without_logits = tm.head_s
        s.reset_timings()
        assert s.timings().n_evals == 0 and s.timings().total_s == 0
        s.eval(toks[:1], logits="none")
        assert s.timings().head_s < head_without_logits


def test_truncate_rolls_back(model):
    toks = model.tokenize(PROMPT)
    with model.session(n_ctx=128) as s:
        first = s.eval(toks, logits="last")
        s.eval(model.tokenize(" something else entirely", add_special=False), logits="none")
        s.truncate(len(toks) - 1)
        again = s.eval(toks[-1:], logits="last")
    close(again, first)


def test_bad_requests_raise_clear_errors(model):
    with model.session(n_ctx=8, n_batch=4) as s:
        with pytest.raises(SparrowError, match="outside the vocabulary"):
            s.eval([model.info.n_vocab])
        with pytest.raises(SparrowError, match="n_tokens must be"):
            s.eval([1] * 5)
        with pytest.raises(SparrowError, match="n_tokens must be"):
            s.eval([])
        s.eval([1, 2, 3, 4], logits="none")
        s.eval([1, 2, 3, 4], logits="none")
        with pytest.raises(SparrowError, match="context is full"):
            s.eval([1])
        with pytest.raises(SparrowError, match="truncate"):
            s.truncate(9)
        with pytest.raises(SparrowError, match="strictly increasing"):
            s.keep([2, 1])
        assert s.n_past == 8  # failed calls changed nothing
    with pytest.raises(SparrowError, match="n_ctx"):
        model.session(n_ctx=-5)


SHIPPED_BLOCKFFN = Path(__file__).resolve().parent.parent / "models" / "blockffn-tiny.Q8_0.gguf"


@pytest.mark.parametrize("n_ctx", [0, 1, 100, 2048])
def test_session_memory_estimate_is_what_the_session_allocates(model, n_ctx):
    """sp_session_memory_estimate and sp_session_new share one sizing walk: the estimate is the session's own
    accounting, byte for byte, for any n_ctx / n_batch / n_threads; n_ctx 0 is the model's context; F16 KV cache,
    the keys in whole blocks of 16 slots (the attention kernels' layout)."""
    info = model.info
    head_dim = info.n_embd // info.n_head
    for n_batch, n_threads in ((64, 1), (64, 3), (7, 2)):
        est = model.session_memory(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads)
        with model.session(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads) as s:
            assert s.memory() == est
            assert est.n_ctx == s.n_ctx == (n_ctx or info.n_ctx_train)
        k_slots = -(-est.n_ctx // 16) * 16
        assert est.kv_cache_bytes == info.n_layer * (k_slots + est.n_ctx) * info.n_head_kv * head_dim * 2  # K, V
        assert est.kv_cache_bytes < est.total_bytes < est.kv_cache_bytes + (64 << 20)


def test_session_memory_estimate_of_a_sparse_expert_model():
    """The BlockFFN scratch (router scores, expert tasks, per-thread buffers, sparsity counters) is counted too."""
    with Model(SHIPPED_BLOCKFFN) as m:
        for n_ctx, n_threads in ((0, 1), (64, 2), (300, 4)):
            est = m.session_memory(n_ctx=n_ctx, n_threads=n_threads)
            with m.session(n_ctx=n_ctx, n_threads=n_threads) as s:
                assert s.memory() == est
        one, four = (m.session_memory(n_ctx=64, n_threads=t) for t in (1, 4))
    assert one.kv_cache_bytes == four.kv_cache_bytes and four.total_bytes > one.total_bytes  # per-thread scratch


def test_session_memory_estimate_rejects_what_a_session_rejects(model, smollm_path):
    with pytest.raises(SparrowError, match="n_ctx"):
        model.session_memory(n_ctx=-5)
    with pytest.raises(SparrowError, match="n_batch"):
        model.session_memory(n_batch=5000)
    with Model(smollm_path, vocab_only=True) as m, pytest.raises(SparrowError, match="vocab_only"):
        m.session_memory()


def test_closed_objects_raise_instead_of_crashing(smollm_path):
    m = Model(smollm_path)
    s = m.session(n_ctx=16)
    s.close()
    with pytest.raises(SparrowError, match="closed"):
        s.eval([1])
    m.close()
    with pytest.raises(SparrowError, match="closed"):
        m.tokenize("hi")


def test_vocab_only_model_cannot_run(smollm_path):
    with Model(smollm_path, vocab_only=True) as m:
        assert m.tokenize("hello") == Model(smollm_path, vocab_only=True).tokenize("hello")
        with pytest.raises(SparrowError, match="vocab_only"):
            m.session()
