"""`prunekit prune`: a recipe from the options (and --config), then `prunekit.run.pipeline.run`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from prunekit.cli.common import exit_if_failed, handle_errors, print_json, warn
from prunekit.cli.options import (
    EXPORT,
    FORCE,
    GATES,
    JSON,
    OUTPUT,
    RUN,
    STATISTICS,
    TARGETS,
    TRAINING,
    VALIDATE_TIMING,
    to_recipe,
    with_options,
)
from prunekit.cli.summary import print_report

MODEL_HELP = (
    "sample:NAME, cifar:ARCH, torchvision:ARCH[:WEIGHTS], hf:DIR, hf:ORG/NAME[@REVISION] or "
    "pkg.module:factory"
)


@handle_errors
@with_options(RUN, TRAINING, GATES, VALIDATE_TIMING, FORCE, JSON)
def prune(
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP, show_default=False)] = None,
    pruner: Annotated[
        str | None,
        typer.Option("--pruner", "-p", help="Criterion (see `pruners list`).",
                     rich_help_panel=TARGETS),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option("--sparsity", "-s", help="Fraction to remove, in [0, 1).",
                     rich_help_panel=TARGETS),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Recipe (.toml, .json, or a run's report.json); options "
                     "given here override it.", rich_help_panel=TARGETS),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the statistics memory plan.",
                           rich_help_panel=STATISTICS)
    ] = False,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for random criteria and re-initialisation.",
                          rich_help_panel=STATISTICS)
    ] = 0,
    export: Annotated[
        str, typer.Option("--export", help="Formats to write: safetensors, onnx "
                          "(comma-separated).", rich_help_panel=EXPORT)
    ] = "safetensors",
    validate: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Validate the ONNX export in ONNX "
                           "Runtime (implies onnx).", rich_help_panel=EXPORT)
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default "
                                  "prunekit-out/MODEL-PRUNER-S[-MASK][-STRUCTURE][-QUANTIZE]).",
                                  rich_help_panel=OUTPUT)
    ] = None,
    options: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Prune MODEL and write OUT/model.safetensors and OUT/report.json.

    Examples:

        prunekit prune sample:digits-cnn --pruner magnitude --sparsity 0.5

        prunekit prune torchvision:resnet18 --weights r18.pt --data cifar10:~/data
        -p magnitude -s 0.9 --mask layer --exclude 'fc.*' --json

        prunekit prune sample:digits-resnet -p woodfisher -s 0.95 --schedule gradual
        --steps 4 --finetune-epochs 3

        prunekit prune --config run/report.json --out run2   (repeat a run)
    """
    from prunekit.run.exports import export_formats
    from prunekit.run.pipeline import run
    from prunekit.run.recipe import (
        config_from,
        kept_params,
        load_recipe,
        refuse_code_and_overwrite,
    )
    from prunekit.runtime import distributed
    from prunekit.runtime.progress import RichReporter

    assert options is not None
    given = set(options["given"])
    if given & {"export", "validate", "quantize"}:
        given.add("exports")
    onnx_needed = validate or bool(options["quantize"])
    own = {"model": model, "pruner": pruner, "sparsity": sparsity, "seed": seed,
           "verbose": verbose, "validate": validate, "out": out,
           "exports": list(export_formats(export, onnx_needed))}  # fmt: skip
    base = load_recipe(config) if config else None
    if base is not None and config is not None:
        refuse_code_and_overwrite(base, config, model is not None, "force" in given)
    if base is not None and pruner is not None and pruner != base.get("pruner"):
        base["params"] = kept_params(pruner, base.get("params") or {})
    recipe = to_recipe({**options, **own, "given": given}, base)
    recipe["trust_checkpoint"] = options["trust_checkpoint"]  # never from a file
    run_config = dataclasses.replace(
        config_from(recipe, str(config or "the options")),
        command=(Path(sys.argv[0]).name, *sys.argv[1:]),
    )
    report = run(run_config, RichReporter())
    if not distributed.is_main():
        return  # rank 0 speaks for every rank of a torchrun
    warn(report["warnings"])
    if options["as_json"]:
        print_json(report)
    else:
        print_report(report)
    exit_if_failed(report.get("validation"))
