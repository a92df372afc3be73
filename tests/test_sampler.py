"""The native sampler (native/src/sampler.c) against the numpy reference in tests/reference/sampler.py.

Two kinds of check: the exact distribution the C pipeline builds (testing.sampler_probs) must equal the reference's
to float tolerance, and the tokens Sampler.sample draws must follow it (a chi-square test over 20k draws).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from reference.sampler import sampler_probs as ref_probs
from sparrow.runtime import _sparrow as sp

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)

# Parameter combinations exercised by the distribution tests: each step of the pipeline alone, then together.
COMBOS = {
    "temperature": dict(OFF, temperature=0.7),
    "hot": dict(OFF, temperature=1.8),
    "top_k": dict(OFF, temperature=1.0, top_k=10),
    "top_p": dict(OFF, temperature=1.0, top_p=0.8),
    "min_p": dict(OFF, temperature=1.0, min_p=0.1),
    "top_k+top_p+min_p": dict(temperature=0.9, top_k=25, top_p=0.9, min_p=0.05, repeat_penalty=1.0),
    "penalty": dict(OFF, temperature=1.0, repeat_penalty=1.5, repeat_last_n=8),
    "defaults": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.3, repeat_last_n=64),
}
# History fed to the penalty (accepted in this order); with repeat_last_n=8 only the last 8 count.
HISTORY = [3, 0, 7, 7, 11, 2, 5, 19, 0, 4, 1, 2]


def make_sampler(V: int, params: dict, seed: int = 1234, history=()) -> sp.Sampler:
    s = sp.Sampler(V, seed=seed, **params)
    for t in history:
        s.accept(t)
    return s


def logits_for(V: int, seed: int, scale: float = 2.0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0.0, scale, V).astype(np.float32)
    x[::5] = np.abs(x[::5])  # both signs matter to the penalty
    return x


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square(df) at one-sided normal quantile z (3.719 -> p = 1e-4), Wilson-Hilferty."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


# ---- greedy ----

@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    V = 5000
    x = logits_for(V, seed)
    s = sp.Sampler(V, temperature=0.0)
    assert s.sample(x) == int(np.argmax(x))
    assert s.sample(x) == int(np.argmax(x))  # no state between calls


def test_greedy_ties_go_to_lowest_id():
    x = np.zeros(100, np.float32)
    x[[17, 42, 99]] = 3.0
    assert sp.Sampler(100, temperature=0.0).sample(x) == 17
    assert sp.Sampler(100, temperature=-1.0).sample(x) == 17


def test_greedy_applies_repetition_penalty():
    x = np.zeros(10, np.float32)
    x[4], x[6] = 2.0, 1.5
    s = sp.Sampler(10, temperature=0.0, repeat_penalty=2.0)
    assert s.sample(x) == 4
    s.accept(4)  # 2.0 / 2 = 1.0 < 1.5
    assert s.sample(x) == 6
    s.reset()
    assert s.sample(x) == 4


# ---- the exact distribution against the reference ----

@pytest.mark.parametrize("name", list(COMBOS))
@pytest.mark.parametrize("V", [64, 49152])
def test_probs_match_reference(name, V):
    params = COMBOS[name]
    x = logits_for(V, 7)
    s = make_sampler(V, params, history=HISTORY)
    got = sp.testing.sampler_probs(s, x)
    want = ref_probs(x, history=HISTORY, **params)
    assert got.dtype == np.float32 and got.shape == (V,)
    assert abs(float(got.sum()) - 1.0) < 1e-5
    np.testing.assert_array_equal(got > 0, want > 0)  # the same support
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_probs_penalty_only_counts_last_n():
    V = 32
    x = np.full(V, 1.0, np.float32)
    s = sp.Sampler(V, temperature=1.0, **dict(OFF, repeat_penalty=2.0), repeat_last_n=2)
    for t in (5, 6, 7):
        s.accept(t)
    p = sp.testing.sampler_probs(s, x)
    assert p[5] == p[0] and p[6] < p[0] and p[7] < p[0]
    np.testing.assert_allclose(p, ref_probs(x, temperature=1.0, **dict(OFF, repeat_penalty=2.0), repeat_last_n=2,
                                            history=[5, 6, 7]), rtol=1e-5)


def test_probs_with_masked_logits():
    V = 1000
    x = logits_for(V, 3)
    x[::3] = -np.inf
    params = dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, repeat_penalty=1.0)
    got = sp.testing.sampler_probs(sp.Sampler(V, **params), x)
    assert not got[::3].any()
    np.testing.assert_allclose(got, ref_probs(x, **params), rtol=1e-4, atol=1e-7)


def test_probs_property_random_params():
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=100, deadline=None, derandomize=True)
    @hyp.given(
        V=st.integers(1, 300),
        seed=st.integers(0, 2**31),
        scale=st.sampled_from([0.1, 1.0, 5.0]),
        temperature=st.floats(0.05, 3.0),
        top_k=st.integers(-1, 320),
        top_p=st.floats(0.05, 1.0),
        min_p=st.floats(0.0, 0.9),
        repeat_penalty=st.floats(0.5, 2.0),
        history=st.lists(st.integers(0, 299), max_size=20),
    )
    def check(V, seed, scale, temperature, top_k, top_p, min_p, repeat_penalty, history):
        history = [h % V for h in history]
        params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repeat_penalty=repeat_penalty, repeat_last_n=8)
        x = logits_for(V, seed, scale)
        got = sp.testing.sampler_probs(make_sampler(V, params, history=history), x)
        want = ref_probs(x, history=history, **params)
        # C keeps probabilities in float32: ones below ~1e-38 underflow to 0 there and not in float64. Only such
        # tokens may differ in support.
        differ = (got > 0) != (want > 0)
        assert not (differ & (np.maximum(got, want) > 1e-6)).any()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    check()


# ---- draws follow the distribution ----

@pytest.mark.parametrize("name", list(COMBOS))
def test_draws_follow_reference(name):
    """20k draws (seed fixed) against the reference: chi-square at p = 1e-4 over cells with expected count >= 5
    (the rest pooled), total variation below 0.03, and no token outside the support."""
    V, n = 64, 20_000
    params = COMBOS[name]
    x = logits_for(V, 11)
    s = make_sampler(V, params, seed=99, history=HISTORY)
    draws = np.array([s.sample(x) for _ in range(n)])
    want = ref_probs(x, history=HISTORY, **params)
    counts = np.bincount(draws, minlength=V)
    assert not counts[want == 0].any(), "drew a token the pipeline removes"
    tv = 0.5 * np.abs(counts / n - want).sum()
    assert tv < 0.03, f"total variation {tv:.4f}"
    expected = want * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    df = len(obs) - 1
    if df == 0:  # a single token left: every draw must be it
        assert obs[0] == n
        return
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < chi2_critical(df), f"chi2 {chi2:.1f} over df {df} (critical {chi2_critical(df):.1f})"


# ---- seeds, reset, history ----

def draw_seq(s: sp.Sampler, x: np.ndarray, n: int = 200, accept: bool = False) -> list[int]:
    out = []
    for _ in range(n):
        t = s.sample(x)
        if accept:
            s.accept(t)
        out.append(t)
    return out


def test_same_seed_same_sequence_different_seed_differs():
    V = 1000
    x = logits_for(V, 5, scale=1.0)
    params = dict(temperature=1.0, top_k=100, top_p=0.95, min_p=0.0)
    a = draw_seq(sp.Sampler(V, seed=42, **params), x)
    b = draw_seq(sp.Sampler(V, seed=42, **params), x)
    c = draw_seq(sp.Sampler(V, seed=43, **params), x)
    assert a == b
    assert a != c


def test_reset_reproduces_and_clears_history():
    V = 500
    x = logits_for(V, 8, scale=1.0)
    s = sp.Sampler(V, seed=7, temperature=1.0, top_k=50, repeat_penalty=1.5, repeat_last_n=16)
    p0 = sp.testing.sampler_probs(s, x)
    first = draw_seq(s, x, accept=True)
    assert not np.array_equal(sp.testing.sampler_probs(s, x), p0)  # the history changed the distribution
    s.reset()
    np.testing.assert_array_equal(sp.testing.sampler_probs(s, x), p0)
    assert draw_seq(s, x, accept=True) == first


def test_accept_out_of_range_is_ignored():
    V = 16
    x = logits_for(V, 2)
    s = sp.Sampler(V, temperature=1.0, repeat_penalty=2.0)
    p0 = sp.testing.sampler_probs(s, x)
    for t in (-1, V, 10**9):
        s.accept(t)
    np.testing.assert_array_equal(sp.testing.sampler_probs(s, x), p0)


def test_logits_not_modified():
    V = 49152
    x = logits_for(V, 4)
    x[:10] = -np.inf
    before = x.copy()
    for params in COMBOS.values():
        s = make_sampler(V, params, history=HISTORY)
        s.sample(x)
        sp.testing.sampler_probs(s, x)
    np.testing.assert_array_equal(x, before)


def test_defaults_with_vocab_of_one_and_two():
    assert sp.Sampler(1).sample(np.array([0.3], np.float32)) == 0
    s = sp.Sampler(2, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)
    draws = {s.sample(np.array([0.0, 0.0], np.float32)) for _ in range(100)}
    assert draws == {0, 1}


# ---- bad input ----

@pytest.mark.parametrize("kwargs, words", [
    (dict(n_vocab=0), "n_vocab"),
    (dict(n_vocab=-5), "n_vocab"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(repeat_penalty=-1.0), "repeat_penalty"),
    (dict(repeat_penalty=float("inf")), "repeat_penalty"),
    (dict(repeat_last_n=-1), "repeat_last_n"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_params_raise(kwargs, words):
    kw = dict(n_vocab=100) | kwargs
    with pytest.raises(sp.SparrowError, match=f"SP_ERR_INVALID_ARG.*{words}"):
        sp.Sampler(kw.pop("n_vocab"), **kw)


@pytest.mark.parametrize("bad, words", [(np.nan, "NaN"), (np.inf, r"\+inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bad_logits_raise(bad, words, temperature):
    x = logits_for(100, 1)
    x[37] = bad
    s = sp.Sampler(100, temperature=temperature)
    with pytest.raises(sp.SparrowError, match=f"SP_ERR_INVALID_ARG.*logits\\[37\\] is {words}"):
        s.sample(x)
    with pytest.raises(sp.SparrowError, match="SP_ERR_INVALID_ARG"):
        sp.testing.sampler_probs(s, x)
    x[37] = 0.0
    assert 0 <= s.sample(x) < 100  # the sampler survives


@pytest.mark.parametrize("temperature", [0.0, 0.8])  # greedy takes its own one-pass path
def test_all_masked_raises_and_wrong_length_raises(temperature):
    s = sp.Sampler(10, temperature=temperature)
    with pytest.raises(sp.SparrowError, match="every logit is -inf"):
        s.sample(np.full(10, -np.inf, np.float32))
    with pytest.raises(sp.SparrowError, match="n_vocab"):
        s.sample(np.zeros(11, np.float32))
    s.close()
    with pytest.raises(sp.SparrowError, match="closed"):
        s.sample(np.zeros(10, np.float32))
