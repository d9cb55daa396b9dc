"""`prunekit pruners list|show` and `prunekit models list`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from prunekit.cli.common import console, handle_errors, print_json
from prunekit.cli.options import JSON, with_options

pruners_app = typer.Typer(help="List and inspect the pruner plugins.", no_args_is_help=True)
models_app = typer.Typer(help="List the sample models.", no_args_is_help=True)


@pruners_app.command("list")
@handle_errors
@with_options(JSON)
def pruners_list(
    options: dict | None = None,
) -> None:
    """List every registered pruner, with its distribution and any import error.

    Example: prunekit pruners list --json
    """
    from prunekit.pruners import registry

    rows = registry.describe()
    if options and options["as_json"]:
        print_json(rows)
        return
    table = Table(title="pruners")
    for column in ("name", "distribution", "version", "summary"):
        table.add_column(column)
    for row in rows:
        summary = row["summary"] if row["error"] is None else f"[red]error:[/red] {row['error']}"
        table.add_row(row["name"], row["distribution"], row["version"], summary)
    console.print(table)


@pruners_app.command("show")
@handle_errors
@with_options(JSON)
def pruners_show(
    name: Annotated[str, typer.Argument(help="Pruner name.")],
    options: dict | None = None,
) -> None:
    """Show a pruner's summary, needed statistics and hyperparameters.

    Example: prunekit pruners show magnitude
    """
    from prunekit.pruners import registry

    cls = registry.load(name)
    info: dict[str, Any] = {
        "name": name,
        "summary": cls.summary(),
        "needs": sorted(cls.needs),
        "params": [
            {
                "name": p.name,
                "default": p.default,
                "type": type(p.default).__name__,
                "help": p.help,
                "choices": list(p.choices) if p.choices else None,
            }
            for p in cls.params
        ],
    }
    if options and options["as_json"]:
        print_json(info)
        return
    console.print(f"[bold]{name}[/bold]: {info['summary']}")
    console.print(f"statistics: {', '.join(info['needs']) or 'none'}")
    if not cls.params:
        console.print("no hyperparameters")
        return
    table = Table("--param", "default", "meaning")
    for p in info["params"]:
        table.add_row(p["name"], str(p["default"]), p["help"])
    console.print(table)


@models_app.command("list")
@handle_errors
@with_options(JSON)
def models_list(
    options: dict | None = None,
) -> None:
    """List the sample models (dataset, size, test accuracy) and the built-in architectures.

    Example: prunekit models list
    """
    from prunekit.load.models import architecture_rows
    from prunekit.load.sample_models import SAMPLES

    rows = []
    for sample in SAMPLES.values():
        card = sample.card()
        rows.append(
            {
                "model": f"sample:{sample.name}",
                "data": sample.data,
                "parameters": card["parameters"],
                "test_accuracy": card["test_accuracy"],
                "description": card["description"],
            }
        )
    rows += architecture_rows()
    if options and options["as_json"]:
        print_json(rows)
        return
    table = Table(title="sample models and built-in architectures")
    table.add_column("model", no_wrap=True)
    for column in ("data", "parameters", "test accuracy", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["model"],
            row["data"],
            f"{row['parameters']:,}",
            "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.2%}",
            row["description"],
        )
    console.print(table)
