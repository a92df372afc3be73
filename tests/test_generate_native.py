"""The C generator (sp_generator, native/src/generate.c) through runtime.native.Generator and the C example.

- Greedy: the tokens equal plain greedy decoding (runtime.native.generate_tokens) exactly, without a drafter and with
  prompt lookup, on the 52 prompts of tests/test_speculative.py, on SmolLM2-135M-Instruct and the shipped
  blockffn-tiny (24 new tokens each).
- Sampling: without a drafter, the same seed gives plain sampling's tokens exactly; with prompt lookup, the joint
  distribution of the first two tokens equals the target's (computed from its logits with the sampler pipeline), on
  the tiny random llama of tests/test_speculative.py: chi-square, 3000 samples, fails when p < 1e-3, with and without
  the repetition penalty; a prompt that repeats itself makes prompt lookup draft tokens the target often takes.
- Stop conditions (end of generation, max tokens, stop strings, callback, full context), bad arguments, the KV cache
  changed behind the generator's back, and two threads on one generator: clear errors, never a crash.
- native/examples/speculate.c compiles against sparrow.h alone and prints plain greedy decoding's text.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sparrow.runtime import Generator, Model, Sampler, SamplerParams, SparrowError, _sparrow, generate_tokens
from test_readme import _native_paths
from test_speculative import PROMPTS, chi_square_p, two_token_distribution
from tiny_llama import TinyConfig, write_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 24
THREADS = 2
TINY_BLOCKFFN = ROOT / "models" / "blockffn-tiny.Q8_0.gguf"


@pytest.fixture(scope="module")
def smollm(smollm_path):
    with Model(smollm_path) as m, m.session(n_ctx=512, n_threads=THREADS) as s:
        yield m, s


@pytest.fixture(scope="module")
def blockffn():
    with Model(TINY_BLOCKFFN) as m, m.session(n_ctx=512, n_threads=THREADS) as s:
        yield m, s


def plain_greedy(model, session, n_new: int = N_NEW):
    """(prompt tokens, plain greedy continuation of n_new tokens) for each of PROMPTS: the oracle."""
    out = []
    for p in PROMPTS:
        toks = model.tokenize(p, parse_special=True)
        session.truncate(0)
        out.append((toks, list(generate_tokens(session, toks, max_tokens=n_new))))
    return out


@pytest.fixture(scope="module")
def smollm_plain(smollm):
    return plain_greedy(*smollm)


@pytest.fixture(scope="module")
def blockffn_plain(blockffn):
    return plain_greedy(*blockffn)


def check_identity(model, session, plain, drafter, **options):
    with Generator(session, max_tokens=N_NEW, drafter=drafter, **options) as gen:
        for i, (toks, ref) in enumerate(plain):
            session.truncate(0)
            got = gen.generate(toks)
            assert got == ref, f"prompt {i} {PROMPTS[i]!r}: {model.detokenize(got)!r} != {model.detokenize(ref)!r}"
            assert gen.stop_reason == ("max_tokens" if len(ref) == N_NEW else "eog")
            assert session.tokens == gen.context()[:session.n_past]
        return gen.stats()


def test_prompt_set_is_large_enough():
    assert len(PROMPTS) >= 50


@pytest.mark.parametrize("drafter", ["none", "prompt-lookup"])
def test_greedy_equals_plain_decoding_smollm(smollm, smollm_plain, drafter):
    st = check_identity(*smollm, smollm_plain, drafter)
    assert st.tokens == sum(len(r) for _, r in smollm_plain)
    if drafter == "none":
        assert st.drafted == 0 and st.steps == st.tokens + sum(len(r) < N_NEW for _, r in smollm_plain)
    else:
        assert 0 < st.accepted < st.drafted and st.steps < st.tokens
    print(f"{drafter}: {st}")


@pytest.mark.parametrize("drafter", ["none", "prompt-lookup"])
def test_greedy_equals_plain_decoding_blockffn_tiny(blockffn, blockffn_plain, drafter):
    st = check_identity(*blockffn, blockffn_plain, drafter)
    if drafter == "prompt-lookup":
        assert st.drafted > 0
    print(f"{drafter}: {st}")


def test_session_generate_and_pull_iteration(smollm, smollm_plain):
    _model, session = smollm
    toks, ref = smollm_plain[2]
    session.truncate(0)
    assert list(session.generate(toks, max_tokens=N_NEW, drafter="prompt-lookup")) == ref
    with Generator(session, max_tokens=N_NEW, drafter="prompt-lookup", draft_k=2, ngram=4, min_ngram=1) as gen:
        gen.start(toks)
        assert gen.stats().prompt_tokens == len(toks) - 1  # a new generator reuses nothing it did not leave there
        pulled = []
        while (t := gen.next()) is not None:
            pulled.append(t)
        assert pulled == ref and gen.next() is None and gen.stop_reason == "max_tokens"
        # again: the cache holds the prompt's prefix this generator left there, so nothing is evaluated again
        before = gen.stats().prompt_tokens
        assert gen.generate(toks) == ref
        assert gen.stats().prompt_tokens == before


def test_sampling_without_a_drafter_is_plain_sampling(smollm):
    model, session = smollm
    for i, text in enumerate(PROMPTS[:6]):
        params = SamplerParams.chat(seed=100 + i, temperature=0.9)
        toks = model.tokenize(text, parse_special=True)
        session.truncate(0)
        ref = list(generate_tokens(session, toks, max_tokens=N_NEW, sampler=Sampler(model.info.n_vocab, params)))
        session.truncate(0)
        with Generator(session, params=params, max_tokens=N_NEW) as gen:
            assert gen.generate(toks) == ref


# ---- sampling through the C generator with prompt lookup preserves the target distribution ----

SAMPLE_PARAMS = SamplerParams(temperature=8.0, top_k=12, top_p=0.9, min_p=0.0, repeat_penalty=1.0)
N_SAMPLES = 3000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    with Model(write_tiny_llama(d / "target.gguf", TinyConfig(n_embd=64, n_layer=2))) as m:
        yield m


def lookup_prompt(model: Model, params: SamplerParams) -> list[int]:
    """A prompt ending in a bigram that occurred earlier, followed there by the target's likeliest continuation of
    the whole prompt (found by iterating): prompt lookup drafts tokens the target often, but not always, takes."""
    a, b = 40, 50
    for _ in range(6):
        prompt = [1, 270, 261, a, b, 7, 9, 270, 261]
        dist = two_token_distribution(model, prompt, params)
        best = max(dist, key=dist.get)
        if best == (a, b):
            break
        a, b = best
    return prompt


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_sampling_with_prompt_lookup_preserves_the_target_distribution(tiny, penalty):
    params = dataclasses.replace(SAMPLE_PARAMS, repeat_penalty=penalty, repeat_last_n=4)
    prompt = lookup_prompt(tiny, params)
    expected = two_token_distribution(tiny, prompt, params)
    counts, drafted, accepted = sample_pairs(tiny, prompt, params, 7000, drafter="prompt-lookup")
    pval = chi_square_p(counts, expected, N_SAMPLES)
    print(f"penalty {penalty}: chi-square p = {pval:.3g}; drafted {drafted}, accepted {accepted}")
    assert pval > 1e-3
    assert 0 < accepted < drafted


def sample_pairs(model, prompt, params, seed0, *, state=None, **options):
    """N_SAMPLES generations of the first two tokens after prompt through the C generator with these options, seeds
    seed0, seed0 + 1, ...; each generator new (Token Recycling's matrix loaded from state, if given). Returns the
    counts of each pair and the draft tokens verified and accepted in all."""
    drafted = accepted = 0
    counts: dict[tuple[int, int], int] = {}
    with model.session(n_ctx=64, n_threads=1) as s:
        for i in range(N_SAMPLES):
            with Generator(s, params=dataclasses.replace(params, seed=seed0 + i), max_tokens=2, stop_at_eog=False,
                           **options) as gen:
                if state is not None:
                    gen.load_drafter(state)
                got = tuple(gen.generate(prompt))
                st = gen.stats()
            drafted += st.drafted
            accepted += st.accepted
            counts[got] = counts.get(got, 0) + 1
    return counts, drafted, accepted


def test_a_wrong_acceptance_rule_would_fail_the_chi_square_test(tiny):
    """The test's power: greedy-accepting the draft (what a rule accepting point-mass drafts with probability 1
    gives for the drafted first token) is far from the target distribution."""
    prompt = lookup_prompt(tiny, SAMPLE_PARAMS)
    expected = two_token_distribution(tiny, prompt, SAMPLE_PARAMS)
    a, b = prompt[3], prompt[4]
    assert chi_square_p({(a, b): N_SAMPLES}, expected, N_SAMPLES) < 1e-30


# ---- stop conditions ----

def test_stop_strings_max_tokens_and_eog(smollm, smollm_plain):
    model, session = smollm
    toks, ref = smollm_plain[0]  # "The capital of France is"
    text = [model.token_bytes(t) for t in ref]
    joined = b"".join(text)
    # a stop string spanning a token boundary somewhere in the middle of the plain text
    cut = len(b"".join(text[:5]))
    stop = joined[cut - 2:cut + 3]
    end = next(i for i in range(len(text)) if stop in b"".join(text[:i + 1]))
    for drafter in ("none", "prompt-lookup"):
        session.truncate(0)
        with Generator(session, max_tokens=N_NEW, drafter=drafter, stop=["never appears \x01", stop]) as gen:
            assert gen.generate(toks) == ref[:end + 1]
            assert gen.stop_reason == "stop_string"
            assert gen.next() is None and gen.stop_reason == "stop_string"
        with Generator(session, max_tokens=5, drafter=drafter) as gen:
            assert gen.generate(toks) == ref[:5] and gen.stop_reason == "max_tokens"
        with Generator(session, max_tokens=0, drafter=drafter) as gen:
            assert gen.generate(toks) == [] and gen.stop_reason == "max_tokens"
    # an end-of-generation token ends a chat answer and is not returned
    chat = [(t, r) for t, r in smollm_plain if len(r) < N_NEW]
    assert chat, "no prompt ended within N_NEW tokens"
    toks, ref = chat[0]
    session.truncate(0)
    with Generator(session, max_tokens=N_NEW, drafter="prompt-lookup") as gen:
        assert gen.generate(toks) == ref and gen.stop_reason == "eog"
    session.truncate(0)
    with Generator(session, max_tokens=len(ref) + 3, stop_at_eog=False) as gen:
        out = gen.generate(toks)
        assert out[:len(ref)] == ref and model.is_eog(out[len(ref)])


def test_callback_stops_and_its_exception_is_raised(smollm, smollm_plain):
    _model, session = smollm
    toks, ref = smollm_plain[1]
    seen = []

    def cb(t):
        seen.append(t)
        return len(seen) < 3

    session.truncate(0)
    with Generator(session, max_tokens=N_NEW, drafter="prompt-lookup") as gen:
        assert gen.generate(toks, callback=cb) == ref[:3] == seen
        assert gen.stop_reason == "callback" and gen.next() is None and gen.stop_reason == "callback"

        def boom(t):
            raise KeyError("from the callback")

        with pytest.raises(KeyError, match="from the callback"):
            gen.generate(toks, callback=boom)
        assert gen.generate(toks) == ref  # usable afterwards


@pytest.mark.parametrize("drafter", ["none", "prompt-lookup"])
def test_context_full_matches_plain_decoding(smollm, drafter):
    model, _ = smollm
    toks = model.tokenize(PROMPTS[6], parse_special=True)  # "The quick brown fox ... The quick brown fox"
    n_ctx = len(toks) + 6
    with model.session(n_ctx=n_ctx, n_threads=THREADS) as s:
        ref = list(generate_tokens(s, toks, max_tokens=100))
        assert len(ref) == n_ctx - len(toks) + 1
        s.truncate(0)
        with Generator(s, max_tokens=100, drafter=drafter) as gen:
            assert gen.generate(toks) == ref and gen.stop_reason == "context_full"
            assert s.n_past == n_ctx
            with pytest.raises(SparrowError, match="SP_ERR_CONTEXT_FULL"):
                gen.start(toks + [toks[-1]] * 7)  # longer than the context


# ---- bad input ----

def test_bad_arguments_are_clear_errors(smollm):
    model, session = smollm
    toks = model.tokenize("Hello there", parse_special=True)
    bad = [
        ({"max_tokens": -1}, "max_tokens"),
        ({"drafter": 7}, "drafter must be"),
        ({"drafter": 1, "ngram": 0, "min_ngram": 0}, "min_ngram"),
        ({"drafter": 1, "ngram": 2, "min_ngram": 3}, "min_ngram"),
        ({"drafter": 1, "ngram": 17}, "ngram"),
        ({"drafter": 1, "draft_k": 0}, "draft_k"),
        ({"drafter": 1, "draft_k": 64}, "draft_k"),
        ({"stop": [b"x"] * 9}, "stop strings"),
        ({"stop": [b""]}, "stop\\[0\\]"),
        ({"stop": [b"x" * 65]}, "stop\\[0\\]"),
        ({"stop": [b"a\x00b"]}, "NUL"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"repeat_penalty": -1.0}, "repeat_penalty"),
    ]
    for kw, msg in bad:
        with pytest.raises(SparrowError, match=msg):
            _sparrow.Generator(session._s, **kw)
    with pytest.raises(ValueError, match="drafter"):
        Generator(session, drafter="no-such-drafter")
    with model.session(n_ctx=64, n_batch=1, n_threads=1) as one:
        with pytest.raises(SparrowError, match="n_batch must be >= 2"):
            Generator(one, drafter="prompt-lookup")
        Generator(one).close()  # plain decoding needs no batch
    gen = Generator(session, drafter="prompt-lookup")
    with pytest.raises(SparrowError, match="no generation started"):
        gen.next()
    with pytest.raises(SparrowError, match="at least one token"):
        gen.start([])
    with pytest.raises(SparrowError, match="outside the vocabulary"):
        gen.start([1, model.info.n_vocab])
    with pytest.raises(SparrowError, match="outside the vocabulary"):
        gen.start([-3])
    # the KV cache changed behind the generator's back: refused, then a new start works
    gen.start(toks)
    first = gen.next()
    session.eval([first])
    with pytest.raises(SparrowError, match="changed outside the generator"):
        gen.generate()
    session.truncate(0)
    gen.start(toks)
    assert gen.next() == first
    gen.close()
    with pytest.raises(SparrowError, match="closed"):
        gen.next()
    gen.close()  # twice is fine
    # a closed session
    with model.session(n_ctx=64, n_threads=1) as s2:
        g2 = Generator(s2)
    with pytest.raises(SparrowError, match="session is closed"):
        g2.start(toks)
    g2.close()


def test_two_threads_on_one_generator_get_a_clear_error(smollm, smollm_plain):
    _model, session = smollm
    toks, ref = smollm_plain[0]
    started, errors, result = threading.Event(), [], []

    def slow(t):
        started.set()
        time.sleep(0.05)  # the GIL is released, the generator stays inside sp_generate

    session.truncate(0)
    with Generator(session, max_tokens=12, drafter="prompt-lookup", stop_at_eog=False) as gen:
        th = threading.Thread(target=lambda: result.append(gen.generate(toks, callback=slow)))
        th.start()
        assert started.wait(60)
        for call in (gen.next, lambda: gen.start(toks), gen.generate, gen.stats, lambda: session.eval([1]),
                     lambda: session.truncate(0)):
            try:
                call()
            except SparrowError as e:
                errors.append(str(e))
        th.join()
        assert len(errors) == 6 and all("in use by another thread" in e for e in errors), errors
        # the generation went on unharmed
        assert result == [ref[:12]] and gen.stop_reason == "max_tokens"


# ---- the C example ----

@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_example_generates_plain_greedy_text(tmp_path, smollm, smollm_path):
    assert "examples/speculate.c" in (ROOT / "native" / "CMakeLists.txt").read_text()  # CMake builds it too
    include, lib = _native_paths()
    exe = tmp_path / "speculate"
    cc = subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror",
                         str(ROOT / "native" / "examples" / "speculate.c"), f"-I{include}", f"-L{lib}", "-lsparrow",
                         f"-Wl,-rpath,{lib}", "-o", str(exe)], capture_output=True, text=True, check=False)
    assert cc.returncode == 0, cc.stderr
    prompt = "Repeat this list: apples, oranges, pears, plums, apples, oranges, pears, plums."
    r = subprocess.run([str(exe), str(smollm_path), prompt, "40"], capture_output=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    model, _ = smollm
    toks = model.tokenize(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", parse_special=True)
    with model.session(n_ctx=1024, n_threads=THREADS) as s:
        ref = list(generate_tokens(s, toks, max_tokens=40))
    text, stats = r.stdout.rsplit(b"\n[", 1)
    assert text == b"".join(model.token_bytes(t) for t in ref)
    m = re.match(rb"(\d+) tokens, stopped by (.*?); (\d+) steps, (\d+) drafted, (\d+) accepted", stats)
    assert m and int(m.group(1)) == len(ref), stats
    print(stats.decode())
    bad = subprocess.run([str(exe), str(tmp_path / "missing.gguf"), "hi"], capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "error:" in bad.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("which", ["smollm", "blockffn-tiny"])
def test_c_api_null_arguments_push_pull_and_a_second_thread(tmp_path, smollm_path, which):
    """tests/native/generator_threads.c: NULL arguments, push = pull, a second host thread refused while the
    generator is inside its callback, the KV cache rolled back behind its back (its docstring)."""
    include, lib = _native_paths()
    exe = tmp_path / "generator_threads"
    cc = subprocess.run(["gcc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror",
                         str(ROOT / "tests" / "native" / "generator_threads.c"), f"-I{include}", f"-L{lib}",
                         "-lsparrow", "-lpthread", f"-Wl,-rpath,{lib}", "-o", str(exe)],
                        capture_output=True, text=True, check=False)
    assert cc.returncode == 0, cc.stderr
    model = smollm_path if which == "smollm" else TINY_BLOCKFFN
    r = subprocess.run([str(exe), str(model)], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""), reason="the sanitizers bring their own allocator")
def test_a_generation_allocates_nothing(tmp_path, smollm_path):
    """tests/native/generator_allocs.c counts every allocation, in every thread, from sp_generator_start to the end
    of a generation (greedy and sampled, prompt lookup, stop strings)."""
    include, lib = _native_paths()
    exe = tmp_path / "generator_allocs"
    cc = subprocess.run(["gcc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror",
                         str(ROOT / "tests" / "native" / "generator_allocs.c"), f"-I{include}", f"-L{lib}",
                         "-lsparrow", f"-Wl,-rpath,{lib}", "-o", str(exe)], capture_output=True, text=True, check=False)
    assert cc.returncode == 0, cc.stderr
    for model in (smollm_path, TINY_BLOCKFFN):
        r = subprocess.run([str(exe), str(model)], capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "allocations: greedy 0 (48 tokens), sampled 0 (48 tokens)" in r.stdout, r.stdout


@pytest.mark.parametrize("drafter", ["none", "recycling"])
def test_a_nan_logit_stops_generation_with_the_samplers_error(tmp_path, drafter):
    """A NaN logit on the path stops greedy and Token Recycling generation with the sampler's error, by name (the
    rollback of the cache after it once cleared the message: 'SP_ERR_INVALID_ARG: ' and nothing else)."""
    import gguf
    import numpy as np

    path = write_tiny_llama(tmp_path / "m.gguf", TinyConfig(tied=False))
    head = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "output.weight")
    rows = np.memmap(path, dtype=np.float32, mode="r+", offset=head.data_offset, shape=(int(head.n_elements),))
    rows[7 * 64:8 * 64] = np.nan  # token 7's row of the LM head: its logit is NaN at every position
    rows.flush()
    del rows
    with Model(path) as m, m.session(n_ctx=64, n_threads=2) as s, \
            Generator(s, max_tokens=4, drafter=drafter) as gen:
        with pytest.raises(SparrowError, match=r"logits\[7\] is NaN"):
            gen.generate([1, 5, 100])
