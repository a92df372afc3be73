"""The native runtime against its oracles on the same real GGUF (SmolLM2-135M-Instruct Q4_1): the numpy float64
reference of tests/reference/llama.py, and llama.cpp (llama-cpp-python).

Both engines quantize activations to 8 bits for the quantized matmuls (llama.cpp also rounds the activation scales to
F16 and keeps its KV cache in F16), and they sum in different orders, so logits agree closely but not bit for bit.
Measured on this model (normalized MSE: mean squared difference / variance of the oracle's logits): Sparrow vs the
float64 reference 5.6e-4 on the test's prompt, Sparrow vs llama.cpp 1.6e-3 on its own. Bounds, a few times above:
- vs the float64 reference at every position: NMSE < 2e-3; vs llama.cpp: NMSE < 5e-3; wherever the top-1 token
  differs, the two tokens are a near tie in the oracle's logits (gap < 0.5);
- greedy continuations of 64 tokens: where one differs, at the first differing step the two candidate tokens must be a
  near tie in llama.cpp's own logits (gap < 0.5), i.e. a summation-order effect (7 of the 22 were identical).
(The reference rounding as the runtime does, tests/test_tiny_models.py, does not help on a 30-layer model: float32
against float64 moves activations across rounding steps, and those differences grow through the layers.)
Only the tests that run llama.cpp skip without llama-cpp-python.
"""
from __future__ import annotations

import numpy as np
import pytest
from reference.llama import LlamaRef
from sparrow.runtime import Model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
    "import numpy as np\nx = np.",
    "1, 2, 3, 4, 5,",
    "Photosynthesis is the process by which",
    "In 1969, Neil Armstrong",
    "Dear Sir or Madam,\n\nI am writing to",
    "SELECT name FROM users WHERE",
    "The three primary colors are",
    "Water boils at",
    "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "Le chat est",
    "A list of fruits:\n- apple\n-",
    "To be or not to be,",
    "HTTP status code 404 means",
    "for (int i = 0; i < n; i++) {",
    "The mitochondria is",
    "Question: Why is the sky blue?\nAnswer:",
]
N_GEN = 64


@pytest.fixture(scope="module")
def model(smollm_path):
    with Model(smollm_path) as m:
        yield m


@pytest.fixture(scope="module")
def llm(smollm_path):
    """llama.cpp on the same file; tests that use it carry the llama_cpp mark (each runs in a forked child, so a crash
    in llama.cpp fails only that test), and only they skip without llama-cpp-python."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm_path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True,
                          verbose=False)
    yield llm
    llm.close()


def llama_logits_all(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.mark.llama_cpp
def test_logits_match_llama_cpp_at_every_position(llm, model):
    text = ("<|im_start|>user\nExplain how a transistor works, in two sentences.<|im_end|>\n<|im_start|>assistant\n"
            "A transistor is a semiconductor device that")
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    ref = llama_logits_all(llm, tokens)
    with model.session(n_ctx=512, n_threads=2) as s:
        ours = s.eval(tokens, logits="all")
    nmse, top1 = compare(ours, ref)
    print(f"vs llama.cpp: nmse={nmse:.2e} top1 agreement={top1:.3f} over {len(tokens)} positions")
    assert nmse < 5e-3


def test_logits_match_float64_reference_at_every_position(model, smollm_path):
    tokens = model.tokenize("<|im_start|>user\nName three rivers in Europe.<|im_end|>\n<|im_start|>assistant\n",
                            parse_special=True)
    ref = LlamaRef.from_gguf(str(smollm_path)).forward(tokens)
    with model.session(n_ctx=128, n_threads=2) as s:
        ours = s.eval(tokens, logits="all")
    nmse, top1 = compare(ours, ref)
    print(f"vs float64 reference: nmse={nmse:.2e} top1 agreement={top1:.3f} over {len(tokens)} positions")
    assert nmse < 2e-3


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """NMSE and top-1 agreement; asserts that wherever the top-1 tokens differ, they are a near tie in the oracle's
    logits (gap < 0.5), the only place rounding may flip them."""
    assert ours.shape == ref.shape
    nmse = float(np.mean((ours - ref) ** 2) / np.var(ref))
    a, b = ours.argmax(-1), ref.argmax(-1)
    for pos in np.flatnonzero(a != b):
        gap = float(ref[pos, b[pos]] - ref[pos, a[pos]])
        assert gap < 0.5, f"position {pos}: top-1 differs with an oracle margin of {gap:.3f}"
    return nmse, float(np.mean(a == b))


def test_chunked_prefill_equals_one_batch(model):
    """Evaluating a prompt in chunks (with the KV cache) gives the same logits as in one batch."""
    tokens = model.tokenize("The history of the printing press begins in the fifteenth century, when")
    with model.session(n_ctx=256, n_threads=2) as a, model.session(n_ctx=256, n_threads=2, n_batch=4) as b:
        full = a.eval(tokens, logits="all")
        parts = [b.eval(tokens[i:i + 4], logits="all") for i in range(0, len(tokens), 4)]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=2e-3 * np.abs(full).max())


def _greedy_llama(llm, tokens: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    llm.reset()
    llm.eval(tokens)
    out, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tok = int(row.argmax())
        out.append(tok)
        logits.append(row)
        llm.eval([tok])
    return out, logits


def _greedy_native(model, tokens: list[int], n: int) -> list[int]:
    with model.session(n_ctx=512, n_threads=2) as s:
        logits = s.prefill(tokens)
        out = []
        for _ in range(n):
            tok = int(logits.argmax())
            out.append(tok)
            logits = s.eval([tok])
    return out


@pytest.mark.llama_cpp
def test_greedy_continuations_match_llama_cpp(llm, model, smollm_path):
    """Greedy continuations agree with llama.cpp's token for token until a near tie. At the first differing step the
    two candidates must be within 0.5 logits of each other both in Sparrow's logits and in the exact (float64)
    model's, i.e. the fork is a tie the exact function barely breaks, and rounding (activation quantization, F16
    KV cache, summation order) decides it differently in each engine; it is not an error of either. llama.cpp's own
    gap is reported, not bounded: its rounding is not Sparrow's to check (seen: exact 0.48, Sparrow 0.04, llama.cpp
    0.66)."""
    exact = LlamaRef.from_gguf(str(smollm_path))
    identical, forks, prefix_lengths = 0, [], []
    for prompt in PROMPTS:
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        ref, ref_logits = _greedy_llama(llm, tokens, N_GEN)
        ours = _greedy_native(model, tokens, N_GEN)
        if ours == ref:
            identical += 1
            prefix_lengths.append(N_GEN)
            continue
        i = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
        prefix_lengths.append(i)
        gap_llama = float(ref_logits[i][ref[i]] - ref_logits[i][ours[i]])
        row = exact.forward(tokens + ref[:i])[-1]
        gap_exact = float(abs(row[ref[i]] - row[ours[i]]))
        with model.session(n_ctx=512, n_threads=2) as s:
            mine = s.eval(tokens + ref[:i], logits="last")
        gap_ours = float(mine[ours[i]] - mine[ref[i]])
        forks.append((prompt, i, round(gap_ours, 3), round(gap_exact, 3), round(gap_llama, 3)))
        assert gap_ours < 0.5 and gap_exact < 0.5, f"{prompt!r}: fork at step {i} is not a near tie: {forks[-1]}"
    print(f"identical {identical}/{len(PROMPTS)}, mean agreeing prefix {np.mean(prefix_lengths):.1f}/{N_GEN} tokens; "
          f"forks (prompt, step, Sparrow gap, exact gap, llama.cpp gap): {forks}")
