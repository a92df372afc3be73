"""Sparrow: an on-device runtime for sparse mixture-of-experts language models, with speculative decoding.

`import sparrow` is the Python API:

    import sparrow
    backend = sparrow.load("smollm2-135m-instruct")          # pulls a known model on first use, like `sparrow chat`
    chat = sparrow.Chat(backend, system="You are concise.")
    print("".join(chat.send("Why is the sky blue?")))

    with sparrow.Model("model.gguf") as model, model.session(n_ctx=2048) as session:   # the native runtime itself
        print(sparrow.complete(model, session, "Once upon a time", max_tokens=32))

The subpackages, one per layer above the C core (docs/architecture.md):
    sparrow.runtime       the library: Model/Session over the C binding, model store, routing, backends, drafters
    sparrow.converters    trained checkpoints to GGUF
    sparrow.bench_device  device benchmarks and tuning (`sparrow bench`)
    sparrow.training      the recipe that trains the shipped models (optional extra `train`)
    sparrow.models        the shipped models' files and cards
In the repository these live at the top level (runtime/, converters/, ...); pyproject.toml maps them under sparrow/.
"""
from __future__ import annotations

from .converters.store import BLOCKFFN as _BLOCKFFN
from .runtime import (
    Model,
    ModelInfo,
    Sampler,
    SamplerParams,
    Session,
    SparrowError,
    complete,
    devices,
    generate,
    generate_tokens,
)
from .runtime.backends import Backend, BackendError, Chat, ContextFullError, GenerationStats, stream_text
from .runtime.launch import RunSettings, load
from .runtime.store import Store, StoreError
from .runtime.store.checkpoint import register_converter as _register_converter

# `sparrow models pull hf:owner/repo` converts a checkpoint with the BlockFFN converter: the runtime may not import
# the converters (docs/architecture.md), so the package that holds both connects them.
_register_converter(_BLOCKFFN)

__all__ = ["Backend", "BackendError", "Chat", "ContextFullError", "GenerationStats", "Model", "ModelInfo",
           "RunSettings", "Sampler", "SamplerParams", "Session", "SparrowError", "Store", "StoreError", "complete",
           "devices", "generate", "generate_tokens", "load", "stream_text"]
