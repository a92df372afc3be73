"""The BlockFFN converter as the model store uses it to pull and convert a checkpoint in one step
(`sparrow models pull hf:owner/repo --quant q4_0`): runtime/store/checkpoint.py's CheckpointConverter. The runtime may
not import the converters (docs/architecture.md), so the `sparrow` package registers BLOCKFFN with the store at
import. blockffn (and with it gguf) is imported on first use, not by `import sparrow`."""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path

from . import ConversionError


class BlockFFNForTheStore:
    refusal = ConversionError

    @property
    def quants(self) -> tuple[str, ...]:
        from .blockffn import QTYPES

        return tuple(QTYPES)

    @property
    def default_quant(self) -> str:
        """The converter's own default (blockffn.convert's qtype, as `sparrow convert` without --type)."""
        from .blockffn import convert

        return str(inspect.signature(convert).parameters["qtype"].default)

    def check(self, folder: Path) -> None:
        """config.json is a configuration the converter supports and tokenizer.model a SentencePiece model: what can
        be refused before the weights are downloaded (ConversionError says why)."""
        from .blockffn import parse_config
        from .hf import load_config
        from .spm import load_spm

        parse_config(load_config(folder), where=str(folder / "config.json"))
        load_spm(folder / "tokenizer.model")

    def convert(self, folder: Path, out: Path, quant: str, progress: bool) -> list[str]:
        """Convert folder to the GGUF file out (ConversionError for bad input, nothing written); the converter's
        notes (a matrix kept F16, ...)."""
        from .blockffn import ConversionWarning, convert

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConversionWarning)
            convert(folder, out, qtype=quant, progress=progress)
        for w in caught:  # any other warning goes on as it would have
            if not issubclass(w.category, ConversionWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]


BLOCKFFN = BlockFFNForTheStore()
