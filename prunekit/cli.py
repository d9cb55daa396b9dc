"""The ``prunekit`` command line: thin Typer commands over the library.

Exit codes: 0 ok, 1 failure while running, 2 usage error. No traceback unless --debug or
PRUNEKIT_DEBUG=1. Output meant for pipelines goes to stdout (``--json``); progress, warnings
and errors go to stderr.
"""

from __future__ import annotations

import dataclasses
import errno
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

console = Console(soft_wrap=True)
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
        except RuntimeError as exc:  # an out-of-memory outside the statistics' back-off
            from prunekit.memory import is_out_of_memory

            if _debug() or not is_out_of_memory(exc):
                raise
            first = str(exc).splitlines()[0]
            err.print(
                f"[red]error:[/red] out of memory ({first}); lower --batch-size or "
                "--memory-budget, or use a device with more memory",
                markup=True,
                highlight=False,
            )
            raise typer.Exit(1) from None
        except OSError as exc:  # disk full, permission denied, a missing folder...
            if _debug():
                raise
            err.print(f"[red]error:[/red] {os_error_line(exc)}", markup=True, highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EACCES: "permission denied: pick a path you may write",
    errno.EPERM: "not permitted: pick a path you may write",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "that is a folder, not a file: check the path",
    errno.EEXIST: "it already exists: pass --force or pick another path",
    errno.ENAMETOOLONG: "the name is too long: pick a shorter path",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError, with the fix that its errno calls for."""
    where = f" ({exc.filename})" if exc.filename else ""
    fix = _OS_FIXES.get(exc.errno or 0, "check the path")
    return f"{(exc.strerror or str(exc)).splitlines()[0]}{where}; {fix}"


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


# Help panels of `prune` (and `sweep`), so ~30 options read in groups.
TARGETS = "Targets"
MODEL_DATA = "Model and data"
STATISTICS = "Statistics and device"
SCHEDULE = "Schedule and training"
EXPORT = "Export and validation"
OUTPUT = "Output"

# Options shared by `prune`, `sweep` and `validate`.
NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        "--normalize",
        help="Per-channel input normalisation: imagenet, cifar10 or MEAN/STD "
        "(e.g. 0.5,0.5,0.5/0.25,0.25,0.25). uint8 images are scaled to [0, 1] first.",
        rich_help_panel=MODEL_DATA,
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="imagefolder: resize and centre-crop to N x N pixels.",
        rich_help_panel=MODEL_DATA,
    ),
]
ScheduleOpt = Annotated[
    str, typer.Option("--schedule", help="oneshot, gradual or pbt.", rich_help_panel=SCHEDULE)
]
RecomputeOpt = Annotated[
    str,
    typer.Option(
        "--recompute",
        help="Split each pruning step into K sub-steps, recomputing the statistics before "
        "each; auto: enough that no sub-step of an OBS-style pruner removes over 25 % of the "
        "remaining weights (1 for the other pruners).",
        rich_help_panel=SCHEDULE,
    ),
]
StepsOpt = Annotated[
    int, typer.Option("--steps", help="gradual: number of pruning steps.", rich_help_panel=SCHEDULE)
]
InitialOpt = Annotated[
    float,
    typer.Option(
        "--initial-sparsity",
        help="gradual: sparsity before the first step.",
        rich_help_panel=SCHEDULE,
    ),
]
FinetuneOpt = Annotated[
    int,
    typer.Option(
        "--finetune-epochs",
        help="Epochs of masked fine-tuning after each step.",
        rich_help_panel=SCHEDULE,
    ),
]
WarmupOpt = Annotated[
    int,
    typer.Option(
        "--warmup-epochs",
        help="pbt: dense epochs before the mask is chosen.",
        rich_help_panel=SCHEDULE,
    ),
]
EpochsOpt = Annotated[
    int,
    typer.Option("--epochs", help="pbt: epochs trained with the mask.", rich_help_panel=SCHEDULE),
]
LrOpt = Annotated[float, typer.Option("--lr", help="Learning rate.", rich_help_panel=SCHEDULE)]
OptimizerOpt = Annotated[
    str, typer.Option("--optimizer", help="sgd or adam.", rich_help_panel=SCHEDULE)
]
LrScheduleOpt = Annotated[
    str,
    typer.Option("--lr-schedule", help="cosine, multistep, constant.", rich_help_panel=SCHEDULE),
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", help="Training batch size.", rich_help_panel=SCHEDULE)
]
DecayOpt = Annotated[
    float, typer.Option("--weight-decay", help="Weight decay.", rich_help_panel=SCHEDULE)
]


def _recompute(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--recompute {text}: give auto or a number of sub-steps") from None


def _schedule(
    kind: str,
    recompute: str,
    steps: int,
    initial: float,
    finetune: int,
    warmup: int,
    epochs: int,
    lr: float,
    optimizer: str,
    lr_schedule: str,
    batch_size: int,
    weight_decay: float,
):
    from prunekit.schedule import ScheduleConfig
    from prunekit.train import TrainConfig

    return ScheduleConfig(
        kind=kind,
        recompute=_recompute(recompute),
        steps=steps,
        initial_sparsity=initial,
        finetune_epochs=finetune,
        warmup_epochs=warmup,
        epochs=epochs,
        train=TrainConfig(
            lr=lr,
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            batch_size=batch_size,
            weight_decay=weight_decay,
        ),
    )


@app.command()
@handle_errors
def prune(
    model: Annotated[
        str, typer.Argument(help="sample:NAME, cifar:ARCH, torchvision:ARCH or pkg.module:factory")
    ],
    pruner: Annotated[
        str,
        typer.Option(
            "--pruner", "-p", help="Criterion (see `pruners list`).", rich_help_panel=TARGETS
        ),
    ],
    sparsity: Annotated[
        float,
        typer.Option(
            "--sparsity", "-s", help="Fraction to remove, in [0, 1).", rich_help_panel=TARGETS
        ),
    ],
    mask: Annotated[
        str,
        typer.Option(
            help="global: one threshold; layer: each tensor to S; N:M (e.g. 2:4).",
            rich_help_panel=TARGETS,
        ),
    ] = "global",
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Glob on dotted weight names to leave dense; repeatable.", rich_help_panel=TARGETS
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="digits, cifar10:DIR, imagefolder:DIR or tensors:FILE "
            "(sample models bring their own).",
            rich_help_panel=MODEL_DATA,
        ),
    ] = None,
    normalize: NormalizeOpt = None,
    image_size: ImageSizeOpt = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="State dict: .safetensors, .pt or .pth.", rich_help_panel=MODEL_DATA),
    ] = None,
    num_classes: Annotated[
        int | None,
        typer.Option(
            help="Classes of a torchvision/factory model (default: from the data).",
            rich_help_panel=MODEL_DATA,
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", help="Pruner hyperparameter key=value; repeatable.", rich_help_panel=TARGETS
        ),
    ] = None,
    schedule: ScheduleOpt = "oneshot",
    recompute: RecomputeOpt = "auto",
    steps: StepsOpt = 1,
    initial_sparsity: InitialOpt = 0.0,
    finetune_epochs: FinetuneOpt = 0,
    warmup_epochs: WarmupOpt = 0,
    epochs: EpochsOpt = 0,
    lr: LrOpt = 0.05,
    optimizer: OptimizerOpt = "sgd",
    lr_schedule: LrScheduleOpt = "cosine",
    batch_size: BatchOpt = 64,
    weight_decay: DecayOpt = 5e-4,
    recalibrate_bn: Annotated[
        bool,
        typer.Option(
            "--recalibrate-bn",
            help="Re-estimate BatchNorm statistics on the calibration split.",
            rich_help_panel=SCHEDULE,
        ),
    ] = False,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="Memory for statistics, e.g. 2GiB (default: a safe share of free).",
            rich_help_panel=STATISTICS,
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", help="Show the statistics memory plan.", rich_help_panel=STATISTICS
        ),
    ] = False,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda[:i].", rich_help_panel=STATISTICS)
    ] = "auto",
    seed: Annotated[
        int,
        typer.Option(
            help="Seed for random criteria and re-initialisation.", rich_help_panel=STATISTICS
        ),
    ] = 0,
    export: Annotated[
        str,
        typer.Option(
            help="Formats to write: safetensors, onnx (comma-separated).", rich_help_panel=EXPORT
        ),
    ] = "safetensors",
    validate: Annotated[
        bool,
        typer.Option(
            "--validate",
            help="Validate the ONNX export in ONNX Runtime (implies onnx).",
            rich_help_panel=EXPORT,
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default prunekit-out/MODEL-PRUNER-S).", rich_help_panel=OUTPUT
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUT if it exists.", rich_help_panel=OUTPUT)
    ] = False,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(
            "--trust-checkpoint",
            help="Allow pickled (non weights-only) checkpoints. Only for files you trust.",
            rich_help_panel=MODEL_DATA,
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the report as one JSON object.", rich_help_panel=OUTPUT),
    ] = False,
) -> None:
    """Prune MODEL and write OUT/model.safetensors and OUT/report.json.

    Examples:

        prunekit prune sample:digits-cnn --pruner magnitude --sparsity 0.5

        prunekit prune torchvision:resnet18 --weights r18.pt --data cifar10:~/data
        -p magnitude -s 0.9 --mask layer --exclude 'fc.*' --json

        prunekit prune sample:digits-resnet -p woodfisher -s 0.95 --schedule gradual
        --steps 4 --finetune-epochs 3

        prunekit prune sample:digits-cnn -p snip -s 0.9 --schedule pbt --epochs 30
    """
    from prunekit.config import PruneConfig
    from prunekit.memory import parse_size
    from prunekit.pipeline import run
    from prunekit.progress import RichReporter

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
        normalize=normalize,
        image_size=image_size,
        weights=weights,
        num_classes=num_classes,
        trust_checkpoint=trust_checkpoint,
        params=parse_params(param or []),
        schedule=_schedule(
            schedule,
            recompute,
            steps,
            initial_sparsity,
            finetune_epochs,
            warmup_epochs,
            epochs,
            lr,
            optimizer,
            lr_schedule,
            batch_size,
            weight_decay,
        ),
        recalibrate_bn=recalibrate_bn,
        memory_budget=parse_size(memory_budget) if memory_budget else None,
        verbose=verbose,
        device=device,
        seed=seed,
        exports=_exports(export, validate),
        validate=validate,
        out=out,
        force=force,
        command=(Path(sys.argv[0]).name, *sys.argv[1:]),
    )
    report = run(config, RichReporter())
    _warn(report["warnings"])
    if as_json:
        _print_json(report)
    else:
        _print_report(report)
    _exit_if_failed(report.get("validation"))


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def _exit_if_failed(validation: dict[str, Any] | None) -> None:
    if validation is not None and not validation["passed"]:
        for failure in validation["failures"]:
            err.print(f"[red]validation failed:[/red] {failure}", highlight=False)
        raise typer.Exit(1)


def _exports(text: str, validate: bool) -> tuple[str, ...]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    if validate and "onnx" not in formats:
        formats.append("onnx")
    return tuple(formats)


def _print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['model']} pruned with {report['pruner']} ({report['mask']} mask)")
    table.add_column("tensor")
    table.add_column("sparsity", justify="right")
    for name, fraction in report["sparsity"]["per_tensor"].items():
        table.add_row(name, f"{fraction:.1%}")
    sparsity, acc = report["sparsity"], report["accuracy"]
    table.add_section()
    table.add_row("all targets", f"{sparsity['achieved']:.1%} (asked {sparsity['target']:.1%})")
    console.print(table)
    if acc["dense"] is None:
        console.print("test accuracy: not measured (the data has no labels)")
    else:
        console.print(f"test accuracy: dense {acc['dense']:.2%} -> pruned {acc['pruned']:.2%}")
    if "validation" in report:
        _print_validation(report["validation"])
    console.print(f"wrote {', '.join(report['outputs'])} in {report['seconds']:.1f} s")


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
    console.print(table)


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
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the sample models (dataset, size, test accuracy) and the built-in architectures.

    Example: prunekit models list
    """
    from prunekit.models import architecture_rows
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
    rows += architecture_rows()
    if as_json:
        _print_json(rows)
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


def _print_validation(v: dict[str, Any]) -> None:
    session = v["session"]
    accuracy = "not measured (no labels)" if v["accuracy"] is None else f"{v['accuracy']:.2%}"
    baseline = v.get("baseline_accuracy")
    console.print(
        f"ONNX Runtime ({session['provider']}, intra-op threads "
        f"{session['intra_op_threads']}, {session['graph_optimization']}): accuracy "
        f"{accuracy}" + (f", baseline {baseline:.2%}" if baseline is not None else "")
    )
    if "parity" in v:
        p = v["parity"]
        console.print(
            f"parity with PyTorch: top-1 agreement {p['top1_agreement']:.2%}, max |diff| "
            f"{p['max_abs_diff']:.2e} ({'ok' if p['passed'] else 'FAILED'})"
        )
    table = Table(title="latency (ms)")
    for column in ("model", "batch", "p50", "p90", "p99", "samples/s"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for label, per_batch in v["latency"].items():
        for batch, m in per_batch.items():
            table.add_row(
                label,
                batch,
                f"{m['p50_ms']:.3f}",
                f"{m['p90_ms']:.3f}",
                f"{m['p99_ms']:.3f}",
                f"{m['throughput_per_s']:,.0f}",
            )
    console.print(table)
    if "latency_ratio" in v:
        ratios = ", ".join(f"batch {b}: {r:.2f}" for b, r in v["latency_ratio"].items())
        console.print(f"p50 latency pruned / dense: {ratios}")
    console.print(f"note: {v['note']}")


def _number_list(text: str, option: str, kind: type = int) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(
            f"{option} {text}: give comma-separated {kind.__name__}s, e.g. 1,32"
        ) from None


@app.command()
@handle_errors
def sweep(
    model: Annotated[
        str, typer.Argument(help="sample:NAME, cifar:ARCH, torchvision:ARCH or pkg.module:factory")
    ],
    pruners: Annotated[
        str, typer.Option(help="Comma-separated pruner names.", rich_help_panel=TARGETS)
    ],
    sparsities: Annotated[
        str, typer.Option(help="Comma-separated sparsities, e.g. 0.8,0.9.", rich_help_panel=TARGETS)
    ],
    out: Annotated[
        Path, typer.Option(help="Sweep folder (resumed if it exists).", rich_help_panel=OUTPUT)
    ],
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds.", rich_help_panel=TARGETS)
    ] = "0",
    mask: Annotated[
        str, typer.Option(help="global, layer or N:M.", rich_help_panel=TARGETS)
    ] = "global",
    data: Annotated[
        str | None,
        typer.Option(
            help="Dataset spec (sample models bring their own).", rich_help_panel=MODEL_DATA
        ),
    ] = None,
    normalize: NormalizeOpt = None,
    image_size: ImageSizeOpt = None,
    weights: Annotated[
        Path | None, typer.Option(help="State dict to start from.", rich_help_panel=MODEL_DATA)
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="key=value, given to the pruners that accept it.",
            rich_help_panel=TARGETS,
        ),
    ] = None,
    schedule: ScheduleOpt = "oneshot",
    recompute: RecomputeOpt = "auto",
    steps: StepsOpt = 1,
    initial_sparsity: InitialOpt = 0.0,
    finetune_epochs: FinetuneOpt = 0,
    warmup_epochs: WarmupOpt = 0,
    epochs: EpochsOpt = 0,
    lr: LrOpt = 0.05,
    optimizer: OptimizerOpt = "sgd",
    lr_schedule: LrScheduleOpt = "cosine",
    batch_size: BatchOpt = 64,
    weight_decay: DecayOpt = 5e-4,
    recalibrate_bn: Annotated[
        bool,
        typer.Option(
            "--recalibrate-bn", help="Re-estimate BatchNorm statistics.", rich_help_panel=SCHEDULE
        ),
    ] = False,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda[:i].", rich_help_panel=STATISTICS)
    ] = "auto",
) -> None:
    """Run a pruner x sparsity x seed grid; write results.csv, results.md and a plot.

    Interrupted sweeps resume: finished cells (OUT/cells/*.json) are not recomputed.

    Example: prunekit sweep sample:digits-resnet --pruners magnitude,snip,fts
    --sparsities 0.8,0.9,0.95 --seeds 0,42,123 --schedule pbt --epochs 30 --out sweep-pbt
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from prunekit import registry
    from prunekit.config import PruneConfig
    from prunekit.pipeline import check, execute
    from prunekit.sweep import finished_cells, run_sweep

    names = [p.strip() for p in pruners.split(",") if p.strip()]
    levels = _number_list(sparsities, "--sparsities", float)
    seed_list = _number_list(seeds, "--seeds", int)
    if not names or not levels or not seed_list:
        raise UsageError("--pruners, --sparsities and --seeds each need at least one value")
    params = parse_params(param or [])
    accepted = {name: {p.name for p in registry.load(name).params} for name in names}
    unused = sorted(k for k in params if not any(k in a for a in accepted.values()))
    if unused:
        raise UsageError(f"--param {', '.join(unused)}: none of the pruners accepts it")
    base = PruneConfig(
        model=model,
        pruner=names[0],
        sparsity=levels[0] if levels else 0.0,
        mask=mask,
        data=data,
        normalize=normalize,
        image_size=image_size,
        weights=weights,
        params=params,
        recalibrate_bn=recalibrate_bn,
        device=device,
        exports=(),
        schedule=_schedule(
            schedule,
            recompute,
            steps,
            initial_sparsity,
            finetune_epochs,
            warmup_epochs,
            epochs,
            lr,
            optimizer,
            lr_schedule,
            batch_size,
            weight_decay,
        ),
    )
    for level in levels:
        check(dataclasses.replace(base, sparsity=level))

    def one_cell(config: PruneConfig) -> dict[str, Any]:
        own = {k: v for k, v in config.params.items() if k in accepted[config.pruner]}
        return execute(dataclasses.replace(config, params=own)).report

    total = len(names) * len(levels) * len(seed_list)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("sweep", total=total)

        def done(name: str, cached: bool) -> None:
            bar.update(task, advance=1, description=f"{name}{' (cached)' if cached else ''}")

        try:
            rows = run_sweep(base, names, levels, seed_list, out, one_cell, done)
        except KeyboardInterrupt:
            bar.stop()
            err.print(
                f"interrupted; {finished_cells(out)} of {total} cells are kept in {out}/cells: "
                "rerun the same command to resume"
            )
            raise typer.Exit(130) from None
    console.print((out / "results.md").read_text())
    console.print(f"{len(rows)} cells in {out}: results.csv, results.md, accuracy_vs_sparsity.png")


@app.command()
@handle_errors
def export(
    model: Annotated[
        str, typer.Argument(help="sample:NAME, cifar:ARCH, torchvision:ARCH or pkg.module:factory")
    ],
    out: Annotated[Path, typer.Option(help="Output file (.onnx or .safetensors).")],
    format: Annotated[str, typer.Option("--format", help="onnx or safetensors.")] = "onnx",
    weights: Annotated[Path | None, typer.Option(help="State dict (plain or compact).")] = None,
    data: Annotated[
        str | None, typer.Option(help="Dataset spec that fixes the input shape.")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="Input shape without batch, e.g. 3,32,32.")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Classes of a torchvision/factory model.")
    ] = None,
    dense: Annotated[
        bool, typer.Option("--dense", help="Write dense tensors / initializers only.")
    ] = False,
    trust_checkpoint: Annotated[
        bool, typer.Option("--trust-checkpoint", help="Allow pickled checkpoints you trust.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Export MODEL (e.g. a pruned model.safetensors) to ONNX or compact safetensors.

    Examples:

        prunekit export sample:digits-cnn --weights run/model.safetensors --out m.onnx

        prunekit export sample:digits-cnn --weights run/model.safetensors
        --format safetensors --out m.compact.safetensors
    """
    from prunekit.compact import save_compact
    from prunekit.export import read_metadata, save_safetensors
    from prunekit.models import default_data, load_model
    from prunekit.outputs import prepare_output, staged_file
    from prunekit.validate import file_sha256

    if format not in {"onnx", "safetensors"}:
        raise UsageError(f"--format {format}: use onnx or safetensors")
    shape = _number_list(input_shape, "--input-shape") if input_shape else None
    data_spec = data or default_data(model)
    if shape is None and format == "onnx":
        if data_spec is None:
            raise UsageError(f"{model} has no dataset: pass --data SPEC or --input-shape C,H,W")
        from prunekit.data import load_data

        shape = load_data(data_spec).input_shape
    notes = prepare_output(out, force, kind="file")
    loaded = load_model(model, weights, num_classes, trust_checkpoint)
    _warn([*notes, *loaded.warnings])
    metadata = {"format": "pt", "prunekit_version": __version__, "model": model}
    if weights is not None and weights.suffix == ".safetensors":
        metadata.update({k: v for k, v in read_metadata(weights).items() if k != "prunekit_sparse"})
    if data_spec:
        metadata["data"] = data_spec
    if weights is not None:  # lets `prunekit validate` find them for its parity check
        metadata["weights_file"] = os.path.relpath(weights.absolute(), out.absolute().parent)
        metadata["weights_sha256"] = file_sha256(weights)
    if num_classes:
        metadata["num_classes"] = str(num_classes)
    with staged_file(out, force) as tmp:
        if format == "onnx":
            from prunekit.onnx_export import export_onnx

            export_onnx(
                loaded.model,
                shape,
                tmp,
                metadata,
                sparse=not dense,  # type: ignore[arg-type]
                final_name=out.name,
            )
        elif dense:
            save_safetensors(loaded.model, tmp, metadata)
        else:
            save_compact(loaded.model.state_dict(), tmp, metadata)
    summary = {"model": model, "format": format, "out": str(out), "bytes": out.stat().st_size}
    if as_json:
        _print_json(summary)
    else:
        console.print(f"wrote {out} ({summary['bytes']:,} bytes)")


