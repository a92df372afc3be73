"""Sparrow's tokenizer (native/src/vocab.c, tokenize_bpe.c, tokenize_spm.c) against llama.cpp on the same GGUF.

(a) the real SmolLM2 GGUF (GPT-2 byte-level BPE, pre-tokenizer "smollm") on a varied corpus;
(b) a SentencePiece ("llama") vocabulary trained here on Python's standard library sources, written into a tiny
    random llama GGUF, compared with llama.cpp and with sentencepiece itself.
The tokenizer is reached through `_sparrow.testing.Vocab` (GGUF -> vocabulary, no weights). Only the comparisons with
llama.cpp skip without llama-cpp-python (the `*_ref` fixtures); round trips, capacity and the comparisons with
sentencepiece run regardless."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizer_corpus import CORPUS

_sparrow = pytest.importorskip("sparrow.runtime._sparrow")

Vocab = _sparrow.testing.Vocab

BAD_UTF8 = [b"\xff\xfe bad bytes", b"truncated \xe4\xbd", b"\xc3( lone lead", b"\x80\x80 continuation",
            b"surrogate \xed\xa0\x80 x", b"ok \xe2\x82 half euro \xe2\x82\xac"]


def _llama_cpp():
    return pytest.importorskip("llama_cpp")


def _llama(path: Path):
    """llama.cpp's tokenizer for a GGUF (vocab_only: no weights, no compute); skips without llama-cpp-python."""
    return _llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)


def _ref_piece(ref, token: int, special: bool) -> bytes:
    """llama.cpp's piece through the C API (Llama.detokenize drops pieces longer than its 32-byte buffer)."""
    import ctypes

    llama_cpp = _llama_cpp()
    buf = (ctypes.c_char * 1024)()
    n = llama_cpp.llama_token_to_piece(llama_cpp.llama_model_get_vocab(ref.model), token, buf, 1024, 0, special)
    assert n >= 0
    return bytes(buf[:n])


# ---------------------------------------------------------------- (a) SmolLM2: byte-level BPE, "smollm" pre-tokenizer

@pytest.fixture(scope="module")
def smol(smollm_path):
    return Vocab(str(smollm_path))


@pytest.fixture(scope="module")
def smol_ref(smollm_path):
    return _llama(smollm_path)


@pytest.mark.parametrize("parse_special", [False, True])
@pytest.mark.parametrize("add_special", [False, True])
def test_bpe_ids_match_llama_cpp(smol, smol_ref, add_special, parse_special):
    ours, ref = smol, smol_ref
    mismatches = []
    for text in CORPUS:
        data = text.encode()
        a = ours.tokenize(data, add_special, parse_special)
        b = ref.tokenize(data, add_bos=add_special, special=parse_special)
        if a != b:
            mismatches.append((text, a, b))
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} differ, first: {mismatches[0]}"


def test_bpe_invalid_utf8_matches_llama_cpp(smol, smol_ref):
    ours, ref = smol, smol_ref
    for data in BAD_UTF8:
        assert ours.tokenize(data, False, False) == ref.tokenize(data, add_bos=False, special=False), data


def _random_texts(seed: int, n: int) -> list[bytes]:
    """Seeded random mixtures of the pieces that stress pre-tokenizers: spaces, newlines, digits, apostrophes,
    punctuation, letters of several scripts, marks, emoji, special-token markup and (safe) invalid bytes."""
    rng = np.random.default_rng(seed)
    atoms = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "'", "'s", "'T", "'re", "'LL", "0", "7", "123", "٣",
             "½", "a", "Z", "é", "ß", "ж", "中", "の", "한", "ا", "\u0301", "🎉", "👍🏽", ".", ",", "!", "$", "+", "<", "|",
             "_", "-", "#", "(", ")", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool>", "word", "Word"]
    out = []
    for _ in range(n):
        parts = [atoms[i] for i in rng.integers(0, len(atoms), rng.integers(1, 40))]
        data = "".join(parts).encode()
        if rng.random() < 0.2:
            pos = int(rng.integers(0, len(data) + 1))
            data = data[:pos] + bytes([0xFF, 0xC3, 0x80, 0xE4][int(rng.integers(0, 4))]) + data[pos:]
        out.append(data)
    return out


