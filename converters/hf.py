"""Reading Hugging Face checkpoint folders: config.json and safetensors weights (one file or sharded by an index).

The safetensors format is read directly (8-byte little-endian header length, a JSON header, then raw data) and
memory-mapped, so BF16 checkpoints (the released BlockFFN dtype, which numpy has no type for) load as float32 and
nothing is read until a tensor is asked for."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}  # BF16: raw bits, widened
_MAX_HEADER = 100 << 20


def load_config(src: Path) -> dict:
    """config.json of a checkpoint folder as a dict, or a ConversionError saying what is missing."""
    if not src.exists():
        raise ConversionError(f"{src} does not exist: pass the folder of a Hugging Face checkpoint")
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder: pass the checkpoint folder (with config.json, "
                              f"model.safetensors and tokenizer.model), not a single file")
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json: this is not a Hugging Face checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); re-download or repair it") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsCheckpoint:
    """The tensors of a checkpoint folder: `names`, `shape(name)`, `dtype(name)`, `get(name)` -> float32 array."""

    def __init__(self, src: Path):
        self.src = src
        self._entries: dict[str, _Entry] = {}
        index = src / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ConversionError(f"{index} is not a valid safetensors index ({e})") from e
            for name in files:
                if not isinstance(name, str) or Path(name).name != name:
                    raise ConversionError(f"{index} names the weights file {name!r}: only files beside the index "
                                          f"can be read")
        elif (src / SAFETENSORS_SINGLE).is_file():
            files = [SAFETENSORS_SINGLE]
        else:
            torch_files = sorted(p.name for p in src.glob("pytorch_model*.bin"))
            hint = (f" It has {', '.join(torch_files)}: re-save it as safetensors first, e.g. with transformers: "
                    f"model.save_pretrained(dst, safe_serialization=True).") if torch_files else ""
            raise ConversionError(f"{src} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}.{hint}")
        for name in files:
            self._read_header(src / name)

    def _read_header(self, path: Path) -> None:
        if not path.is_file():
            raise ConversionError(f"weights file {path} is missing (named by {SAFETENSORS_INDEX})")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path} is truncated: not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ConversionError(f"{path}: header length {n} is impossible; the file is corrupt or truncated")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: safetensors header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: the safetensors header must be a JSON object, found "
                                  f"{type(header).__name__}; the file is corrupt")
        data_start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise ConversionError(f"{path}: bad header entry for tensor {name!r}") from err
            if not all(type(v) is int and v >= 0 for v in (*shape, b, e)):  # bool is not an int here
                raise ConversionError(f"{path}: tensor {name!r} has a shape or data offsets that are not "
                                      f"non-negative integers; the file is corrupt")
            if dtype not in _DTYPES:
                raise ConversionError(f"{path}: tensor {name!r} has dtype {dtype}; only F32, F16, BF16 and F64 "
                                      f"weights can be converted")
            count = math.prod(shape)  # exact: a product that overflows 64 bits must not wrap to something small
            if not (0 <= b <= e and data_start + e <= size and e - b == count * np.dtype(_DTYPES[dtype]).itemsize):
                raise ConversionError(f"{path}: tensor {name!r} has data offsets that disagree with its shape or "
                                      f"run past the end of the file; the file is corrupt or truncated")
            if name in self._entries:
                raise ConversionError(f"tensor {name!r} appears in both {self._entries[name].file} and {path}")
            self._entries[name] = _Entry(path, dtype, shape, data_start + b, data_start + e)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        return self._entries[name].dtype

    def get(self, name: str) -> np.ndarray:
        """The tensor as a float32 array (BF16 and F16 widened exactly)."""
        e = self._entries[name]
        raw = np.memmap(e.file, dtype=_DTYPES[e.dtype], mode="r", offset=e.begin, shape=e.shape or (1,))
        if e.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = np.asarray(raw, dtype=np.float32)
        return out.reshape(e.shape)
