"""The `sparrow` command: one group over the commands each package brings (an app; nothing below imports it).

    sparrow chat | generate | batch | serve | models ...   sparrow.runtime.cli
    sparrow convert                        sparrow.converters.cli
    sparrow bench [--tune]                 sparrow.bench_device.cli
"""
from __future__ import annotations

import sys
from typing import Any

import click

from .bench_device.cli import bench
from .converters.cli import convert_command
from .runtime.backends import BackendError
from .runtime.chat_template import ChatTemplateError
from .runtime.cli import batch, chat, generate, models, serve
from .runtime.native import SparrowError
from .runtime.routing import ModelFormatError
from .runtime.store import StoreError


class _Group(click.Group):
    """Turns the errors a user can cause or fix (bad file, unknown model, no memory) into one clear line, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SparrowError as e:
            raise click.ClickException(f"the native runtime could not run the model: {e}") from None
        except (StoreError, BackendError, ChatTemplateError, ModelFormatError) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparrow", message="sparrow %(version)s")
def sparrow() -> None:
    """Sparrow: run language models on this machine's CPU."""


for _command in (models, chat, generate, batch, serve, convert_command, bench):
    sparrow.add_command(_command)


def main() -> None:
    sparrow(prog_name="sparrow")
