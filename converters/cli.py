"""`sparrow convert SRC OUT`: the click command (the lead hooks `convert_command` into the CLI group).

OUT's type picks the format: OUT.gguf from a Hugging Face checkpoint folder, BlockFFN (converters/blockffn.py) or
llama-family (converters/llama.py), told apart by config.json; OUT.onnx from a llama or blockffn GGUF file
(converters/onnx_export.py) or from either kind of checkpoint folder (through a temporary F32 GGUF)."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import click

from . import ConversionError
from . import llama as llama_converter
from .blockffn import QTYPES, ConversionWarning, convert
from .hf import load_config
from .onnx_export import FFN_KINDS, WEIGHT_TYPES, export_onnx


def checkpoint_to_gguf(src: str, out: str | Path, *, qtype: str, overwrite: bool = False, progress: bool = True,
                       draft_model: str | None = None) -> Path:
    """A Hugging Face checkpoint folder to GGUF by its config: llama-family (converters/llama.py) or BlockFFN."""
    if llama_converter.is_llama(load_config(Path(src))):
        return llama_converter.convert(src, out, qtype=qtype, overwrite=overwrite, progress=progress)
    return convert(src, out, qtype=qtype, overwrite=overwrite, progress=progress, draft_model=draft_model)


def to_onnx(src: str, out: str, *, weights: str, ffn: str, overwrite: bool, progress: bool,
            draft_model: str | None = None) -> Path:
    """SRC (a GGUF file or a BlockFFN checkpoint folder) -> the ONNX file OUT."""
    if Path(src).is_dir():
        with tempfile.TemporaryDirectory(prefix="sparrow-convert-") as tmp:
            gguf_path = checkpoint_to_gguf(src, Path(tmp) / "model.gguf", qtype="f32", progress=progress,
                                           draft_model=draft_model)
            return export_onnx(gguf_path, out, weights=weights, ffn=ffn, overwrite=overwrite, progress=progress,
                               source_name=Path(src).resolve().name)
    if not Path(src).is_file():
        raise ConversionError(f"{src}: no such file or folder")
    return export_onnx(src, out, weights=weights, ffn=ffn, overwrite=overwrite, progress=progress,
                       draft_model=draft_model)


def default_type(out: str) -> str:
    """--type when not given: f32 for an ONNX export, the GGUF converter's own default otherwise."""
    import inspect

    return "f32" if out.lower().endswith(".onnx") else inspect.signature(convert).parameters["qtype"].default


@click.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--type", "qtype", type=click.Choice(list(QTYPES) + list(WEIGHT_TYPES[1:]), case_sensitive=False),
              default=None, help="Storage type of the weight matrices: for .gguf f32, f16, q8_0 (default) or q4_0 "
              "(norms and routers stay F32); for .onnx f32 (default), int8 or int4.")
@click.option("--ffn", type=click.Choice(FFN_KINDS), default="moe", show_default=True,
              help="ONNX, BlockFFN models: experts as onnxruntime's MoE operator (only active experts run) or as "
              "one dense FFN (every expert runs; a baseline).")
@click.option("--draft-model", metavar="NAME", help="BlockFFN: the draft model this one pairs with (a store name or "
              "file name), recorded in OUT's metadata beside the measured sparsity.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert_command(src: str, out: str, qtype: str | None, ffn: str, draft_model: str | None, overwrite: bool,
                    no_progress: bool) -> None:
    """Convert SRC to OUT, by OUT's type: OUT.gguf from a Hugging Face checkpoint folder (config.json,
    model.safetensors, tokenizer.model), BlockFFN or llama-family; OUT.onnx from a llama or BlockFFN GGUF file or
    such a checkpoint folder, for the onnxruntime backend."""
    onnx_out = out.lower().endswith(".onnx")
    qtype = (qtype or default_type(out)).lower()
    if onnx_out and qtype not in WEIGHT_TYPES:
        raise click.BadParameter(f"{qtype} is a GGUF type; an ONNX export takes {', '.join(WEIGHT_TYPES)}",
                                 param_hint="--type")
    if not onnx_out and qtype not in QTYPES:
        raise click.BadParameter(f"{qtype} is an ONNX type; a GGUF file takes {', '.join(QTYPES)}",
                                 param_hint="--type")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        try:
            if onnx_out:
                path = to_onnx(src, out, weights=qtype, ffn=ffn, overwrite=overwrite, progress=not no_progress,
                               draft_model=draft_model)
            else:
                path = checkpoint_to_gguf(src, out, qtype=qtype, overwrite=overwrite, progress=not no_progress,
                                          draft_model=draft_model)
        except ConversionError as e:
            raise click.ClickException(str(e)) from e
    for w in caught:
        click.echo(f"note: {w.message}", err=True)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
