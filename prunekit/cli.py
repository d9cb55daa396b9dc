"""The ``prunekit`` command line: thin Typer commands over the library.

Exit codes: 0 ok, 1 failure while running, 2 usage error. No traceback unless --debug or
PRUNEKIT_DEBUG=1. Output meant for pipelines goes to stdout (``--json``); progress, warnings
and errors go to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from prunekit import __version__
from prunekit.errors import PrunekitError, UsageError

app = typer.Typer(
    help="Prune PyTorch models with first- and second-order criteria; export and validate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
pruners_app = typer.Typer(help="List and inspect the pruner plugins.", no_args_is_help=True)
models_app = typer.Typer(help="List the sample models.", no_args_is_help=True)
app.add_typer(pruners_app, name="pruners")
app.add_typer(models_app, name="models")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def _debug() -> bool:
    return os.environ.get("PRUNEKIT_DEBUG", "") not in {"", "0"}


def handle_errors(command: F) -> F:
    """Turn a PrunekitError into one line on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PrunekitError as exc:
            if _debug():
                raise
            err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


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


def parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects key=value, got '{item}'")
        params[key.strip()] = value.strip()
    return params


@app.command()
@handle_errors
def prune(
    model: Annotated[
        str, typer.Argument(help="sample:NAME, torchvision:ARCH or pkg.module:factory")
    ],
    pruner: Annotated[str, typer.Option("--pruner", "-p", help="Criterion (see `pruners list`).")],
    sparsity: Annotated[
        float, typer.Option("--sparsity", "-s", help="Fraction to remove, in [0, 1).")
    ],
    mask: Annotated[
        str, typer.Option(help="global: one threshold; layer: each tensor to S.")
    ] = "global",
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Glob on dotted weight names to leave dense; repeatable."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="digits, cifar10:DIR, imagefolder:DIR or tensors:FILE "
            "(sample models bring their own)."
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="State dict: .safetensors, .pt or .pth.")
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(help="Classes of a torchvision/factory model (default: from the data)."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="Pruner hyperparameter key=value; repeatable."),
    ] = None,
    recompute: Annotated[
        int, typer.Option(help="Split the step into K sub-steps, recomputing statistics.")
    ] = 1,
    recalibrate_bn: Annotated[
        bool, typer.Option(help="Re-estimate BatchNorm statistics on the calibration split.")
    ] = False,
    memory_budget: Annotated[
        str | None,
        typer.Option(help="Memory for statistics, e.g. 2GiB (default: a safe share of free)."),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show the statistics memory plan.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:i].")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for random criteria and re-initialisation.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default prunekit-out/MODEL-PRUNER-S).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(
            help="Allow pickled (non weights-only) checkpoints. Only for files you trust."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object.")
    ] = False,
) -> None:
    """Prune MODEL and write OUT/model.safetensors and OUT/report.json.

    Examples:

        prunekit prune sample:digits-cnn --pruner magnitude --sparsity 0.5

        prunekit prune torchvision:resnet18 --weights r18.pt --data cifar10:~/data
        -p magnitude -s 0.9 --mask layer --exclude 'fc.*' --json
    """
    from prunekit.config import PruneConfig
    from prunekit.pipeline import run
    from prunekit.progress import RichReporter
    from prunekit.stats import parse_size

    if out is None:
        out = (
            Path("prunekit-out") / f"{model.split(':')[-1].replace('.', '_')}-{pruner}-{sparsity:g}"
        )
    config = PruneConfig(
        model=model,
        pruner=pruner,
        sparsity=sparsity,
        mask=mask,
        exclude=tuple(exclude or ()),
        data=data,
        weights=weights,
        num_classes=num_classes,
        trust_checkpoint=trust_checkpoint,
        params=parse_params(param or []),
        recompute=recompute,
        recalibrate_bn=recalibrate_bn,
        memory_budget=parse_size(memory_budget) if memory_budget else None,
        verbose=verbose,
        device=device,
        seed=seed,
        out=out,
        force=force,
    )
    report = run(config, RichReporter())
    for warning in report["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if as_json:
        _print_json(report)
    else:
        _print_report(report)


def _print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['model']} pruned with {report['pruner']} ({report['mask']} mask)")
    table.add_column("tensor")
    table.add_column("sparsity", justify="right")
    for name, fraction in report["sparsity"]["per_tensor"].items():
        table.add_row(name, f"{fraction:.1%}")
    sparsity, acc = report["sparsity"], report["accuracy"]
    table.add_section()
    table.add_row("all targets", f"{sparsity['achieved']:.1%} (asked {sparsity['target']:.1%})")
    out.print(table)
    out.print(f"test accuracy: dense {acc['dense']:.2%} -> pruned {acc['pruned']:.2%}")
    out.print(f"wrote {', '.join(report['outputs'])} in {report['seconds']:.1f} s")


@pruners_app.command("list")
@handle_errors
def pruners_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List every registered pruner, with its distribution and any import error.

    Example: prunekit pruners list --json
    """
    from prunekit import registry

    rows = registry.describe()
    if as_json:
        _print_json(rows)
        return
    table = Table(title="pruners")
    for column in ("name", "distribution", "version", "summary"):
        table.add_column(column)
    for row in rows:
        summary = row["summary"] if row["error"] is None else f"[red]error:[/red] {row['error']}"
        table.add_row(row["name"], row["distribution"], row["version"], summary)
    out.print(table)


@pruners_app.command("show")
@handle_errors
def pruners_show(
    name: Annotated[str, typer.Argument(help="Pruner name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a pruner's summary, needed statistics and hyperparameters.

    Example: prunekit pruners show magnitude
    """
    from prunekit import registry

    cls = registry.load(name)
    info = {
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
    if as_json:
        _print_json(info)
        return
    out.print(f"[bold]{name}[/bold]: {info['summary']}")
    out.print(f"statistics: {', '.join(info['needs']) or 'none'}")
    if not cls.params:
        out.print("no hyperparameters")
        return
    table = Table("--param", "default", "meaning")
    for p in info["params"]:
        table.add_row(p["name"], str(p["default"]), p["help"])
    out.print(table)


@models_app.command("list")
@handle_errors
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the sample models with their dataset, size and test accuracy.

    Example: prunekit models list
    """
    from prunekit.sample_models import SAMPLES

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
    if as_json:
        _print_json(rows)
        return
    table = Table(title="sample models")
    table.add_column("model", no_wrap=True)
    for column in ("data", "parameters", "test accuracy", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["model"],
            row["data"],
            f"{row['parameters']:,}",
            f"{row['test_accuracy']:.2%}",
            row["description"],
        )
    out.print(table)


def main() -> None:
    app(prog_name="prunekit")