def test_bpe_random_texts_match_llama_cpp(smol, smol_ref):
    ours, ref = smol, smol_ref
    for data in _random_texts(1, 400):
        for special in (False, True):
            assert ours.tokenize(data, False, special) == ref.tokenize(data, add_bos=False, special=special), data


def test_bpe_long_text_matches_llama_cpp(smol, smol_ref):
    """A few KB of real source text (this repository's C code) and all corpus strings glued together."""
    ours, ref = smol, smol_ref
    src = Path(__file__).resolve().parent.parent / "native" / "src" / "vocab.c"
    for data in (src.read_bytes()[:6000], "\n".join(CORPUS).encode()):
        assert ours.tokenize(data, False, True) == ref.tokenize(data, add_bos=False, special=True)


def test_bpe_special_tokens(smol, smol_ref):
    ours, ref = smol, smol_ref
    ids = ours.tokenize(b"<|im_start|>user\nhi<|im_end|>", False, True)
    assert ids[0] == 1 and ids[-1] == 2
    assert 1 not in ours.tokenize(b"<|im_start|>user", False, False)  # not parsed: plain characters
    assert ours.bos == 1 and ours.eos == 2 and not ours.add_bos
    assert ours.eot == 2  # "<|im_end|>" (llama.cpp picks among candidates in hash-map order)
    eog = {i for i in range(ours.n_tokens) if ours.is_eog(i)}
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(ref.model)
    assert eog == {i for i in range(ours.n_tokens) if llama_cpp.llama_vocab_is_eog(vocab, i)}


def test_bpe_pieces_match_llama_cpp(smol, smol_ref):
    ours, ref = smol, smol_ref
    n = ours.n_tokens
    for tok in list(range(300)) + list(range(n - 300, n)) + list(range(300, n - 300, 97)):
        for special in (False, True):
            assert ours.token_to_piece(tok, special) == _ref_piece(ref, tok, special), tok


@pytest.mark.parametrize("text", CORPUS)
def test_bpe_round_trip(smol, text):
    ours = smol
    ids = ours.tokenize(text.encode(), False, True)
    assert b"".join(ours.token_to_piece(t, True) for t in ids) == text.encode()


def test_bpe_speed(smol):
    ours = smol
    data = "\n".join(CORPUS).encode()[:4096]
    ours.tokenize(data, False, True)
    best = min(_timed(lambda: ours.tokenize(data, False, True)) for _ in range(5))
    assert best < 0.02, f"4 KB took {best * 1e3:.1f} ms"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_capacity_contract(smol):
    ours = smol
    text = b"Hello world, this is a test"
    full = ours.tokenize(text, False, False)
    n = len(full)
    status, (n_out, buf) = ours.tokenize_capacity(text, False, False, n)
    assert status == "SP_OK" and n_out == n and buf[:n] == full and buf[n] == -7
    status, (n_out, buf) = ours.tokenize_capacity(text, False, False, n - 2)
    assert status == "SP_ERR_INVALID_ARG" and n_out == n and all(x == -7 for x in buf[n - 2:])
    status, (n_out, _) = ours.tokenize_capacity(text, False, False, 0)
    assert status == "SP_ERR_INVALID_ARG" and n_out == n
    status, (n_out, _) = ours.tokenize_capacity(b"", False, False, 0)
    assert status == "SP_OK" and n_out == 0

    tok = full[1]
    piece = ours.token_to_piece(tok, False)
    status, (need, raw) = ours.piece_capacity(tok, False, len(piece) - 1)
    assert status == "SP_ERR_INVALID_ARG" and need == len(piece) and raw[len(piece) - 1:] == b"#" * 4
    status, (need, raw) = ours.piece_capacity(tok, False, len(piece))
    assert status == "SP_OK" and raw[:need] == piece
    with pytest.raises(Exception, match="INVALID_ARG"):
        ours.token_to_piece(ours.n_tokens, False)
    with pytest.raises(Exception, match="INVALID_ARG"):
        ours.token_to_piece(-1, False)


