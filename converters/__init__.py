"""Converters: trained checkpoints to GGUF (and ONNX).

One module per architecture (`blockffn.py`), each with an explicit tensor name-mapping dict; `hf.py` reads
Hugging Face checkpoint folders (config.json, safetensors), `spm.py` reads SentencePiece vocabularies."""
from __future__ import annotations


class ConversionError(Exception):
    """A checkpoint that cannot be converted. The message says what is wrong and what to do about it."""


__all__ = ["ConversionError"]
