"""Multi-sequence sessions (sp_session_params.n_seq, sp_batch.seq): several independent sequences in one forward pass.

Contract: a sequence's logits are bit for bit those of a session of its own, whatever the other sequences in the pass,
their order, or how its tokens were split across passes (every kernel computes an output element alike for any batch
size), for dense llama models and the shipped BlockFFN model (Q8_0 experts); for float experts with several threads
to float rounding (see the MLA test); sequences never see each other; bad requests are refused with nothing
changed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sparrow.runtime import Model, SparrowError
from sparrow.runtime.native import BatchSession

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["smollm", "blockffn"])
def model(request, smollm_path):
    path = smollm_path if request.param == "smollm" else ROOT / "models" / "blockffn-tiny.Q8_0.gguf"
    with Model(path) as m:
        yield m


def alone(model: Model, prompt: list[int], steps: int, n_threads: int = 0) -> list[np.ndarray]:
    """The logits of the prompt's last token, then of `steps` greedy tokens, in a session of its own."""
    with model.session(n_ctx=256, n_threads=n_threads) as s:
        out = [s.eval(prompt, logits="last").copy()]
        for _ in range(steps):
            out.append(s.eval([int(np.argmax(out[-1]))], logits="last").copy())
    return out


def test_sequences_in_one_pass_equal_each_alone(model):
    rng = np.random.default_rng(1)
    V = model.info.n_vocab
    prompts = [[int(t) for t in rng.integers(0, V, size=n)] for n in (5, 17, 1, 9, 30)]
    refs = [alone(model, p, 5) for p in prompts]
    seqs = [3, 0, 6, 1, 4]
    with BatchSession(model, n_seq=7, n_ctx=256, n_batch=64) as bs:
        first = bs.eval(list(zip(seqs, prompts)))
        for i in range(len(prompts)):
            np.testing.assert_array_equal(first[i], refs[i][0])
        for step in range(5):
            order = list(range(len(prompts)))
            rng.shuffle(order)  # another order of the runs each step
            out = bs.eval([(seqs[i], [int(np.argmax(refs[i][step]))]) for i in order])
            for row, i in enumerate(order):
                np.testing.assert_array_equal(out[row], refs[i][step + 1])
        assert [bs.n_past(s) for s in seqs] == [len(p) + 5 for p in prompts]
        assert bs.n_past(2) == 0 and bs.n_past(5) == 0


def test_prefill_chunks_mixed_with_decoding_and_a_freed_slot_reused(model):
    """A long prompt evaluated in pieces beside another sequence's decoding, then a slot freed and reused."""
    rng = np.random.default_rng(2)
    V = model.info.n_vocab
    long = [int(t) for t in rng.integers(0, V, size=40)]
    short = [int(t) for t in rng.integers(0, V, size=4)]
    ref_long, ref_short = alone(model, long, 2), alone(model, short, 3)
    with BatchSession(model, n_seq=2, n_ctx=128, n_batch=16) as bs:
        out = bs.eval([(1, short), (0, long[:12])])
        np.testing.assert_array_equal(out[0], ref_short[0])
        for i, chunk in enumerate((long[12:27], long[27:])):
            out = bs.eval([(1, [int(np.argmax(ref_short[i]))]), (0, chunk)])
            np.testing.assert_array_equal(out[0], ref_short[i + 1])
        np.testing.assert_array_equal(out[1], ref_long[0])
        bs.truncate(1)  # sequence 1 is done: its slot starts a new sequence
        out = bs.eval([(0, [int(np.argmax(ref_long[0]))]), (1, short)])
        np.testing.assert_array_equal(out[0], ref_long[1])
        np.testing.assert_array_equal(out[1], ref_short[0])