# ---------------------------------------------------------------- the other pre-tokenizers, on SmolLM2's vocabulary

@pytest.fixture(scope="module")
def smol_vocab_arrays(smollm_path):
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(smollm_path))

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode() for i in f.data]

    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    return strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges"), types


@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama3", "dbrx", "qwen2", "starcoder"])
def test_other_pretokenizers_match_llama_cpp(tmp_path, smol_vocab_arrays, pre):
    """SmolLM2's tokens and merges under another tokenizer.ggml.pre: exercises each hand-written splitter."""
    gguf = pytest.importorskip("gguf")
    tokens, merges, types = smol_vocab_arrays
    path = tmp_path / f"{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    _add_tiny_llama(w, len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = Vocab(str(path)), _llama(path)
    texts = [t.encode() for t in CORPUS] + _random_texts(3, 150)
    for data in texts:
        for add_special, special in ((False, False), (True, True)):
            assert ours.tokenize(data, add_special, special) == ref.tokenize(data, add_bos=add_special,
                                                                             special=special), (pre, data)


def _add_tiny_llama(w, n_vocab: int) -> None:
    """Hyper-parameters and random weights of a 1-layer llama, enough for llama.cpp to load the file."""
    n_embd, n_ff, n_head = 32, 64, 4
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    rng = np.random.default_rng(0)

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(n_embd, np.float32))
    for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd, n_embd)), ("attn_v", (n_embd, n_embd)),
                        ("attn_output", (n_embd, n_embd)), ("ffn_gate", (n_ff, n_embd)),
                        ("ffn_up", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff))):
        t(f"blk.0.{name}.weight", *shape)


# ---------------------------------------------------------------- (b) SentencePiece "llama" vocabulary

