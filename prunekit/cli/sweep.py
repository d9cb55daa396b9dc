"""`prunekit sweep`: the pruner x sparsity x seed grid of `prunekit.run.sweep`, with progress."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from prunekit.cli.common import console, err, handle_errors, number_list
from prunekit.cli.options import OUTPUT, RUN, TARGETS, TRAINING, to_recipe, with_options
from prunekit.cli.prune import MODEL_HELP
from prunekit.errors import UsageError


@handle_errors
@with_options(RUN, TRAINING)
def sweep(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    pruners: Annotated[
        str, typer.Option("--pruners", help="Comma-separated pruner names.",
                          rich_help_panel=TARGETS)
    ],
    sparsities: Annotated[
        str, typer.Option("--sparsities", help="Comma-separated sparsities, e.g. 0.8,0.9.",
                          rich_help_panel=TARGETS)
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Sweep folder (resumed if it exists).",
                           rich_help_panel=OUTPUT)
    ],
    seeds: Annotated[
        str, typer.Option("--seeds", help="Comma-separated seeds.", rich_help_panel=TARGETS)
    ] = "0",
    options: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Run a pruner x sparsity x seed grid; write results.csv, results.md and a plot.

    Interrupted sweeps resume: finished cells (OUT/cells/*.json) are not recomputed.

    Example: prunekit sweep sample:digits-resnet --pruners magnitude,snip,fts
    --sparsities 0.8,0.9,0.95 --seeds 0,42,123 --schedule pbt --epochs 30 --out sweep-pbt
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from prunekit.run.recipe import config_from
    from prunekit.run.sweep import cell_runner, finished_cells, run_sweep
    from prunekit.runtime import distributed

    assert options is not None
    if distributed.world_size() > 1:
        raise UsageError(
            "prunekit sweep runs in one process; under torchrun run `prunekit prune` per cell"
        )
    names = [p.strip() for p in pruners.split(",") if p.strip()]
    levels = number_list(sparsities, "--sparsities", float)
    seed_list = number_list(seeds, "--seeds", int)
    first: dict[str, Any] = {"model": model, "pruner": names[0] if names else "",
                             "sparsity": levels[0] if levels else 0.0,
                             "exports": ["onnx"] if options.get("quantize") else []}  # fmt: skip
    base = config_from({**to_recipe(options), **first})
    one_cell = cell_runner(base, names, levels)
    if not seed_list:
        cell_runner(base, names, ())  # the same "each need a value" error
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

        finished = [0]

        def done(name: str, cached: bool) -> None:
            label = f"{name}{' (cached)' if cached else ''}"
            bar.update(task, advance=1, description=label)
            finished[0] += 1
            if not err.is_terminal:  # a log or a pipe: one line per cell instead of the bar
                err.print(f"progress: cell {finished[0]}/{total} {label} done")

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
    charts = ("results.csv", "results.md", "accuracy_vs_sparsity.png", "accuracy_vs_latency.png")
    console.print(
        f"{len(rows)} cells in {out}: " + ", ".join(n for n in charts if (out / n).exists())
    )