def test_a_tree_mask_applies_within_each_run(model):
    """Two sequences, each verifying a two-branch tree in the same pass: each node's logits equal its path alone."""
    rng = np.random.default_rng(3)
    V = model.info.n_vocab
    prefixes = [[int(t) for t in rng.integers(0, V, size=n)] for n in (6, 11)]
    trees = [[int(t) for t in rng.integers(0, V, size=3)] for _ in prefixes]
    tree_mask = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=np.uint8)  # x1 -> x2, and y1 beside x1
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[:3, :3] = tree_mask
    mask[3:, 3:] = tree_mask
    mask[3:, :3] = 1  # entries between runs are ignored: the second sequence cannot see the first one's tokens
    with BatchSession(model, n_seq=2, n_ctx=64) as bs:
        bs.eval([(0, prefixes[0]), (1, prefixes[1])])
        pos = []
        for p in prefixes:
            pos += [len(p), len(p) + 1, len(p)]
        logits = bs.handle.eval(trees[0] + trees[1], pos, mask, "all", None, [0, 0, 0, 1, 1, 1])
    for k, (p, t) in enumerate(zip(prefixes, trees)):
        with model.session(n_ctx=64) as s:
            s.eval(p, logits="none")
            path_x = s.eval(t[:2], logits="all")
            s.truncate(len(p))
            path_y = s.eval(t[2:], logits="all")
        np.testing.assert_array_equal(logits[3 * k:3 * k + 2], path_x)
        np.testing.assert_array_equal(logits[3 * k + 2:3 * k + 3], path_y)


def test_bad_requests_are_refused_and_change_nothing(smollm_path):
    with Model(smollm_path) as m, BatchSession(m, n_seq=3, n_ctx=8, n_batch=16) as bs:
        bs.eval([(0, [1, 2, 3])])
        with pytest.raises(SparrowError, match="sequence id 3 .* outside"):
            bs.eval([(3, [1])])
        with pytest.raises(SparrowError, match="sequence id -1"):
            bs.eval([(-1, [1])])
        with pytest.raises(SparrowError, match="contiguous"):
            bs.handle.eval([1, 2, 3], None, None, "last", None, [0, 1, 0])
        with pytest.raises(SparrowError, match="sequence 0's context is full"):
            bs.eval([(1, [4]), (0, [1, 2, 3, 4, 5, 6])])
        with pytest.raises(SparrowError, match="seq must have one entry per token"):
            bs.handle.eval([1, 2], None, None, "last", None, [0])
        with pytest.raises(SparrowError, match="outside"):
            bs.truncate(5)
        with pytest.raises(SparrowError, match="must be 0..n_past"):
            bs.truncate(1, 2)
        with pytest.raises(ValueError, match="outside"):
            bs.n_past(3)
        assert [bs.n_past(s) for s in range(3)] == [3, 0, 0]  # the refused passes left every sequence as it was
        with pytest.raises(SparrowError, match="n_seq must be 1..256"):
            BatchSession(m, n_seq=0)
        with pytest.raises(SparrowError, match="n_seq must be 1..256"):
            BatchSession(m, n_seq=257)


def test_memory_grows_by_one_cache_per_sequence(smollm_path):
    with Model(smollm_path) as m:
        one = m.session_memory(n_ctx=512)
        eight = m.session_memory(n_ctx=512, n_seq=8)
        assert eight.kv_cache_bytes == 8 * one.kv_cache_bytes
        assert eight.total_bytes - one.total_bytes == 7 * one.kv_cache_bytes + 7 * 4  # + 7 more n_past counters
        with BatchSession(m, n_seq=8, n_ctx=512) as bs:
            assert bs.memory().total_bytes == eight.total_bytes


@pytest.mark.parametrize("n_threads", [1, 2])
def test_multi_head_latent_attention_sequences_equal_each_alone(tmp_path, n_threads):
    """The MLA fixture's experts are F32: with several threads the sparse FFN adds each thread's experts apart and
    then the parts, and which experts a thread gets depends on the pass's union, so across batch layouts the logits
    agree to float rounding; with one thread (and for the attention, always) bit for bit."""
    from test_mla_native import build, mla_config

    _, path = build(tmp_path, mla_config())
    rng = np.random.default_rng(4)
    check = np.testing.assert_array_equal if n_threads == 1 else (
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5))
    with Model(path) as m:
        prompts = [[int(t) for t in rng.integers(0, m.info.n_vocab, size=n)] for n in (3, 8, 5)]
        refs = [alone(m, p, 3, n_threads) for p in prompts]
        with BatchSession(m, n_seq=3, n_ctx=64, n_threads=n_threads) as bs:
            out = bs.eval([(2, prompts[0]), (0, prompts[1]), (1, prompts[2])])
            for i in range(3):
                check(out[i], refs[i][0])
            for step in range(3):
                out = bs.eval([(1, [int(np.argmax(refs[2][step]))]), (2, [int(np.argmax(refs[0][step]))]),
                               (0, [int(np.argmax(refs[1][step]))])])
                for row, i in enumerate((2, 0, 1)):
                    check(out[row], refs[i][step + 1])
