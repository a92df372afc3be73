"""Sparrow: an on-device runtime for sparse mixture-of-experts language models."""
from __future__ import annotations

import os as _os

# Developers may point at a CMake build folder holding a freshly built _sparrow module (see README, "Developing").
_dev_build = _os.environ.get("SPARROW_BUILD_DIR")
if _dev_build:
    __path__.insert(0, _os.path.abspath(_dev_build))  # type: ignore[name-defined]

from .native import (
    Generator,
    GeneratorStats,
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

__all__ = ["Generator", "GeneratorStats", "Model", "ModelInfo", "Sampler", "SamplerParams", "Session", "SparrowError",
           "complete", "devices", "generate", "generate_tokens"]
