"""`prunekit sensitivity`: per-layer accuracy drops and a recipe of per-layer sparsities."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from prunekit.cli.common import console, err, handle_errors, number_list, print_json, warn
from prunekit.cli.options import (
    FORCE,
    JSON,
    NUM_CLASSES,
    OUTPUT,
    PREPROCESS,
    RUN,
    TARGETS,
    TEXT,
    TRAINING,
    TRUST,
    pick,
    to_recipe,
    with_options,
)
from prunekit.cli.prune import MODEL_HELP

SCAN_OPTIONS = pick(
    (RUN, TRAINING, PREPROCESS, TEXT, NUM_CLASSES, TRUST),
    "exclude", "param", "data", "weights", "objective", "memory_budget", "device",
    *(o.name for o in (*PREPROCESS, *TEXT, *NUM_CLASSES, *TRUST)),
)  # fmt: skip


@handle_errors
@with_options(SCAN_OPTIONS, FORCE, JSON)
def sensitivity(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    target: Annotated[
        float, typer.Option("--target", help="Overall sparsity the recipe's per-layer "
                            "sparsities reach, e.g. 0.9.", rich_help_panel=TARGETS)
    ],
    pruner: Annotated[
        str, typer.Option("--pruner", "-p", help="Criterion that ranks each layer's weights "
                          "(see `pruners list`); layer-wise ones cannot.", rich_help_panel=TARGETS)
    ] = "magnitude",
    sparsities: Annotated[
        str, typer.Option("--sparsities", help="Sparsities each layer is pruned to alone.",
                          rich_help_panel=TARGETS)
    ] = "0.5,0.7,0.9,0.95",
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", help="Test samples per evaluation "
                                 "(default: the whole test split).", rich_help_panel=TARGETS)
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default "
                                  "prunekit-out/sensitivity-MODEL-PRUNER).", rich_help_panel=OUTPUT)
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the statistics.")] = 0,
    options: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Prune each layer alone at a few sparsities, measure test accuracy, and write a recipe
    of per-layer sparsities that reaches --target overall at the least summed drop.

    Writes OUT/sensitivity.json, OUT/sensitivity.png and OUT/recipe.json; prune with
    `prunekit prune --config OUT/recipe.json` (add -p to use another pruner).

    Example: prunekit sensitivity sample:digits-resnet --target 0.8 --out sens
    """
    from prunekit.run.config import PruneConfig
    from prunekit.run.recipe import config_from
    from prunekit.run.sensitivity import scan, write_scan
    from prunekit.runtime.outputs import prepare_output

    assert options is not None
    recipe = to_recipe({**options, "model": model, "pruner": pruner, "sparsity": target,
                        "seed": seed, "exports": []})  # fmt: skip
    default = Path("prunekit-out") / f"sensitivity-{PruneConfig.model_stem(model)}-{pruner}"
    recipe["out"] = str(out or default)
    config = config_from(recipe, "the options")
    levels = number_list(sparsities, "--sparsities", float)
    cleaned = prepare_output(config.out, config.force)  # refused before the scan, not after
    result = scan(config, levels, max_samples, lambda text: err.print(f"progress: {text}"))
    result["warnings"] = cleaned + result["warnings"]
    files = write_scan(config, result)
    warn(result["warnings"])
    if options["as_json"]:
        print_json({**result, "outputs": files})
        return
    console.print(f"dense accuracy {result['dense_accuracy']:.2%} on {result['test_samples']} "
                  "test samples; accuracy with one layer pruned:")  # fmt: skip
    from rich.table import Table

    table = Table()
    table.add_column("layer")
    table.add_column("weights", justify="right")
    for level in result["levels"]:
        table.add_column(f"{level:.0%}", justify="right")
    table.add_column("allocated", justify="right")
    for layer in result["layers"]:
        table.add_row(layer["name"], f"{layer['weights']:,}",
                      *(f"{layer['accuracy'][f'{v:g}']:.2%}" for v in result["levels"]),
                      f"{result['allocation'][layer['name']]:.0%}")  # fmt: skip
    console.print(table)
    console.print(f"allocation: {result['achieved']:.1%} of the weights (target "
                  f"{result['target']:.1%}); wrote {', '.join(files)}")  # fmt: skip