@app.command()
@handle_errors
def densify(
    src: Annotated[Path, typer.Argument(help="Compact (or plain) safetensors file.")],
    dst: Annotated[Path, typer.Argument(help="Dense safetensors file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
) -> None:
    """Write the dense tensors of a compact safetensors file, bit for bit.

    Example: prunekit densify run/model.compact.safetensors dense.safetensors
    """
    from prunekit.compact import densify as densify_file
    from prunekit.outputs import prepare_output, staged_file

    _warn(prepare_output(dst, force, kind="file"))
    with staged_file(dst, force) as tmp:
        densify_file(src, tmp)
    console.print(f"wrote {dst} ({dst.stat().st_size:,} bytes)")


@app.command("validate")
@handle_errors
def validate_command(
    onnx_file: Annotated[Path, typer.Argument(help="The ONNX model to validate.")],
    baseline: Annotated[Path | None, typer.Option(help="Dense ONNX model timed alongside.")] = None,
    data: Annotated[
        str | None, typer.Option(help="Dataset spec (default: from the file's metadata).")
    ] = None,
    normalize: NormalizeOpt = None,
    image_size: ImageSizeOpt = None,
    torch_model: Annotated[
        str | None, typer.Option("--torch", help="PyTorch model spec for the parity check.")
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="Weights for the parity model (--torch, or the spec recorded in the file)."
        ),
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Classes of --torch (default: recorded in the file).")
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, e.g. 1,32.")] = "1,32",
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0: default).")] = 0,
    provider: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    runs: Annotated[int, typer.Option(help="Timed runs per model and batch size.")] = 500,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(help="Fail when accuracy falls more than this (0..1) below the baseline."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check an ONNX export in ONNX Runtime: accuracy, parity with PyTorch, latency.

    Exits 1 when parity fails or accuracy drops more than --max-accuracy-drop. Without
    --torch, the parity check uses the model spec and weights file recorded by prunekit
    next to the ONNX file, when there are any.

    Example: prunekit validate run/model.onnx --baseline run/dense.onnx --max-accuracy-drop 0.01
    """
    from prunekit.data import load_data
    from prunekit.preprocess import Preprocess
    from prunekit.validate import ValidateOptions, parity_model, read_onnx_metadata, validate

    options = ValidateOptions(
        batch_sizes=_number_list(batch_sizes, "--batch-sizes"),
        threads=threads,
        provider=provider,
        runs=runs,
        max_accuracy_drop=max_accuracy_drop,
    )
    options.check()
    meta = read_onnx_metadata(onnx_file)
    spec = data or meta.get("data")
    if spec is None:
        raise UsageError(f"{onnx_file} records no dataset; pass --data SPEC")
    if data is None:  # the recorded data comes with its recorded preprocessing
        normalize = normalize or meta.get("normalize")
        image_size = image_size or (int(meta["image_size"]) if meta.get("image_size") else None)
    splits = load_data(spec, Preprocess(normalize, image_size))
    model, skipped = parity_model(onnx_file, meta, torch_model, weights, num_classes)
    reference = float(meta["accuracy_dense"]) if "accuracy_dense" in meta else None
    result = validate(
        onnx_file, splits.test, splits.input_shape, options, baseline, model, reference, skipped
    )
    if skipped:
        _warn([f"parity with PyTorch not checked: {skipped}"])
    if as_json:
        _print_json(result)
    else:
        _print_validation(result)
    _exit_if_failed(result)


def main() -> None:
    app(prog_name="prunekit")
