"""Golden tests for the models Sparrow ships in models/ (trained by training/, cards in models/*.md).

- Greedy output of each shipped model for three fixed prompts (24 tokens) must not change. Regenerate (only when a
  model is deliberately retrained) with: SPARROW_BUILD_DIR=... PYTHONPATH=tests python tests/test_shipped_models.py
- The native runtime's logits on prompt + golden continuation match tests/reference/blockffn.py's BlockFFNGGUFRef
  (the same dequantized Q8_0 weights): NMSE < 1e-4 (measured 1.4-3.8e-5 on the ref, avx2 and avx512 tiers: the
  runtime quantizes activations to 8 bits per 32-element block); the reference's argmax equals the golden greedy
  token wherever the reference's top-2 margin exceeds 0.05.
- Sparsity measured by the native runtime stays near the card's figures (models/results.json, measured on 16384
  tokens of the validation split): on the first 4096 tokens of that split as Python 3.11's standard library gives it,
  committed in tests/fixtures/val_text.txt (the start of aifc.py as training.corpus cleans it), so that it is checked
  on every Python: TLS and CLS-8 within 0.03 of the card, and within 2e-3 of what they measure on that text today
  (0.8021, 0.7590); and on the local Python's own validation split, as the card measured it, where that split is long
  enough (another Python version gives a slightly different split).
- The store lists both without a download, and the files match their registry checksums.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from reference.blockffn import BlockFFNGGUFRef
from sparrow.runtime.native import Model, Sampler, SamplerParams, complete

MODELS = Path(__file__).resolve().parent.parent / "models"
RESULTS = json.loads((MODELS / "results.json").read_text())
NAMES = ["blockffn-tiny", "blockffn-tiny-draft"]
PROMPTS = ['# file: json/tool.py\n"""', "import os\nimport sys\n\n\ndef main():\n", 'class Parser:\n    """']
N_TOKENS = 24

GOLDEN: dict[str, list[str]] = {  # greedy, N_TOKENS tokens, from the native runtime (see __main__ below)
    'blockffn-tiny': [
        '\n\n# Samiresres\n#\n#\n#\n#\n#\n#\n#\n#',
        '    """Return a file object.\n\n    This is a file object.\n\n    This is a file object',
        'Abstract base class class for Python 2.\n\n\n    This class is a Python 2.\n\n',
    ],
    'blockffn-tiny-draft': [
        '\n\nimport sys\nimport sys\nimport sys\nimport sys\nimport sys\nimport sys\nimport sys\nimport',
        '    """Return the path of the path.\n\n    """\n    if os.path.path.path(',
        '\n\n    """\n    """\n    """\n    """\n    import sys\n    import sys\n    import',
    ],
}


def path_of(name: str) -> Path:
    return MODELS / RESULTS[name]["file"]


def greedy(model: Model, prompt: str) -> str:
    return complete(model, prompt, max_tokens=N_TOKENS, sampler=Sampler(model.info.n_vocab, SamplerParams.greedy()),
                    n_ctx=256, n_threads=1)


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((a - ref) ** 2) / np.var(ref))


@pytest.mark.parametrize("name", NAMES)
def test_greedy_output_is_fixed(name):
    with Model(path_of(name)) as model:
        assert [greedy(model, p) for p in PROMPTS] == GOLDEN[name]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_reference(name):
    ref = BlockFFNGGUFRef.from_gguf(path_of(name))
    with Model(path_of(name)) as model:
        for prompt, golden in zip(PROMPTS, GOLDEN[name]):
            n_prompt = len(model.tokenize(prompt))
            gen = []
            with model.session(n_ctx=256, n_threads=1) as s:  # the greedy tokens themselves, one at a time
                logits = s.prefill(model.tokenize(prompt))
                for _ in range(N_TOKENS):
                    gen.append(int(np.argmax(logits)))
                    if model.is_eog(gen[-1]):
                        break
                    logits = s.eval([gen[-1]])
            tokens = model.tokenize(prompt) + gen
            assert model.detokenize(gen[:len(gen) - model.is_eog(gen[-1])]) == golden
            with model.session(n_ctx=256, n_batch=64, n_threads=1) as s:
                ours = s.eval(tokens, logits="all")
            want, _ = ref.forward(tokens)
            assert nmse(ours, want) < 1e-4, prompt
            top2 = np.sort(want, axis=-1)[:, -2:]
            sure = (top2[:, 1] - top2[:, 0] > 0.05)[n_prompt - 1:len(tokens) - 1]
            ref_next = np.argmax(want, axis=-1)[n_prompt - 1:len(tokens) - 1]
            assert np.all(ref_next[sure] == np.array(gen[:len(ref_next)])[sure]), prompt


def validation_tokens(model: Model, limit: int) -> list[int]:
    from sparrow.training.corpus import build_corpus

    out: list[int] = []
    for d in build_corpus().val:
        out += model.tokenize(d.text)
        if len(out) >= limit:
            break
    return out[:limit]


