"""`sparrow convert SRC OUT --type q8_0`: the click command (the lead hooks `convert_command` into the CLI group)."""
from __future__ import annotations

import warnings

import click

from . import ConversionError
from .blockffn import QTYPES, ConversionWarning, convert


@click.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--type", "qtype", type=click.Choice(list(QTYPES), case_sensitive=False), default="q8_0",
              show_default=True, help="Storage type of the weight matrices (norms and routers stay F32).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert_command(src: str, out: str, qtype: str, overwrite: bool, no_progress: bool) -> None:
    """Convert the BlockFFN Hugging Face checkpoint folder SRC (config.json, model.safetensors, tokenizer.model)
    to the GGUF file OUT."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        try:
            path = convert(src, out, qtype=qtype.lower(), overwrite=overwrite, progress=not no_progress)
        except ConversionError as e:
            raise click.ClickException(str(e)) from e
    for w in caught:
        click.echo(f"note: {w.message}", err=True)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
