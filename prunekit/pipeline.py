"""One pruning run, top to bottom: load -> calibrate -> score -> mask -> [train] -> export."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit import registry
from prunekit.batchnorm import recalibrate_batchnorm
from prunekit.config import PruneConfig
from prunekit.data import Splits, load_data
from prunekit.device import resolve_device
from prunekit.errors import UsageError
from prunekit.evaluate import accuracy
from prunekit.export import EXPORT_FORMATS, metadata_for, write_exports
from prunekit.masks import check_mask, check_sparsity, find_targets, sparsity_of
from prunekit.models import default_data, load_model
from prunekit.outputs import check_writable, staged_dir
from prunekit.progress import Reporter, Silent
from prunekit.pruners.base import Pruner
from prunekit.schedule import StepContext, run_schedule
from prunekit.stats import Collector, check_spec
from prunekit.timing import Timings
from prunekit.validate import ValidateOptions, validate


@dataclass
class Outcome:
    """What a run produced in memory: its report, the pruned and dense models, the data."""

    report: dict[str, Any]
    model: nn.Module
    dense_model: nn.Module | None
    data: Splits
    timings: Timings


def check(config: PruneConfig) -> None:
    """Validate everything cheap before any work is done."""
    check_sparsity(config.sparsity)
    config.preprocess().check()
    check_mask(config.mask, config.sparsity)
    config.schedule.check(config.sparsity)
    unknown = sorted(set(config.exports) - set(EXPORT_FORMATS))
    if unknown:
        raise UsageError(
            f"--export {','.join(config.exports)}: choose from "
            f"{', '.join(EXPORT_FORMATS)} (comma-separated)"
        )
    if config.validate and "onnx" not in config.exports:
        raise UsageError("--validate needs the ONNX export: add --export safetensors,onnx")


CURVATURE = frozenset({"fisher_diag", "fisher_inv"})  # fine with sampled labels


def _check_labels(config: PruneConfig, pruner: Pruner, data: Splits) -> None:
    """Unlabeled data can feed magnitude-style and true-Fisher pruning, nothing else."""
    if data.labeled:
        return
    if pruner.needs - CURVATURE:  # ḡ with labels sampled from the model averages to zero
        raise UsageError(
            f"pruner '{config.pruner}' needs the mean gradient, which needs true labels, but "
            f"{data.spec} has none; use labeled data or a curvature-only pruner"
        )
    if pruner.needs and pruner.stats_spec().fisher == "empirical":
        raise UsageError(
            f"pruner '{config.pruner}' needs gradients with true labels but {data.spec} has "
            "no labels; pass --param fisher=true (labels sampled from the model) or labeled "
            "data"
        )
    schedule = config.schedule
    if schedule.kind != "oneshot" or schedule.finetune_epochs:
        raise UsageError(
            f"the {schedule.kind} schedule trains the model, which needs labels; "
            f"{data.spec} has none"
        )
    if config.validate:
        raise UsageError(f"--validate measures accuracy, which needs labels; {data.spec} has none")


def execute(config: PruneConfig, reporter: Reporter | None = None) -> Outcome:
    """Load, prune (and train, by the schedule) and evaluate; write nothing."""
    reporter = reporter or Silent()
    started = time.perf_counter()
    check(config)
    device = resolve_device(config.device)
    pruner = registry.create(config.pruner, config.params)
    torch.manual_seed(config.seed)
    warnings: list[str] = []
    timings = Timings(device)

    with reporter.stage("loading model and data"), timings.phase("load"):
        data_spec = config.data or default_data(config.model)
        if data_spec is None:
            raise UsageError(f"{config.model} comes with no dataset; pass --data SPEC")
        data = load_data(data_spec, config.preprocess())
        num_classes = config.num_classes
        if num_classes is None and config.model.startswith(("torchvision:", "cifar:")):
            num_classes = data.num_classes
        loaded = load_model(config.model, config.weights, num_classes, config.trust_checkpoint)
        model = loaded.model.to(device)
        targets, unused = find_targets(model, config.exclude)
        warnings += [f"--exclude '{g}' matched no prunable weight" for g in unused]

    _check_labels(config, pruner, data)
    if pruner.needs:
        check_spec(pruner.stats_spec(), len(data.calibration))  # type: ignore[arg-type]
        if pruner.stats_spec().fisher == "true" and pruner.needs - CURVATURE:
            warnings.append(
                f"{config.pruner} uses the mean gradient, which averages to zero "
                "with labels sampled from the model (fisher=true)"
            )
    if config.schedule.trains():
        config.schedule.train.check(len(data.train))  # type: ignore[arg-type]

    def evaluate(m: nn.Module) -> float | None:
        return accuracy(m, data.test, device) if data.labeled else None

    with reporter.stage("evaluating the dense model"), timings.phase("evaluation"):
        dense_accuracy = evaluate(model)
    dense_model = copy.deepcopy(model).cpu() if "onnx" in config.exports else None

    ctx = StepContext(
        model,
        targets,
        pruner,
        data.calibration,
        device,
        config.mask,
        config.memory_budget,
        config.seed,
        timings=timings,
    )
    if pruner.needs and config.verbose:
        plan = Collector(
            model,
            targets,
            data.calibration,
            pruner.stats_spec(),
            pruner.needs,
            device,
            config.memory_budget,
        ).plan
        reporter.note(plan.describe())  # type: ignore[union-attr]
    with reporter.stage(f"{config.schedule.kind} pruning with {config.pruner}") as status:
        step_warnings, history = run_schedule(
            ctx,
            config.sparsity,
            config.schedule,
            data.train,
            evaluate=evaluate if data.labeled else None,
            on_event=status,
        )
        warnings += step_warnings
    if config.recalibrate_bn:
        with reporter.stage("re-estimating BatchNorm statistics"), timings.phase("batchnorm"):
            recalibrate_batchnorm(model, data.calibration, device)
    achieved, per_tensor = sparsity_of(targets)

    with reporter.stage("evaluating the pruned model"), timings.phase("evaluation"):
        pruned_accuracy = evaluate(model)
    warnings += accuracy_warnings(config, pruner, dense_accuracy, pruned_accuracy)

    report: dict[str, Any] = {
        "model": config.model,
        "weights": loaded.weights,
        "data": data_spec,
        "preprocess": {"normalize": config.normalize, "image_size": config.image_size},
        "num_classes": num_classes or data.num_classes,
        "pruner": config.pruner,
        "params": pruner.hparams,
        "mask": config.mask,
        "schedule": {
            "kind": config.schedule.kind,
            "recompute": "auto" if config.schedule.recompute is None else config.schedule.recompute,
            "pruning_steps": ctx.step,
        },
        "recalibrate_bn": config.recalibrate_bn,
        "device": str(device),
        "seed": config.seed,
        "sparsity": {"target": config.sparsity, "achieved": achieved, "per_tensor": per_tensor},
        "accuracy": {"dense": dense_accuracy, "pruned": pruned_accuracy},
        "history": history,
        "pruner_diagnostics": pruner.diagnostics(),
        "statistics": ctx.statistics,
        "warnings": warnings,
        "phases": timings.to_json(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return Outcome(report, model, dense_model, data, timings)


ACCURACY_DROP_WARNING = 0.10  # absolute top-1 loss that earns a warning with remedies


def accuracy_warnings(
    config: PruneConfig, pruner: Pruner, dense: float | None, pruned: float | None
) -> list[str]:
    """A warning with the likely remedies when pruning cost much of the dense accuracy."""
    if dense is None or pruned is None or dense - pruned <= ACCURACY_DROP_WARNING:
        return []
    remedies = []
    if pruner.compensates() and config.schedule.recompute is not None:
        remedies.append("--recompute auto (or a larger K)")
    if not pruner.compensates():
        remedies.append("a second-order pruner (--pruner woodfisher)")
    if not config.recalibrate_bn:
        remedies.append("--recalibrate-bn")
    if not config.schedule.trains():
        remedies.append("--finetune-epochs N or --schedule gradual")
    if config.sparsity > 0.5:
        remedies.append("a lower --sparsity")
    return [
        f"pruned accuracy {pruned:.2%} is {dense - pruned:.1%} below dense ({dense:.2%}); "
        f"try {', '.join(remedies)}"
    ]


def run(config: PruneConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Prune ``config.model`` and write OUT/model.safetensors, the exports and report.json."""
    reporter = reporter or Silent()
    started = time.perf_counter()
    check_writable(config.out, config.force)
    outcome = execute(config, reporter)  # validates the config before any work
    report, data, timings = outcome.report, outcome.data, outcome.timings
    with reporter.stage("writing outputs"), staged_dir(config.out, config.force) as stage:
        metadata = metadata_for(report, config.to_json())
        with timings.phase("export"):
            files = write_exports(
                stage,
                outcome.model,
                outcome.dense_model,
                data.input_shape,
                metadata,
                config.exports,
            )
        report["sizes"] = {name: (stage / name).stat().st_size for name in files}
        if config.validate:
            with reporter.stage("validating in ONNX Runtime"), timings.phase("validation"):
                report["validation"] = validate(
                    stage / "model.onnx",
                    data.test,
                    data.input_shape,
                    ValidateOptions(),
                    baseline=stage / "dense.onnx",
                    torch_model=outcome.model,
                )
                report["validation"]["model"] = str(config.out / "model.onnx")
                report["validation"]["baseline"] = str(config.out / "dense.onnx")
        report["outputs"] = [str(config.out / name) for name in [*files, "report.json"]]
        report["phases"] = timings.to_json()
        report["seconds"] = round(time.perf_counter() - started, 3)
        (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