VAL_TEXT = Path(__file__).resolve().parent / "fixtures" / "val_text.txt"
VAL_TEXT_SPARSITY = {"blockffn-tiny": (0.8020973205566406, 0.759002685546875)}  # TLS, CLS-8 measured on VAL_TEXT


def windowed_sparsity(model: Model, tokens: list[int], ctx: int = 256):
    """The session's sparsity counters after windows of ctx tokens, each from an empty cache, in batches of 64."""
    with model.session(n_ctx=ctx, n_batch=64, n_threads=0) as s:
        for i in range(len(tokens) // ctx):
            s.truncate(0)
            for j in range(0, ctx, 64):
                s.eval(tokens[i * ctx + j:i * ctx + j + 64], logits="none")
        return s.sparsity()


def test_sparsity_on_the_committed_text_matches_card():
    r = RESULTS["blockffn-tiny"]
    with Model(path_of("blockffn-tiny")) as model:
        toks = model.tokenize(VAL_TEXT.read_text())
        assert len(toks) > 4096
        st = windowed_sparsity(model, toks[:4096])
    assert st.n_tokens == 4096
    assert abs(st.tls - r["native_tls"]) < 0.03 and abs(st.cls[8] - r["native_cls8"]) < 0.03, (st.tls, st.cls[8])
    tls, cls8 = VAL_TEXT_SPARSITY["blockffn-tiny"]
    assert abs(st.tls - tls) < 2e-3 and abs(st.cls[8] - cls8) < 2e-3, (st.tls, st.cls[8])
    assert st.cls[8] > RESULTS["blockffn-tiny-ablation"]["native_cls8"] + 0.05  # the chunk objectives raise CLS-8


def test_sparsity_matches_card():
    r = RESULTS["blockffn-tiny"]
    n = r["native_val_tokens"]
    with Model(path_of("blockffn-tiny")) as model:
        toks = validation_tokens(model, n + 1)
        if len(toks) < n:
            pytest.skip("this Python's standard library gives a shorter validation split than the card's (the "
                        "committed text is checked by test_sparsity_on_the_committed_text_matches_card)")
        st = windowed_sparsity(model, toks[:n])
    assert abs(st.tls - r["native_tls"]) < 0.03 and abs(st.cls[8] - r["native_cls8"]) < 0.03, (st.tls, st.cls[8])
    ab = RESULTS["blockffn-tiny-ablation"]
    assert st.cls[8] > ab["native_cls8"] + 0.05  # the chunk objectives visibly raise CLS-8


def test_store_lists_shipped_models(tmp_path, monkeypatch):
    from sparrow.runtime.store import REGISTRY, Store

    monkeypatch.setenv("SPARROW_HOME", str(tmp_path))
    listed = {m.name: m for m in Store().list(shipped=True)}
    assert Store().list() == []  # list() alone: pulled models only
    for name in NAMES:
        assert name in listed and listed[name].architecture == "blockffn" and listed[name].quantization == "Q8_0"
        p = Store().resolve(name)
        assert p.name == path_of(name).name and p.stat().st_size == REGISTRY[name].size  # the repo's or the wheel's
        assert hashlib.sha256(p.read_bytes()).hexdigest() == REGISTRY[name].sha256
    assert listed["blockffn-tiny"].drafter == "blockffn-tiny-draft"
    assert not (tmp_path / "models").exists()  # nothing was downloaded or copied


def test_generate_defaults_to_the_adaptive_drafter(tmp_path, monkeypatch):
    """Without --draft or tuned settings, every model runs the adaptive drafter (issue 23: which drafter pays depends
    on the device, so only a measurement on it, `sparrow bench --tune`, picks a fixed one); output = plain greedy."""
    from click.testing import CliRunner
    from sparrow.cli import sparrow
    from sparrow.runtime.launch import DEFAULT_DRAFTER, default_drafter

    monkeypatch.setenv("SPARROW_HOME", str(tmp_path))
    assert DEFAULT_DRAFTER == "adaptive"
    assert default_drafter("blockffn-tiny")[0] == default_drafter("smollm2-135m-instruct")[0] == DEFAULT_DRAFTER
    outs = {}
    for draft in ([], ["--draft", "none"]):
        r = CliRunner().invoke(sparrow, ["generate", "-m", "blockffn-tiny", "--json", "--temperature", "0",
                                         "--max-tokens", "24", *draft, PROMPTS[1]], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        out = json.loads(r.output.strip().splitlines()[-1])
        outs[out["draft"]] = out["text"]
    assert set(outs) == {"adaptive", "none"} and outs["adaptive"] == outs["none"]


if __name__ == "__main__":  # print the golden outputs of the current files
    for name in NAMES:
        with Model(path_of(name)) as m:
            print(f"    {name!r}: {[greedy(m, p) for p in PROMPTS]!r},")
