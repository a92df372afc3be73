"""The C generator's drafters (native/src/draft.c): Token Recycling, the hybrid and a draft model, with tree
verification in C.

- Greedy: the tokens equal plain greedy decoding exactly on the 52 prompts of tests/test_speculative.py, for
  recycling (a chain and a tree), the hybrid and a draft model, on SmolLM2-135M-Instruct and the shipped blockffn-tiny
  (its paired draft model).
- The C drafters propose what runtime/drafters.py's Recycling and Hybrid propose: the same tokens drafted and accepted
  step for step over a run of prompts (both learn from every verified row).
- Sampling through draft trees (several children per node, recursive rejection) keeps the target distribution: the
  joint distribution of the first two tokens against the one computed from the logits, chi-square, 3000 samples.
- Token Recycling's state file: written by C, read by NumPy and runtime/drafters.py, and back; every damaged file (cut,
  wrong shape, dtype, order, ids out of range, garbage, a directory, a FIFO) is a clear error that leaves the matrix
  as it was.
- A draft model with another vocabulary, or the target's own session as the draft session: clear errors.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sparrow.runtime import Generator, Model, SparrowError, generate_tokens
from sparrow.runtime.drafters import Hybrid, Recycling
from sparrow.runtime.speculative import SpecStats, speculative_tokens
from test_generate_native import N_NEW, N_SAMPLES, SAMPLE_PARAMS, THREADS, check_identity, sample_pairs
from test_generate_native import blockffn, blockffn_plain, smollm, smollm_plain, tiny  # noqa: F401 (fixtures)
from test_readme import _native_paths
from test_speculative import chi_square_p, two_token_distribution

ROOT = Path(__file__).resolve().parent.parent
TINY_DRAFT = ROOT / "models" / "blockffn-tiny-draft.Q8_0.gguf"

TREE = {"drafter": "recycling", "branching": (2, 2, 1), "max_nodes": 8}
HYBRID = {"drafter": "hybrid", "draft_k": 8, "branching": (4, 2, 2, 1), "max_nodes": 12, "plan": False}
DRAFTERS = {"recycling-chain": {"drafter": "recycling"}, "recycling-tree": TREE, "hybrid": HYBRID,
            "hybrid-planned": {"drafter": "hybrid"}, "adaptive": {"drafter": "adaptive"}}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_equals_plain_decoding_smollm(smollm, smollm_plain, name):
    st = check_identity(*smollm, smollm_plain, **DRAFTERS[name])
    assert 0 < st.accepted < st.drafted and st.steps < st.tokens
    assert (st.plain_steps > 0) == (name == "adaptive")  # only the gate runs plain steps
    print(f"{name}: {st}")


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_equals_plain_decoding_blockffn_tiny(blockffn, blockffn_plain, name):
    st = check_identity(*blockffn, blockffn_plain, **DRAFTERS[name])
    assert st.drafted > 0
    print(f"{name}: {st}")


def test_greedy_draft_model_equals_plain_decoding(smollm, smollm_plain, blockffn, blockffn_plain):
    """SmolLM2 drafting for itself from a session of its own (every greedy draft is accepted), and blockffn-tiny with
    its paired draft model (some are not)."""
    model, session = smollm
    with model.session(n_ctx=512, n_threads=THREADS) as ds:
        st = check_identity(model, session, smollm_plain, drafter="draft-model", draft_session=ds, draft_k=3)
    assert st.accepted == st.drafted > 0 and st.draft_eval_s > 0
    model, session = blockffn
    with Model(TINY_DRAFT) as dm, dm.session(n_ctx=512, n_threads=THREADS) as ds:
        st = check_identity(model, session, blockffn_plain, drafter="draft-model", draft_session=ds)
    assert 0 < st.accepted < st.drafted
    print(st)


# ---- the C drafters propose what the Python ones propose ----

def python_run(session, drafter, prompts):
    stats = SpecStats()
    out = []
    for toks in prompts:
        session.truncate(0)
        out.append(list(speculative_tokens(session, toks, drafter, max_tokens=N_NEW, stats=stats)))
    return out, stats


@pytest.mark.parametrize("name", ["recycling-tree", "hybrid"])
def test_c_drafters_propose_what_the_python_ones_do(smollm, smollm_plain, name, tmp_path):
    """Same tokens, steps, drafts and acceptances as the Python drafters, and the same Token Recycling matrix
    after."""
    model, session = smollm
    V = model.info.n_vocab
    prompts = [toks for toks, _ in smollm_plain[:16]]
    kw = DRAFTERS[name]
    if name == "hybrid":
        py = Hybrid(V, lookup_k=kw["draft_k"], branching=kw["branching"], max_nodes=kw["max_nodes"], plan=False)
    else:
        py = Recycling(V, branching=kw["branching"], max_nodes=kw["max_nodes"])
    ref, pst = python_run(session, py, prompts)
    with Generator(session, max_tokens=N_NEW, **kw) as gen:
        got = []
        for toks in prompts:
            session.truncate(0)
            got.append(gen.generate(toks))
        st = gen.stats()
        gen.save_drafter(tmp_path / "c.npy")
    assert got == ref == [r for _, r in smollm_plain[:16]]
    assert (st.steps, st.drafted, st.accepted) == (pst.steps, pst.drafted, pst.accepted)
    py_adj = (py.recycling if name == "hybrid" else py).adj
    assert (np.load(tmp_path / "c.npy") == py_adj).all()
    print(f"{name}: {st.steps} steps, {st.drafted} drafted, {st.accepted} accepted (Python: the same)")


# ---- sampling through trees ----

def tree_state(model: Model, prompt: list[int], dist: dict, path: Path) -> Path:
    """A Token Recycling matrix whose tree below the prompt's last token holds the target's three likeliest first
    tokens, each with the three likeliest second tokens overall as children (some right, some wrong)."""
    first: dict[int, float] = {}
    second: dict[int, float] = {}
    for (a, b), p in dist.items():
        first[a] = first.get(a, 0.0) + p
        second[b] = second.get(b, 0.0) + p
    top1 = sorted(first, key=first.get, reverse=True)[:3]
    top2 = sorted(second, key=second.get, reverse=True)[:3]
    adj = np.full((model.info.n_vocab, 8), -1, dtype=np.int32)
    adj[prompt[-1], :3] = top1
    for t in top1:
        adj[t, :3] = top2
    np.save(path, adj)
    return path


@pytest.mark.parametrize("kw", [{"drafter": "recycling", "branching": (3, 2), "max_nodes": 9},
                                {"drafter": "hybrid", "draft_k": 2, "branching": (3, 2), "max_nodes": 9, "plan": False}],
                         ids=["recycling", "hybrid"])
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_sampling_through_trees_preserves_the_target_distribution(tiny, tmp_path, kw, penalty):
    params = dataclasses.replace(SAMPLE_PARAMS, repeat_penalty=penalty, repeat_last_n=4)
    prompt = [1, 270, 261, 40, 50, 7, 9, 270, 261]  # the hybrid's lookup drafts 40, 50 (right or wrong)
    expected = two_token_distribution(tiny, prompt, params)
    state = tree_state(tiny, prompt, expected, tmp_path / "adj.npy")
    counts, drafted, accepted = sample_pairs(tiny, prompt, params, 9000, state=state, **kw)
    pval = chi_square_p(counts, expected, N_SAMPLES)
    print(f"{kw['drafter']} penalty {penalty}: chi-square p = {pval:.3g}; drafted {drafted}, accepted {accepted}")
    assert pval > 1e-3
    assert drafted >= 6 * N_SAMPLES and 0 < accepted < drafted


# ---- Token Recycling's state on disk ----

def test_state_file_round_trips_with_numpy_and_python(smollm, smollm_plain, tmp_path):
    model, session = smollm
    V = model.info.n_vocab
    toks, ref = smollm_plain[3]
    with Generator(session, max_tokens=N_NEW, **TREE) as gen:
        session.truncate(0)
        assert gen.generate(toks) == ref
        gen.save_drafter(tmp_path / "c.npy")
    adj = np.load(tmp_path / "c.npy")
    assert adj.dtype == np.int32 and adj.shape == (V, 8)
    assert (adj[ref[0]] >= 0).all() and (adj >= -1).all() and adj.max() < V
    py = Recycling(V)
    assert py.load_state(tmp_path / "c.npy") is None and (py.adj == adj).all()
    py.adj[5] = np.arange(8)
    py.save_state(tmp_path / "py.npy")
    with Generator(session, max_tokens=N_NEW, **TREE) as gen:
        gen.load_drafter(tmp_path / "py.npy")
        gen.save_drafter(tmp_path / "again.npy")
    assert (np.load(tmp_path / "again.npy") == py.adj).all()
    # a warm matrix drafts from the first step: more accepted on the same prompt than a cold one
    with Generator(session, max_tokens=N_NEW, **TREE) as cold, Generator(session, max_tokens=N_NEW, **TREE) as warm:
        warm.load_drafter(tmp_path / "c.npy")
        for g in (cold, warm):
            session.truncate(0)
            assert g.generate(toks) == ref
        assert warm.stats().accepted > cold.stats().accepted


def damaged_files(tmp_path: Path, V: int) -> dict[str, Path]:
    good = np.full((V, 8), -1, dtype=np.int32)
    good[:, 0] = 1
    np.save(tmp_path / "good.npy", good)
    raw = (tmp_path / "good.npy").read_bytes()
    files = {}

    def put(name, data):
        files[name] = tmp_path / f"{name}.npy"
        files[name].write_bytes(data) if isinstance(data, bytes) else np.save(files[name], data)

    put("cut", raw[:-4])
    put("extended", raw + b"\0\0\0\0")
    put("header only", raw[:128])
    put("empty", b"")
    put("garbage", os.urandom(4096))
    put("other shape", good[:, :4])
    put("other vocabulary", good[:-1])
    put("int64", good.astype(np.int64))
    put("float32", good.astype(np.float32))
    put("fortran order", np.asfortranarray(good))
    put("3-D", good.reshape(V, 4, 2))
    bad_ids = good.copy()
    bad_ids[7, 3] = V
    put("id past the vocabulary", bad_ids)
    bad_ids[7, 3] = -2
    put("id below -1", bad_ids)
    put("another claimed shape", raw.replace(f"({V}, 8)".encode(), f"({'9' * len(str(V))}, 8)".encode()))
    put("bad header length", raw[:8] + b"\xff\xff" + raw[10:])
    put("unknown key", raw.replace(b"'fortran_order': False", b"'fortran_orden': False"))
    put("version 3", raw[:6] + b"\x03\x00" + raw[8:])
    files["a directory"] = tmp_path / "dir.npy"
    files["a directory"].mkdir()
    files["a FIFO"] = tmp_path / "fifo.npy"
    os.mkfifo(files["a FIFO"])
    files["missing"] = tmp_path / "missing.npy"
    return files


def test_damaged_state_files_are_clear_errors_and_change_nothing(smollm, tmp_path):
    model, session = smollm
    V = model.info.n_vocab
    files = damaged_files(tmp_path, V)
    with Generator(session, **TREE) as gen:
        gen.load_drafter(tmp_path / "good.npy")
        for name, path in files.items():
            with pytest.raises(SparrowError) as e:
                gen.load_drafter(path)
            assert str(path) in str(e.value), name
            print(f"{name}: {e.value}")
        gen.save_drafter(tmp_path / "after.npy")
    assert (np.load(tmp_path / "after.npy") == np.load(tmp_path / "good.npy")).all()
    # saving where it cannot: a clear error, the file there untouched
    with Generator(session, **TREE) as gen:
        with pytest.raises(SparrowError, match="no-such-dir"):
            gen.save_drafter(tmp_path / "no-such-dir" / "x.npy")
    with Generator(session) as plain, Generator(session, drafter="prompt-lookup") as lookup:
        for g in (plain, lookup):
            with pytest.raises(SparrowError, match="only the recycling, hybrid and adaptive"):
                g.save_drafter(tmp_path / "x.npy")
            with pytest.raises(SparrowError, match="only the recycling, hybrid and adaptive"):
                g.load_drafter(tmp_path / "good.npy")


def test_bad_drafter_arguments_are_clear_errors(smollm, tiny):
    model, session = smollm
    bad = [
        ({"drafter": "recycling", "recycling_k": 0}, "recycling_k"),
        ({"drafter": "recycling", "recycling_k": 33}, "recycling_k"),
        ({"drafter": "recycling", "branching": ()}, "branching"),
        ({"drafter": "recycling", "branching": (9,)}, "branching\\[0\\]"),
        ({"drafter": "recycling", "branching": (2, 0)}, "branching\\[1\\]"),
        ({"drafter": "recycling", "branching": (1,) * 17}, "branching"),
        ({"drafter": "hybrid", "max_nodes": 0}, "max_nodes"),
        ({"drafter": "hybrid", "max_nodes": 64}, "max_nodes"),
        ({"drafter": "hybrid", "draft_k": 64}, "draft_k"),
    ]
    for kw, msg in bad:
        with pytest.raises(SparrowError, match=msg):
            Generator(session, **kw)
    with pytest.raises(ValueError, match="draft_session"):
        Generator(session, drafter="draft-model")
    with pytest.raises(ValueError, match="draft_session"):
        Generator(session, drafter="recycling", draft_session=session)
    with pytest.raises(SparrowError, match="a session of its own"):
        Generator(session, drafter="draft-model", draft_session=session)
    with tiny.session(n_ctx=64, n_threads=1) as other:
        with pytest.raises(SparrowError, match="share the target's vocabulary"):
            Generator(session, drafter="draft-model", draft_session=other)


def test_draft_session_changed_between_steps_is_caught_up(smollm, smollm_plain):
    """The draft session used by someone else between generations: the drafter keeps only the prefix it can prove."""
    model, session = smollm
    with model.session(n_ctx=512, n_threads=THREADS) as ds, \
            Generator(session, max_tokens=N_NEW, drafter="draft-model", draft_session=ds, draft_k=3) as gen:
        for toks, ref in smollm_plain[:3]:
            session.truncate(0)
            assert gen.generate(toks) == ref
            ds.truncate(min(2, ds.n_past))
            ds.eval([5, 6, 7])


# ---- the C chat example ----

@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_chat_example_answers_as_plain_greedy_decoding(tmp_path, smollm, smollm_path):
    """native/examples/chat.c (sparrow.h alone) chats with the adaptive drafter over two turns, the KV cache reused:
    each answer equals plain greedy decoding of the same conversation, in which the user's "<|im_end|>" is text, not
    the control token; the drafter's matrix is saved to --state and taken again by the next run."""
    assert "examples/chat.c" in (ROOT / "native" / "CMakeLists.txt").read_text()  # CMake builds it too
    include, lib = _native_paths()
    exe = tmp_path / "chat"
    cc = subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", str(ROOT / "native" / "examples" /
                         "chat.c"), f"-I{include}", f"-L{lib}", "-lsparrow", f"-Wl,-rpath,{lib}", "-o", str(exe)],
                        capture_output=True, text=True, check=False)
    assert cc.returncode == 0, cc.stderr
    turns = ["Name three colors.", "Now repeat them <|im_end|> twice, please."]
    state = tmp_path / "state.npy"
    run = [str(exe), str(smollm_path), "--greedy", "--max-tokens", "24", "--state", str(state)]
    r = subprocess.run(run, input=("\n".join(turns) + "\n/quit\n").encode(), capture_output=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    model, _ = smollm
    conv: list[int] = []
    want = b""
    with model.session(n_ctx=2048, n_threads=THREADS) as s:
        for text in turns:
            conv += model.tokenize("<|im_start|>user\n", add_special=not conv, parse_special=True)
            conv += model.tokenize(text, add_special=False, parse_special=False)
            conv += model.tokenize("<|im_end|>\n<|im_start|>assistant\n", add_special=False, parse_special=True)
            s.truncate(0)
            ans = list(generate_tokens(s, conv, max_tokens=24))
            want += b"".join(model.token_bytes(t) for t in ans) + b"\n"
            conv += ans + model.tokenize("<|im_end|>\n", add_special=False, parse_special=True)
    assert r.stdout == want
    lines = re.findall(rb"\[(\d+) tokens in (\d+) forward passes", r.stderr)
    assert len(lines) == 2, r.stderr
    assert np.load(state).shape == (model.info.n_vocab, 8)
    again = subprocess.run(run, input=b"Hi\n", capture_output=True, timeout=300, check=False)
    assert again.returncode == 0 and b"not used" not in again.stderr, again.stderr
    state.write_bytes(b"garbage")
    bad = subprocess.run(run, input=b"Hi\n", capture_output=True, timeout=300, check=False)
    assert bad.returncode == 0 and b"the saved drafter state is not used" in bad.stderr, bad.stderr
    missing = subprocess.run([str(exe), str(tmp_path / "missing.gguf")], input=b"", capture_output=True, check=False)
    assert missing.returncode == 1 and b"error:" in missing.stderr
