"""Backend routing: which engine runs a model file, and why.

    native       GGUF files whose architecture the C runtime implements (NATIVE_ARCHITECTURES)
    llama.cpp    other GGUF architectures, through llama-cpp-python (optional extra: pip install 'sparrow[llamacpp]')
    onnxruntime  .onnx models (Sparrow's exports: `sparrow convert MODEL.gguf OUT.onnx`), through onnxruntime

SPARROW_BACKEND=llama.cpp forces llama-cpp-python for any GGUF (to compare the two on one model).

The GGUF header is read here with a small, bounds-checked parser over an mmap (the full gguf.GGUFReader takes
seconds on a 49k-token vocabulary; routing and `sparrow models info` need only the scalar metadata and tensor table).
"""
from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import _sparrow

# What the C loader implements (sp_supported_architectures), asked of the library itself.
NATIVE_ARCHITECTURES = frozenset(_sparrow.supported_architectures())

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types (gguf spec, GGUFValueType)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 26    # 64 MiB: larger strings are taken as corruption
_MAX_COUNT = 1 << 32


class ModelFormatError(ValueError):
    """The file is not a model Sparrow can read (bad magic, truncated, inconsistent header)."""


@dataclass
class GGUFHeader:
    """What routing and the model store need from a GGUF file: scalar/string metadata and the tensor table."""

    version: int
    metadata: dict[str, object]             # scalars and strings; arrays are summarised as ("array", n)
    n_tensors: int
    data_offset: int                        # first byte of tensor data
    data_end: int                           # one past the last tensor byte the table describes
    file_size: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> number of tensors

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def quantization(self) -> str:
        import gguf

        ft = self.metadata.get("general.file_type")
        if isinstance(ft, int):
            try:
                return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_")
            except ValueError:
                pass
        if self.tensor_types:  # the most common tensor type
            return max(self.tensor_types, key=self.tensor_types.__getitem__)
        return "unknown"

    def arch_int(self, key: str, default: int = 0) -> int:
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        return int(value) if isinstance(value, (int, float)) else default

    def attention(self) -> dict | None:
        """The attention kind and the F16 KV cache bytes per token over all layers, from the metadata (the sizes
        the native runtime allocates: grouped-query keys and values, or MLA's latent and rope key); None when the
        metadata does not say."""
        L, NH = self.arch_int("block_count"), self.arch_int("attention.head_count")
        if L <= 0 or NH <= 0:
            return None
        if self.metadata.get(f"{self.architecture}.attention.type") == "mla":
            per_layer = self.arch_int("attention.kv_lora_rank") + self.arch_int("rope.dimension_count")
            return {"kind": "mla", "kv_bytes_per_token": L * per_layer * 2}
        H, NKV = self.arch_int("embedding_length"), self.arch_int("attention.head_count_kv", NH)
        return {"kind": "gqa" if NKV < NH else "mha", "kv_bytes_per_token": L * 2 * NKV * (H // NH) * 2}


class _Cursor:
    def __init__(self, buf: memoryview | mmap.mmap, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise ModelFormatError(f"truncated GGUF header (needs byte {self.pos + n}, file has {self.size})")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str):
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise ModelFormatError(f"GGUF string of {n} bytes at offset {self.pos}: the file is corrupt")
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if n > _MAX_COUNT:
                raise ModelFormatError(f"GGUF array of {n} elements: the file is corrupt")
            if etype in _SCALARS:
                self.take(n * struct.calcsize(_SCALARS[etype]))
            elif etype == _STRING:
                for _ in range(n):
                    self.take(min(self.unpack("<Q"), _MAX_STRING + 1))
            else:
                raise ModelFormatError(f"GGUF array of unsupported element type {etype}")
            return ("array", n)
        raise ModelFormatError(f"unknown GGUF value type {vtype}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse the GGUF header and tensor table; raise ModelFormatError if the file is not a complete GGUF."""
    import gguf

    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise ModelFormatError(f"{path} is not a GGUF model file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm, size)
        if mm[:4] != GGUF_MAGIC:
            raise ModelFormatError(f"{path} is not a GGUF model file (magic {bytes(mm[:4])!r})")
        c.take(4)
        version = c.unpack("<I")
        if version not in (2, 3):
            raise ModelFormatError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise ModelFormatError(f"{path}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys)")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = c.string()
            metadata[key] = c.value(c.unpack("<I"))
        data_end = 0
        tensor_types: dict[str, int] = {}
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            if n_dims > 4:
                raise ModelFormatError(f"{path}: tensor {name!r} has {n_dims} dimensions")
            n_elems = 1
            for _ in range(n_dims):
                n_elems *= c.unpack("<Q")
            ttype, offset = c.unpack("<I"), c.unpack("<Q")
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelFormatError(f"{path}: tensor {name!r} has unknown type {ttype}") from None
            tensor_types[qtype.name] = tensor_types.get(qtype.name, 0) + 1
            data_end = max(data_end, offset + n_elems // block * type_size)
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ModelFormatError(f"{path}: bad general.alignment {alignment!r}")
        data_offset = (c.pos + alignment - 1) // alignment * alignment
    header = GGUFHeader(version, metadata, n_tensors, data_offset, data_offset + data_end, size, tensor_types)
    if header.data_end > size:
        raise ModelFormatError(f"{path} is truncated: its tensors need {header.data_end} bytes, the file has {size} "
                               "(an interrupted download?); pull it again")
    return header


@dataclass(frozen=True)
class Route:
    """The backend chosen for a model file, why, and whether it can run here."""

    backend: str        # "native", "llama.cpp" or "onnxruntime"
    reason: str
    available: bool
    problem: str = ""   # what to do when not available


def model_format(path: str | Path) -> str:
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    with open(path, "rb") as f:
        if f.read(4) == GGUF_MAGIC:
            return "gguf"
    raise ModelFormatError(f"{path} is neither a GGUF nor an ONNX model")


def choose_backend(path: str | Path, header: GGUFHeader | None = None) -> Route:
    """Decide which backend runs the model at path."""
    if model_format(path) == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return Route("onnxruntime", "ONNX model", False, "onnxruntime is not installed: pip install onnxruntime")
        return Route("onnxruntime", "ONNX model, run by onnxruntime", True)
    arch = (header or read_gguf_header(path)).architecture
    forced = os.environ.get("SPARROW_BACKEND", "")
    if forced == "llama.cpp" and importlib.util.find_spec("llama_cpp") is not None:
        return Route("llama.cpp", "SPARROW_BACKEND=llama.cpp asks for llama-cpp-python", True)
    if arch in NATIVE_ARCHITECTURES:
        return Route("native", f"GGUF architecture {arch!r} is implemented by Sparrow's native runtime", True)
    reason = (f"GGUF architecture {arch!r} is not implemented natively "
              f"(native: {', '.join(sorted(NATIVE_ARCHITECTURES))}); llama-cpp-python runs it")
    if importlib.util.find_spec("llama_cpp") is None:
        return Route("llama.cpp", reason, False,
                     "llama-cpp-python is not installed: pip install llama-cpp-python")
    return Route("llama.cpp", reason, True)
