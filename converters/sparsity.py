"""The sparsity a converted BlockFFN model carries in its metadata, in GGUF and ONNX alike: measured TLS and CLS-8
on a calibration text, and the draft model it pairs with.

    blockffn.sparsity.tls           float32  token-level sparsity: fraction of (token, expert) pairs off
    blockffn.sparsity.cls_8         float32  chunk-level sparsity over 8 consecutive tokens (the union left off)
    blockffn.sparsity.tokens        uint32   calibration tokens measured (0: not measured; the floats are then NaN)
    sparrow.draft_model             string   the paired draft model (a store name or file name), when given

Measured with the native runtime (runtime.native: the same router the runtime runs) over CALIBRATION, a fixed mix
of English prose and Python, so figures from different conversions compare. A GGUF gets the keys written with
placeholders and filled in place once the finished file has been measured (GGUFReader in "r+" mode: the values
have fixed sizes), before it is renamed into place. The ONNX export copies them into metadata_props
"sparrow.sparsity" (JSON), measuring the source GGUF itself when it has none.
"""
from __future__ import annotations

import math
import os

TLS_KEY = "blockffn.sparsity.tls"
CLS_KEY = "blockffn.sparsity.cls_8"
TOKENS_KEY = "blockffn.sparsity.tokens"
DRAFT_KEY = "sparrow.draft_model"
MAX_TOKENS = 256

CALIBRATION = (
    "The river runs through the old town and past the market, where farmers sell bread, cheese and apples every "
    "Saturday morning. In winter the water freezes near the bridge, and children skate there after school while "
    "their parents talk about the weather, the prices and the news from the capital.\n\n"
    "def moving_average(values, window):\n"
    "    \"\"\"Return the averages of each run of `window` consecutive values.\"\"\"\n"
    "    if window <= 0:\n"
    "        raise ValueError('window must be positive')\n"
    "    total = sum(values[:window])\n"
    "    out = [total / window]\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        out.append(total / window)\n"
    "    return out\n\n"
    "Scientists measured the temperature of the lake for ten years and found that the surface warmed faster than "
    "the deep water, which changed when the fish came up to feed and how long the ice lasted each spring."
)


def measure(gguf_path: str | os.PathLike, text: str = CALIBRATION) -> dict[str, float | int]:
    """TLS and CLS-8 of a BlockFFN GGUF over the calibration text (at most MAX_TOKENS tokens), by the native runtime."""
    from ..runtime.native import Model

    with Model(gguf_path) as model, model.session(n_ctx=MAX_TOKENS + 8, n_threads=1) as session:
        tokens = model.tokenize(text, add_special=True)[:MAX_TOKENS]
        session.prefill(tokens)
        st = session.sparsity()
    if st is None:
        raise ValueError(f"{gguf_path} has no sparse-expert layers")
    return {"tls": float(st.tls), "cls_8": float(st.cls.get(8, math.nan)), "tokens": int(st.n_tokens)}


def add_placeholders(writer, draft_model: str | None) -> None:
    """The keys, to be filled by fill_in_place once the file is written."""
    writer.add_float32(TLS_KEY, math.nan)
    writer.add_float32(CLS_KEY, math.nan)
    writer.add_uint32(TOKENS_KEY, 0)
    if draft_model:
        writer.add_string(DRAFT_KEY, draft_model)


def fill_in_place(path: str | os.PathLike, figures: dict[str, float | int]) -> None:
    """Write measured figures into the placeholders of a finished GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    for key, value in ((TLS_KEY, figures["tls"]), (CLS_KEY, figures["cls_8"]), (TOKENS_KEY, figures["tokens"])):
        field = reader.fields[key]
        field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader


def from_fields(fields: dict[str, object]) -> dict[str, object]:
    """What a GGUF's metadata says (fields: GGUFReader contents by key); {} without measured figures."""
    out: dict[str, object] = {}
    tokens = fields.get(TOKENS_KEY)
    if isinstance(tokens, int) and tokens > 0:
        out = {"tls": float(fields[TLS_KEY]), "cls_8": float(fields[CLS_KEY]), "tokens": tokens}
    if isinstance(fields.get(DRAFT_KEY), str):
        out["draft_model"] = fields[DRAFT_KEY]
    return out


def describe(figures: dict[str, object]) -> str:
    if "tls" not in figures:
        return "not measured"
    text = f"TLS {100 * figures['tls']:.1f}%, CLS-8 {100 * figures['cls_8']:.1f}% over {figures['tokens']} tokens"
    return text + (f"; paired draft model {figures['draft_model']}" if figures.get("draft_model") else "")

