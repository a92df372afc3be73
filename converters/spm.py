"""SentencePiece vocabularies (tokenizer.model) as GGUF `tokenizer.ggml.*` arrays, the way llama.cpp writes them.

tokenizer.model is a protobuf `ModelProto`; the few fields needed are read from the wire format directly (no
protobuf dependency), and the file is also loaded with the `sentencepiece` package to reject corrupt files:
  ModelProto      1: repeated SentencePiece pieces, 3: NormalizerSpec normalizer_spec
  SentencePiece   1: string piece, 2: float score, 3: enum type (1 normal, 2 unknown, 3 control, 4 user defined,
                  5 unused, 6 byte; the same numbers as GGUF token types)
  NormalizerSpec  3: bool add_dummy_prefix (default true), 4: bool remove_extra_whitespaces (default true)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from . import ConversionError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int | None
    bos_id: int | None
    eos_id: int | None
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one protobuf message; value is int (varint/fixed) or bytes."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            if i + 8 > n:
                raise ValueError("truncated fixed64")
            yield field, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            length = varint()
            if i + length > n:
                raise ValueError("truncated length-delimited field")
            yield field, wire, buf[i:i + length]
            i += length
        elif wire == 5:
            if i + 4 > n:
                raise ValueError("truncated fixed32")
            yield field, wire, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"unknown wire type {wire}")


def load_spm(path: Path) -> SpmVocab:
    """Read a SentencePiece model file; ConversionError if it is missing or not a SentencePiece model."""
    if not path.is_file():
        raise ConversionError(f"{path.parent} has no tokenizer.model: BlockFFN checkpoints carry a SentencePiece "
                              f"tokenizer; copy tokenizer.model from the original model folder")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"{path} is not a SentencePiece model ({e})") from e
    tokens, scores, types = [], [], []
    add_dummy_prefix = remove_extra_ws = True
    try:
        for field, wire, value in _fields(path.read_bytes()):
            if field == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                tokens.append(piece)
                scores.append(score)
                types.append(kind)
            elif field == 3 and wire == 2:
                for f, w, v in _fields(value):
                    if f == 3 and w == 0:
                        add_dummy_prefix = bool(v)
                    elif f == 4 and w == 0:
                        remove_extra_ws = bool(v)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the SentencePiece model ({e})") from e
    if len(tokens) != sp.GetPieceSize() or any(t not in range(NORMAL, BYTE + 1) for t in types):
        raise ConversionError(f"{path}: the SentencePiece model is inconsistent ({len(tokens)} pieces read, "
                              f"{sp.GetPieceSize()} reported)")

    def opt(i: int) -> int | None:
        return i if i >= 0 else None

    return SpmVocab(tokens, scores, types, opt(sp.unk_id()), opt(sp.bos_id()), opt(sp.eos_id()),
                    add_dummy_prefix, remove_extra_ws)
