"""Will a model fit: the memory it needs (weights + one session's KV cache and scratch) against what is free."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..routing import GGUFHeader
from .errors import InsufficientMemoryError, StoreError


def available_memory() -> int:
    """Bytes of memory free for a model: SPARROW_MEMORY_LIMIT if set (a number of bytes, e.g. 8000000000 or 8e9;
    StoreError for anything else, NaN, infinity or a negative number included), else psutil's available memory."""
    limit = os.environ.get("SPARROW_MEMORY_LIMIT")
    if limit:
        try:
            value = float(limit)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise StoreError(f"SPARROW_MEMORY_LIMIT={limit[:80]!r} is not a number of bytes: set it to one, e.g. "
                             "8000000000 or 8e9, or unset it to use the memory that is free")
        return int(value)
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class MemoryNeeded:
    """What running a model takes: its weights and one session's state (KV cache + scratch) for n_ctx tokens."""

    weights: int   # bytes of the model file (mapped; repacked weights take about as much)
    state: int     # bytes of KV cache, scratch and statistics of one session
    n_ctx: int     # the context the state is for (0 resolved to the model's own, as the session does)
    exact: bool    # True: the native runtime's own figure; False: an estimate from the GGUF header


def memory_needed(path: Path, *, n_ctx: int, header: GGUFHeader | None = None, backend: str = "native",
                  n_threads: int = 0) -> MemoryNeeded:
    """The memory a model needs on `backend` with a context of n_ctx tokens (0: the model's own).

    On the native runtime the C library says what a session of these parameters allocates, exactly (the model is
    mapped to ask, without copying any weight). Elsewhere an estimate from the GGUF header: an F16 KV cache (llama.cpp's
    default) plus 64 MiB of scratch; without a header (ONNX), 64 MiB."""
    size = Path(path).stat().st_size
    if backend == "native":
        from ..native import Model

        with Model(path, repack=False) as model:
            mem = model.session_memory(n_ctx=n_ctx, n_threads=n_threads)
        return MemoryNeeded(size, mem.total_bytes, mem.n_ctx, exact=True)
    if header is None:
        return MemoryNeeded(size, 64 << 20, n_ctx, exact=False)
    n_ctx = n_ctx or header.arch_int("context_length", 2048)
    n_layer, n_embd = header.arch_int("block_count"), header.arch_int("embedding_length")
    n_head = header.arch_int("attention.head_count", 1) or 1
    n_head_kv = header.arch_int("attention.head_count_kv", n_head) or n_head
    k_dim = header.arch_int("attention.key_length", n_embd // n_head) or n_embd // n_head
    v_dim = header.arch_int("attention.value_length", k_dim) or k_dim
    kv = n_layer * n_ctx * n_head_kv * (k_dim + v_dim) * 2  # F16
    return MemoryNeeded(size, kv + (64 << 20), n_ctx, exact=False)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_memory(path: Path, *, n_ctx: int, header: GGUFHeader | None = None, backend: str = "native",
                 n_threads: int = 0) -> MemoryNeeded:
    """Raise InsufficientMemoryError if the model and one session for n_ctx tokens (0: the model's context) do not
    fit the free memory; else return what they need (memory_needed)."""
    free = available_memory()
    limit = " (SPARROW_MEMORY_LIMIT is set.)" if os.environ.get("SPARROW_MEMORY_LIMIT") else ""
    size = Path(path).stat().st_size
    if size > free:  # no need to ask the runtime about the session
        raise InsufficientMemoryError(
            f"{Path(path).name} needs at least {fmt_bytes(size)} for its weights alone, but only {fmt_bytes(free)} "
            "of memory is free. Close other programs, or pick a smaller model or quantization." + limit)
    need = memory_needed(path, n_ctx=n_ctx, header=header, backend=backend, n_threads=n_threads)
    if need.weights + need.state > free:
        raise InsufficientMemoryError(
            f"{Path(path).name} needs about {fmt_bytes(need.weights + need.state)} ({fmt_bytes(need.weights)} of "
            f"weights + {fmt_bytes(need.state)} of KV cache and scratch for {need.n_ctx} tokens), but only "
            f"{fmt_bytes(free)} of memory is free. Close other programs, use a smaller --ctx, or pick a smaller "
            "model or quantization." + limit)
    return need