def _training_text() -> str:
    """Docstrings and comments of a few pure-Python standard library modules."""
    libdir = Path(os.path.dirname(os.__file__))
    parts = []
    for name in ("textwrap.py", "argparse.py", "difflib.py", "fractions.py", "calendar.py", "string.py",
                 "heapq.py", "bisect.py", "shlex.py", "csv.py"):
        f = libdir / name
        if f.exists():
            parts.append(f.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def _write_spm_gguf(path: Path, sp, *, add_space_prefix: bool = True) -> None:
    gguf = pytest.importorskip("gguf")
    n_vocab = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        elif tokens[-1] in ("<tool>", "<|sep|>"):
            types.append(4)  # the user-defined symbols given to the trainer
        else:
            types.append(1)
    w = gguf.GGUFWriter(str(path), "llama")
    _add_tiny_llama(w, n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    spm_lib = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    text = d / "train.txt"
    text.write_text(_training_text(), encoding="utf-8")
    spm_lib.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(d / "m"), vocab_size=1200, model_type="bpe", byte_fallback=True,
        character_coverage=0.9995, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=False, user_defined_symbols=["<tool>", "<|sep|>"],
        max_sentence_length=1 << 16, minloglevel=2, num_threads=2)
    sp = spm_lib.SentencePieceProcessor(model_file=str(d / "m.model"))
    path = d / "spm.gguf"
    _write_spm_gguf(path, sp)
    return Vocab(str(path)), sp, path


@pytest.fixture(scope="module")
def spm_ref(spm):
    return _llama(spm[2])


@pytest.mark.parametrize("parse_special", [False, True])
@pytest.mark.parametrize("add_special", [False, True])
def test_spm_ids_match_llama_cpp(spm, spm_ref, add_special, parse_special):
    ours, ref = spm[0], spm_ref
    extra = ["<tool>call<tool>", "a <|sep|> b", "<s>hi</s>", "<unk>"]
    mismatches = []
    for text in CORPUS + extra:
        data = text.encode()
        a = ours.tokenize(data, add_special, parse_special)
        b = ref.tokenize(data, add_bos=add_special, special=parse_special)
        if a != b:
            mismatches.append((text, a, b))
    assert not mismatches, f"{len(mismatches)} differ, first: {mismatches[0]}"


def test_spm_random_texts_match_llama_cpp(spm, spm_ref):
    ours, ref = spm[0], spm_ref
    for data in _random_texts(2, 400):
        for special in (False, True):
            assert ours.tokenize(data, True, special) == ref.tokenize(data, add_bos=True, special=special), data


def test_spm_invalid_utf8_matches_llama_cpp(spm, spm_ref):
    ours, ref = spm[0], spm_ref
    for data in BAD_UTF8:
        assert ours.tokenize(data, True, False) == ref.tokenize(data, add_bos=True, special=False), data


def test_spm_ids_match_sentencepiece(spm):
    ours, sp, _ = spm
    skip = ("<tool>", "<|sep|>", "<s>", "</s>", "<unk>")  # sentencepiece treats markup differently
    checked = 0
    for text in CORPUS:
        if not text or any(s in text for s in skip):
            continue
        assert ours.tokenize(text.encode(), False, False) == sp.encode(text), text
        checked += 1
    assert checked > 50


def test_spm_pieces_match_llama_cpp(spm, spm_ref):
    ours = spm[0]
    for tok in range(ours.n_tokens):
        for special in (False, True):
            assert ours.token_to_piece(tok, special) == _ref_piece(spm_ref, tok, special), tok


def test_spm_round_trip(spm):
    ours = spm[0]
    for text in CORPUS:
        if not text or text.startswith(" "):
            continue
        ids = ours.tokenize(text.encode(), False, False)
        out = b"".join(ours.token_to_piece(t, False) for t in ids)
        assert out == b" " + text.encode(), text  # the space prefix SentencePiece adds


def test_spm_specials(spm):
    ours, sp, _ = spm
    assert ours.bos == sp.bos_id() and ours.eos == sp.eos_id() and ours.add_bos
    assert ours.is_eog(sp.eos_id()) and not ours.is_eog(sp.bos_id())
    assert ours.tokenize(b"", True, False) == [sp.bos_id()]
    assert ours.tokenize(b"", False, False) == []


# ---------------------------------------------------------------- bad metadata

def _vocab_gguf(tmp_path: Path, **kw) -> bytes:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(kw.get("model", "gpt2"))
    if kw.get("pre", "gpt-2") is not None:
        w.add_tokenizer_pre(kw.get("pre", "gpt-2"))
    toks = kw.get("tokens", ["a", "b", "ab", "<|end|>"])
    w.add_token_list(toks)
    w.add_token_types(kw.get("types", [1] * (len(toks) - 1) + [3]))
    if kw.get("merges", ["a b"]) is not None:
        w.add_token_merges(kw.get("merges", ["a b"]))
    for key, val in kw.get("ids", {}).items():
        w.add_uint32(key, val)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path.read_bytes()


def test_good_tiny_bpe_vocab(tmp_path):
    status, msg = _sparrow.testing.vocab_validate_bytes(_vocab_gguf(tmp_path))
    assert status == "SP_OK", msg


@pytest.mark.parametrize("kw, status, words", [
    ({"ids": {"tokenizer.ggml.eos_token_id": 4}}, "SP_ERR_BAD_FORMAT", "eos_token_id"),
    ({"ids": {"tokenizer.ggml.bos_token_id": 1 << 31}}, "SP_ERR_BAD_FORMAT", "bos_token_id"),
    ({"merges": ["a c"]}, "SP_ERR_BAD_FORMAT", "merge"),
    ({"merges": ["ab"]}, "SP_ERR_BAD_FORMAT", "merge"),
    ({"merges": None}, "SP_ERR_BAD_FORMAT", "merges"),
    ({"types": [1, 1]}, "SP_ERR_BAD_FORMAT", "token_type"),
    ({"tokens": ["a", "b", "a", "<|end|>"]}, "SP_ERR_BAD_FORMAT", "same text"),
    ({"model": "t5"}, "SP_ERR_UNSUPPORTED", "t5"),
    ({"pre": "no-such-pre"}, "SP_ERR_UNSUPPORTED", "no-such-pre"),
])
def test_bad_vocab_metadata(tmp_path, kw, status, words):
    got, msg = _sparrow.testing.vocab_validate_bytes(_vocab_gguf(tmp_path, **kw))
    assert got == status and words in msg, msg


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
