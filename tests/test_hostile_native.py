"""Hostile input at the native layer: what a crafted GGUF or an odd path must not do (issue 13).

- a 90 KB BPE token whose characters stand for no byte detokenizes to a piece bounded by a small multiple of its
  length (llama.cpp's unknown-byte fallback repeats the whole token per character: 2.7 GB);
- C messages and model names quoting GGUF strings that are not UTF-8 reach Python as SparrowError / str with U+FFFD,
  never as UnicodeDecodeError;
- a path with a NUL is refused (C would open the part before it); only regular files are opened: a FIFO would block
  forever, a device such as /dev/zero is refused before any read;
- the files that the fuzzers (native/fuzz/) found crashing, under tests/fuzz_regressions/, load without a crash.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import package_root
from tiny_llama import TinyConfig, write_tiny_llama

gguf = pytest.importorskip("gguf")
from sparrow.runtime import Model, SparrowError, _sparrow

REGRESSIONS = Path(__file__).parent / "fuzz_regressions"


def _bpe_vocab(path: Path, tokens: list[str], *, arch: str = "llama", name: str | None = None) -> Path:
    """A vocabulary-only GPT-2 BPE GGUF: tokens + "<|end|>" (control), merges "a b"."""
    w = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        w.add_name(name)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    toks = ["a", "b", "ab", *tokens, "<|end|>"]
    w.add_token_list(toks)
    w.add_token_types([1] * (len(toks) - 1) + [3])
    w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def _patch_string(path: Path, key: str, old: str, new: bytes) -> None:
    """Replace the string value of KV `key` (same length) with raw bytes, e.g. bytes that are not UTF-8."""
    data = path.read_bytes()
    old_b = old.encode()
    assert len(new) == len(old_b)
    k = key.encode()
    at = data.index(len(k).to_bytes(8, "little") + k + (8).to_bytes(4, "little") + len(old_b).to_bytes(8, "little"))
    at += 8 + len(k) + 4 + 8
    assert data[at:at + len(old_b)] == old_b
    path.write_bytes(data[:at] + new + data[at + len(new):])


# ---------------------------------------------------------------- item 8: the unknown-byte fallback

def test_long_bpe_token_of_unknown_bytes_detokenizes_to_a_bounded_piece(tmp_path):
    big = "中" * 30_000  # 90 KB; U+4E2D stands for no byte in GPT-2's byte map
    path = _bpe_vocab(tmp_path / "v.gguf", [big, "x中y"])
    voc = _sparrow.testing.Vocab(str(path))
    tok = 3
    status, (need, _) = voc.piece_capacity(tok, False, 0)  # the size only: nothing is allocated for it
    assert status == "SP_ERR_INVALID_ARG"
    assert need <= 22 * len(big.encode()), f"a {len(big.encode())}-byte token needs a {need}-byte piece"
    piece = voc.token_to_piece(tok, False)
    assert len(piece) == need
    # the first unknown character carries the token text as llama.cpp writes it, the others only their bytes
    first = b"[UNK_BYTE_0xe4b8ad" + big.encode() + b"]"
    assert piece == first + b"[UNK_BYTE_0xe4b8ad]" * (len(big) - 1)
    # a token with one such character reads as in llama.cpp: "x", the marker with the token text, "y"
    assert voc.token_to_piece(4, False) == b"x[UNK_BYTE_0xe4b8adx\xe4\xb8\xady]y"
    with Model(path, vocab_only=True) as m:
        assert m.token_bytes(tok) == piece


# ---------------------------------------------------------------- GGUF strings that are not UTF-8

def test_non_utf8_gguf_strings_reach_python_as_replacement_characters(tmp_path):
    path = _bpe_vocab(tmp_path / "v.gguf", [], arch="zzzzz", name="NAMEX")
    _patch_string(path, "general.architecture", "zzzzz", b"\xff\xfezzz")
    _patch_string(path, "general.name", "NAMEX", b"N\xffMEX")
    with pytest.raises(SparrowError, match="architecture '\ufffd\ufffdzzz' is not implemented"):
        Model(path)  # the weights' load quotes the architecture in its message
    with Model(path, vocab_only=True) as m:
        assert m.info.name == "N\ufffdMEX"
        assert m.info.architecture == "\ufffd\ufffdzzz"


def test_validator_messages_with_non_utf8_bytes_are_str(tmp_path):
    path = _bpe_vocab(tmp_path / "v.gguf", [])
    _patch_string(path, "tokenizer.ggml.pre", "gpt-2", b"\xffpt-2")
    status, msg = _sparrow.testing.vocab_validate_bytes(path.read_bytes())
    assert status == "SP_ERR_UNSUPPORTED" and "\ufffd" in msg


# ---------------------------------------------------------------- paths

def test_a_path_with_nul_is_refused_not_truncated(tmp_path):
    real = write_tiny_llama(tmp_path / "a", TinyConfig())
    with pytest.raises(SparrowError, match="NUL"):
        Model(str(real) + "\0b")
    with Model(real) as m:  # the file itself is fine
        assert m.info.n_layer == 2


def _load_in_child(path: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom sparrow.runtime import Model, SparrowError\n"
            "try:\n    Model(sys.argv[1])\nexcept SparrowError as e:\n    print('refused:', e)\n")
    try:
        return subprocess.run([sys.executable, "-c", code, path], cwd=package_root(), capture_output=True, text=True,
                              timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Model({path!r}) blocked for 60 s")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    r = _load_in_child(str(fifo))
    assert r.returncode == 0, r.stderr
    assert "refused: SP_ERR_IO" in r.stdout and "not a regular file" in r.stdout, r.stdout


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "dir", "link-to-zero"])
def test_special_files_are_refused(tmp_path, special):
    if special == "dir":
        special = str(tmp_path)
    elif special == "link-to-zero":
        (tmp_path / "m.gguf").symlink_to("/dev/zero")
        special = str(tmp_path / "m.gguf")
    with pytest.raises(SparrowError, match="not a regular file"):
        Model(special)


# ---------------------------------------------------------------- what the fuzzers found (tests/fuzz_regressions)

def test_fuzz_regression_inputs_are_kept():
    """Each saved crash input of tools/fuzz.sh (replayed by it before fuzzing) has its Python reproduction below."""
    saved = sorted(p.relative_to(REGRESSIONS).as_posix() for p in REGRESSIONS.glob("*/*"))
    assert saved == sorted(FUZZ_FINDINGS), "a crash input without a test here, or a test without its input"


FUZZ_FINDINGS = {
    "sampler/tiny-repeat-penalty-nan-probs": "a repeat penalty near 0 turned a logit into +inf: NaN probabilities",
}


@pytest.mark.parametrize("penalty", [1e-38, 1e-45, 3e38])
def test_extreme_repeat_penalty_keeps_a_distribution(penalty):
    """fuzz_sampler: repeat_penalty 1e-31 divided a positive logit to +inf, so the softmax computed inf - inf and
    every probability was NaN (sample() then returned an arbitrary token)."""
    logits = np.linspace(-30, 30, 51).astype(np.float32)
    s = _sparrow.Sampler(51, temperature=1.5, top_k=15, top_p=1.0, min_p=0.0, repeat_penalty=penalty,
                         repeat_last_n=5)
    for t in (21, 20, 3, 49, 50):
        s.accept(t)
    ids, probs = s.candidates(logits)
    assert np.all(np.isfinite(probs)) and np.all(probs >= 0) and abs(float(probs.sum()) - 1) < 1e-5, probs
    assert s.sample(logits) in set(ids.tolist())
