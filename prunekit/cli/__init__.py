"""The ``prunekit`` command line: one short function per command over the library.

Exit codes: 0 ok, 1 failure while running, 2 usage error, 130 interrupted (see
``prunekit.cli.common``). Options shared by several commands are declared once, in
``prunekit.cli.options``. The top layer: it may import every other.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from prunekit.cli.common import handle_errors, os_error_line
from prunekit.cli.files import densify, export, validate
from prunekit.cli.listing import models_app, pruners_app
from prunekit.cli.prune import prune
from prunekit.cli.sensitivity import sensitivity
from prunekit.cli.sweep import sweep
from prunekit.version import __version__

__all__ = ["app", "handle_errors", "main", "os_error_line"]

app = typer.Typer(
    help="Prune PyTorch models with first- and second-order criteria; export and validate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
app.add_typer(pruners_app, name="pruners")
app.add_typer(models_app, name="models")
for command in (prune, sweep, sensitivity, export, densify):
    app.command()(command)
app.command("validate")(validate)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prunekit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """prunekit: prune, export and validate PyTorch models."""
    if debug:
        os.environ["PRUNEKIT_DEBUG"] = "1"


def main() -> None:
    app(prog_name="prunekit")
