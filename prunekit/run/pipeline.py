"""One pruning run, top to bottom: load -> calibrate -> score -> mask -> [train] -> export."""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from prunekit.calibrate.collector import check_spec
from prunekit.calibrate.gradients import engine_note
from prunekit.calibrate.memory import MemoryPlan, is_out_of_memory
from prunekit.contract.objectives import Objective, resolve_objective, returns_embeddings
from prunekit.contract.pruner import LayerPruner, Pruner
from prunekit.contract.statistics import LABEL_FREE, LAYER_INPUTS, PER_SAMPLE
from prunekit.contract.target import Target
from prunekit.engine.batchnorm import recalibrate_batchnorm
from prunekit.engine.masks import (
    check_mask,
    check_sparsity,
    find_targets,
    nm_misfits,
    parse_nm,
    sparsity_of,
    zeros_of,
)
from prunekit.engine.quantize import Quantized, joint_grids
from prunekit.engine.schedule import run_schedule
from prunekit.engine.step import Pruning
from prunekit.errors import GateError, ModelMismatchError, NumericalError, UsageError
from prunekit.formats.metadata import StructureRecord
from prunekit.formats.onnx_quant import (
    check_calibration,
)
from prunekit.load.data import (
    Splits,
    limit_labels,
    load_data,
    validation_size,
    validation_split,
)
from prunekit.load.models import (
    LOAD_BOUNDS,
    default_data,
    first_non_finite,
    load_model,
    sized_by_data,
)
from prunekit.pruners import registry
from prunekit.run.config import PruneConfig
from prunekit.run.exports import EXPORT_FORMATS, metadata_for, write_exports
from prunekit.run.fine_tuning import distills, fine_tuning
from prunekit.run.quantized import quantize_mode, round_weights, write_quantized
from prunekit.run.recipe import anchored, check_types
from prunekit.run.report import accuracy_warnings, build_report, shrunk_record
from prunekit.runtime import distributed
from prunekit.runtime.batches import eval_mode
from prunekit.runtime.device import resolve_device
from prunekit.runtime.outputs import prepare_output, staged_dir
from prunekit.runtime.progress import Reporter, Silent
from prunekit.runtime.timing import Timings
from prunekit.structured.groups import UntraceableError
from prunekit.structured.plan import STRUCTURES, ChannelPlan, composed
from prunekit.validate.metrics import accuracy, cosine_fidelity, outputs_on, perplexity
from prunekit.validate.onnx_runtime import validate


@dataclass
class Outcome:
    """What a run produced in memory: its report, the pruned and dense models, the data."""

    report: dict[str, Any]
    model: nn.Module
    dense_model: nn.Module | None
    data: Splits
    timings: Timings
    targets: list[Target]
    quantized: Quantized | None = None

    def masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks (True = kept) by dotted weight name, on the CPU."""
        return {t.name: t.mask.detach().cpu().clone() for t in self.targets}


@dataclass
class Inputs:
    """What a run prunes: the model and data, where they came from, what loading noted."""

    model: nn.Module
    data: Splits
    source: dict[str, Any]  # model, weights, trusted_checkpoint, data: for the report
    notes: list[str] = field(default_factory=list)  # warnings from loading
    structure: StructureRecord | None = None  # channels an earlier structured run removed


BOUNDS = {  # options whose values outside these can only be mistakes
    **LOAD_BOUNDS,
    "seed": (0, 2**63 - 1),
    "min_channels": (1, 1_000_000),
    "channel_multiple": (1, 4096),
    "validate_runs": (1, 1_000_000),
    "validate_threads": (1, 1024),  # (left out: ONNX Runtime's default)
    "memory_budget": (1, 2**62),  # bytes (0 is not "the default")
}
FLAGS = {"validate_runs": "--runs", "validate_threads": "--threads"}  # where not --NAME


def check_bounds(config: PruneConfig) -> None:
    """Integer options within what can be meant (Python API and CLI alike)."""
    for name, (low, high) in BOUNDS.items():
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            flag = FLAGS.get(name, f"--{name.replace('_', '-')}")
            raise UsageError(f"{flag} {value!r}: give an integer from {low} to {high}")


def check(config: PruneConfig) -> None:
    """Validate everything cheap before any work is done."""
    check_types(config)  # a configuration built in Python gets the recipe's schema too
    check_bounds(config)
    check_sparsity(config.sparsity)
    config.preprocess().check()
    check_mask(config.mask, config.sparsity)
    config.schedule.check(config.sparsity)
    if parse_nm(config.mask) is not None and config.schedule.stepped(config.sparsity):
        raise UsageError(
            f"--mask {config.mask} is chosen in one step (an N:M pattern has no intermediate "
            "sparsity): use --recompute 1 and the oneshot or pbt schedule"
        )
    for glob, level in config.layer_sparsity.items():
        if not (isinstance(level, int | float) and 0.0 <= level < 1.0):
            raise UsageError(
                f"--layer-sparsity {glob}={level}: give a fraction in [0, 1), e.g. 0.9 for 90 %"
            )
    if config.layer_sparsity and (parse_nm(config.mask) is not None or config.structure):
        what = (
            f"--mask {config.mask}" if parse_nm(config.mask) else f"--structure {config.structure}"
        )
        raise UsageError(
            f"--layer-sparsity sets unstructured per-layer fractions; it does not combine with "
            f"{what}: drop one of them"
        )
    unknown = sorted(set(config.exports) - set(EXPORT_FORMATS))
    if unknown:
        raise UsageError(
            f"--export {','.join(config.exports)}: choose from "
            f"{', '.join(EXPORT_FORMATS)} (comma-separated)"
        )
    if config.structure is not None:
        if config.structure not in STRUCTURES:
            raise UsageError(f"--structure {config.structure}: use {', '.join(STRUCTURES)}")
        if config.mask not in ("global", "layer"):
            raise UsageError(
                f"--mask {config.mask} with --structure {config.structure}: use global (one "
                "threshold over all channels) or layer (the same fraction of every group)"
            )
        if config.min_channels < 1:
            raise UsageError(f"--min-channels {config.min_channels}: give at least 1")
        if config.channel_multiple < 1:
            raise UsageError(
                f"--channel-multiple {config.channel_multiple}: give at least 1 (e.g. 8)"
            )
    if config.validate and "onnx" not in config.exports:
        raise UsageError("--validate needs the ONNX export: add --export safetensors,onnx")
    quantization = config.quantization()
    if quantization is not None:
        quantization.check()
    gated = config.max_accuracy_drop is not None or config.min_cosine is not None
    if gated and not config.validate:
        raise UsageError("--max-accuracy-drop and --min-cosine gate the validation: add --validate")
    config.validate_options().check()


def _check_objective(
    config: PruneConfig, pruner: Pruner, data: Splits, objective: Objective
) -> None:
    """Label-free objectives feed curvature pruners; training needs labels."""
    if pruner.needs - LABEL_FREE and objective.sampled:
        raise UsageError(
            f"pruner '{config.pruner}' ranks by the mean gradient, which is zero under "
            f"--objective {objective.name} (no labels: the dense model is its minimum); use "
            "labeled data with --objective labels, or a curvature pruner (fisher_diag, "
            "fisher_pruner, woodfisher, fishleg)"
        )
    schedule = config.schedule
    if data.labeled or not schedule.trains() or distills(config, data.labeled):
        return
    raise UsageError(
        f"the {schedule.kind} schedule trains the model, which needs labels or the dense "
        f"model as a teacher; {data.spec} has no labels and --no-distill was given"
    )


def execute(
    config: PruneConfig, reporter: Reporter | None = None, device: torch.device | None = None
) -> Outcome:
    """Load, prune (and train, by the schedule) and evaluate; write nothing."""
    reporter = reporter or Silent()
    config = anchored(config)
    check(config)
    device = device or resolve_device(config.device)
    timings = Timings(device)
    pruner = registry.create(config.pruner, config.params)
    with reporter.stage("loading model and data"), timings.phase("load"):
        inputs = load_inputs(config)
    return prune_model(config, inputs, pruner, device, reporter, timings)


def load_inputs(config: PruneConfig) -> Inputs:
    """The model and data ``config`` names."""
    data_spec = config.data or default_data(config.model)
    if data_spec is None:
        raise UsageError(f"{config.model} comes with no dataset; pass --data SPEC")
    data = load_data(data_spec, config.preprocess(), config.model, config.max_length)
    num_classes = config.num_classes
    if num_classes is None and data.num_classes and sized_by_data(config.model, config.weights):
        num_classes = data.num_classes
    loaded = load_model(config.model, config.weights, num_classes, config.trust_checkpoint)
    kind = getattr(loaded.model, "kind", None)
    if data.labeled and data.spec.startswith("text:") and kind != "classifier":
        raise UsageError(
            f"{data.spec} holds labels, but {config.model} is not a sequence classifier (it "
            f"returns {'next-token logits' if kind == 'decoder' else 'embeddings'}): give "
            "the texts without labels, or a *ForSequenceClassification model"
        )
    source = {
        "model": config.model,
        "weights": str(config.weights) if config.weights else loaded.weights and "shipped",
        "trusted_checkpoint": loaded.trusted_checkpoint,
        "data": data_spec,
    }
    notes = [*data.notes, *loaded.warnings]
    return Inputs(loaded.model, data, source, notes, loaded.structure)


def prune_model(
    config: PruneConfig,
    inputs: Inputs,
    pruner: Pruner,
    device: torch.device,
    reporter: Reporter,
    timings: Timings,
) -> Outcome:
    """Prune ``inputs.model`` on ``inputs.data`` by ``config`` (its model and data specs are
    only recorded)."""
    torch.manual_seed(config.seed)
    model, data = inputs.model, inputs.data
    warnings = list(inputs.notes)
    home = host_of(model, pruner, config, device)  # where the model lives during the run
    if home != device:
        reporter.note(
            f"the decoder's weights stay in host memory: {pruner.name} takes one block at a "
            f"time to {device}; evaluation runs on the host"
        )
    with reporter.stage("checking model and data"), timings.phase("load"):
        model, outputs, targets = checked_model(config, model, data, home, warnings)
        zero_before, _ = zeros_of(targets)  # an earlier run's zeros, say
    plan = None
    if config.structure is not None:
        with reporter.stage("finding channel groups"), timings.phase("load"):
            plan = channel_plan(config, pruner, model, data, targets, device, warnings)
    objective = resolve_objective(
        config.objective, data.labeled, returns_embeddings(model), data.spec
    )
    warnings += check_fit(config, pruner, data, objective)

    def evaluate(m: nn.Module) -> float | None:
        return accuracy(m, data.test, home) if data.labeled else None

    decoder = getattr(model, "kind", None) == "decoder"
    with reporter.stage("evaluating the dense model"), timings.phase("evaluation"):
        dense_accuracy = evaluate(model)
        dense_outputs = None if data.labeled else outputs_on(model, data.test, home)
        dense_perplexity = perplexity(model, data.test, home) if decoder else None
    dense_model = copy.deepcopy(model).cpu() if "onnx" in config.exports else None
    distillation, augment, tuning = fine_tuning(config, model, data)

    state = Pruning.of(
        model,
        targets,
        pruner,
        data.calibration,
        device,
        config.mask,
        config.memory_budget,
        config.seed,
        timings=timings,
        objective=objective,
        structure=plan,
    )
    state.overrides, state.final = own_sparsities(config, targets), config.sparsity
    quantization = config.quantization()
    joint = isinstance(pruner, LayerPruner) and plan is None and not config.schedule.trains()
    if quantization is not None and joint:  # nothing moves the weights after the last step
        state.grids = joint_grids(state, quantization)
    if config.verbose and pruner.needs - LAYER_INPUTS:
        reporter.note(memory_plan_of(state).describe())
        if pruner.needs & PER_SAMPLE:
            reporter.note(engine_note(state.context.targets, pruner.stats_spec().grad_engine))
    # a run that trains keeps a validation part of its training split for its history
    fit, validation = (
        validation_split(data.train) if config.schedule.trains() else (data.train, None)
    )
    held_out = validation if data.labeled else None  # (no accuracy without labels)

    with reporter.stage(f"{config.schedule.kind} pruning with {config.pruner}") as status:
        step_warnings, history = run_schedule(
            state,
            config.sparsity,
            config.schedule,
            fit,
            evaluate=(lambda m: accuracy(m, held_out, home)) if held_out is not None else None,
            on_event=status,
            distillation=distillation,
            augment=augment,
        )
        warnings += step_warnings
    distillation = None  # the teacher's memory back before evaluation
    # default: re-estimate where whole channels were removed (dev ResNet-56, 50 % of the
    # channels one-shot: magnitude 33.4 -> 68.6 %, woodfisher 45.1 -> 54.5 %)
    recalibrate = plan is not None if config.recalibrate_bn is None else config.recalibrate_bn
    if recalibrate:
        with reporter.stage("re-estimating BatchNorm statistics"), timings.phase("batchnorm"):
            recalibrate_batchnorm(model, data.calibration, device)
    check_finite_model(model)
    pruned, _ = sparsity_of(targets)
    achieved, per_tensor = zeros_of(targets)  # what the files hold: every zero
    if zero_before >= 0.001:
        warnings.append(
            f"{zero_before:.1%} of the pruned tensors' weights were zero before this run; the "
            f"reported sparsity counts every zero ({achieved:.1%}), this run's masks cover "
            f"{pruned:.1%} (report.json: sparsity.zero_before, sparsity.pruned)"
        )
    structure = None
    if plan is not None:
        warnings += plan.warnings
        with reporter.stage("removing the pruned channels"), timings.phase("prune"):
            structure = shrunk_record(plan, data)
    channels_kept = None  # of the architecture, through every structured run so far
    if structure is not None or inputs.structure is not None:
        earlier = inputs.structure.kept if inputs.structure is not None else None
        channels_kept = {
            "kept": composed(earlier, structure["kept"] if structure else None),
            "input_shape": list(data.input_shape),
        }

    quantized, rounding = None, None
    if quantization is not None:
        quantized, rounding = round_weights(
            model, state, quantization, evaluate, reporter, warnings
        )
    with reporter.stage("evaluating the pruned model"), timings.phase("evaluation"):
        pruned_accuracy = evaluate(model)
        fidelity = (
            None
            if dense_outputs is None
            else cosine_fidelity(dense_outputs, outputs_on(model, data.test, home))
        )
        pruned_perplexity = perplexity(model, data.test, home) if decoder else None
    warnings += accuracy_warnings(config, pruner, recalibrate, dense_accuracy, pruned_accuracy)
    results = {
        "num_classes": outputs,
        "validation_samples": len(cast(Sized, validation)) if validation is not None else 0,
        "recalibrate_bn": recalibrate,
        "sparsity": {
            "target": config.sparsity,
            "achieved": achieved,  # zero weights of the targets, pruned or zero before
            "per_tensor": per_tensor,
            "pruned": pruned,  # masked by this run
            "zero_before": zero_before,
            "own": dict(state.overrides),  # --layer-sparsity: tensor -> its own target
        },
        "structure": structure,
        "channels_kept": channels_kept,
        "accuracy": {"dense": dense_accuracy, "pruned": pruned_accuracy},
        "fidelity": fidelity,
        "perplexity": None
        if dense_perplexity is None
        else {"dense": dense_perplexity, "pruned": pruned_perplexity},
        "history": history,
        "fine_tuning": tuning,
        "warnings": warnings,
        "quantize": rounding,
    }
    report = build_report(config, state, inputs.source, results, timings)
    # after --structure the targets' masks describe the unshrunk shapes: none are handed out
    return Outcome(
        report, model, dense_model, data, timings, [] if plan else list(targets), quantized
    )


def checked_model(
    config: PruneConfig, model: nn.Module, data: Splits, device: torch.device, warnings: list[str]
) -> tuple[nn.Module, int, list[Target]]:
    """The model on ``device`` after its weights, outputs and labels are checked against the
    data; its number of outputs and the weights ``config`` prunes."""
    model = model.to(device)
    check_usable_weights(model)
    outputs = check_outputs(model, data, device)
    limit_labels(data, outputs)
    if data.labeled and 0 < data.num_classes < outputs and config.weights is None:
        warnings.append(
            f"the model has {outputs} outputs but {data.spec} has {data.num_classes} "
            "classes: predictions of classes the data never holds count as errors; "
            "give --num-classes or a factory that takes num_classes"
        )
    return model, outputs, select_targets(config, model, warnings)


def own_sparsities(config: PruneConfig, targets: list[Target]) -> dict[str, float]:
    """``--layer-sparsity``: each target's own sparsity, by the first glob its name matches;
    a glob that matches no target is an error naming it."""
    table = config.layer_sparsity
    if not table:
        return {}
    found: dict[str, float] = {}
    used: set[str] = set()
    for t in targets:
        glob = next((g for g in table if fnmatch.fnmatchcase(t.name, g)), None)
        if glob is not None:
            found[t.name] = table[glob]
            used.add(glob)
    unused = [g for g in table if g not in used]
    if unused:
        names = ", ".join(t.name for t in targets[:3])
        raise UsageError(
            f"--layer-sparsity '{unused[0]}' matches no pruned weight (names look like "
            f"{names}, ...; excluded and N:M misfit layers are not pruned): fix the glob"
        )
    return found


def select_targets(config: PruneConfig, model: nn.Module, warnings: list[str]) -> list[Target]:
    """The weights ``config`` prunes (``--exclude``, N:M misfits left dense, with warnings)."""
    targets, unused = find_targets(model, config.exclude)
    warnings += [f"--exclude '{g}' matched no prunable weight" for g in unused]
    misfits = nm_misfits(targets, config.mask)
    if misfits:
        names = ", ".join(t.name for t in misfits)
        warnings.append(
            f"--mask {config.mask}: left dense {names} ("
            + (
                "inputs per output"
                if config.mask.endswith(":flat")
                else "input channels, or inputs per output of a Linear"
            )
            + f" not a multiple of {config.mask.split(':')[1]})"
        )
        targets = [t for t in targets if t not in misfits]
        if not targets:
            raise UsageError(
                f"--mask {config.mask} fits none of the prunable weights (input channels "
                "not a multiple of M); use another mask"
            )
    return targets


def check_fit(config: PruneConfig, pruner: Pruner, data: Splits, objective: Objective) -> list[str]:
    """The pruner's statistics and the schedule's training fit the data; warnings for what
    was adapted."""
    _check_objective(config, pruner, data, objective)
    warnings = cap_num_grads(config, pruner, len(cast(Sized, data.calibration)))
    if pruner.needs - LAYER_INPUTS:
        check_spec(pruner.stats_spec(), len(cast(Sized, data.calibration)))
        if pruner.stats_spec().fisher == "true" and pruner.needs - LABEL_FREE:
            warnings.append(
                f"{config.pruner} uses the mean gradient, which averages to zero "
                "with labels sampled from the model (fisher=true)"
            )
    if config.schedule.trains():
        n = len(cast(Sized, data.train))
        config.schedule.train.check(n - validation_size(n))
    if config.quantize is not None and quantize_mode(data) == "static":
        check_calibration(len(cast(Sized, data.calibration)))
    return warnings


def memory_plan_of(state: Pruning) -> MemoryPlan:
    """The memory plan the first step's statistics will follow (for --verbose)."""
    plan = state.collector().plan
    assert plan is not None  # the pruner needs gradient statistics
    return plan


def channel_plan(
    config: PruneConfig,
    pruner: Pruner,
    model: nn.Module,
    data: Splits,
    targets: list[Target],
    device: torch.device,
    warnings: list[str],
) -> ChannelPlan | None:
    """The channel plan of ``--structure``; None when the model cannot be traced and
    ``channels-or-weights`` allows unstructured pruning instead."""
    if not pruner.structured:
        raise UsageError(
            f"{config.pruner} picks weights inside each layer and cannot score channels; "
            "with --structure channels use magnitude, wanda, the fisher_* criteria or woodfisher"
        )
    example = data.calibration[0][0].unsqueeze(0).to(device)
    try:
        plan = ChannelPlan.of(model, example, targets, config.min_channels, config.channel_multiple)
    except UntraceableError as exc:
        if config.structure != "channels-or-weights":
            raise
        warnings.append(f"{str(exc).split('; ')[0]}: pruned unstructured instead")
        return None
    left = plan.left
    if left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        warnings.append(
            f"--structure channels: {len(left)} layer(s) keep all their channels, which "
            "reach the output, a reshape, a concatenation or a padding: "
            f"{', '.join(left[:5])}{more} (report.json: structure.left_whole)"
        )
    return plan


HOST_SHARE = 0.5  # a decoder over this share of the free GPU memory stays in host memory


def host_of(
    model: nn.Module,
    pruner: Pruner,
    config: PruneConfig,
    device: torch.device,
    free: int | None = None,
) -> torch.device:
    """Where the model is kept: ``device``, except for a decoder pruned layer-wise (one-shot,
    no training) on a GPU whose free memory (``free``, measured when None) is less than
    twice its weights: then the host, and the pruner takes one block at a time to the GPU."""
    decoder = getattr(model, "kind", None) == "decoder"
    if device.type != "cuda" or not decoder or not isinstance(pruner, LayerPruner):
        return device
    if config.schedule.trains() or config.quantize is not None:
        return device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if free is None:
        free, _ = torch.cuda.mem_get_info(device)
    return torch.device("cpu") if weights > HOST_SHARE * free else device


@torch.no_grad()
def check_outputs(model: nn.Module, data: Splits, device: torch.device) -> int:
    """The model's number of outputs; an error when the data's labels do not fit it."""
    x = data.calibration[0][0].unsqueeze(0).to(device)
    try:
        with eval_mode(model):
            logits = model(x)
    except Exception as exc:  # shape errors come as RuntimeError, ValueError, AssertionError...
        if isinstance(exc, RuntimeError) and is_out_of_memory(exc):
            raise
        weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if x.is_floating_point() and weights is not None and weights != x.dtype:
            raise ModelMismatchError(
                f"the model's weights are {str(weights).removeprefix('torch.')} and the data "
                f"{str(x.dtype).removeprefix('torch.')}: give the model in the data's precision "
                "(model.float())"
            ) from None
        raise ModelMismatchError(
            f"the model cannot take inputs of shape {tuple(x.shape[1:])} from {data.spec} "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); pick --data that "
            "matches the architecture"
        ) from exc
    decoder = getattr(model, "kind", None) == "decoder"  # (N, L, V) next-token logits
    if not isinstance(logits, torch.Tensor) or logits.dim() != (3 if decoder else 2):
        raise ModelMismatchError(
            f"the model returns {getattr(logits, 'shape', type(logits).__name__)} for one "
            "input; prunekit prunes classifiers that return (batch, classes) logits"
        )
    outputs = logits.shape[-1]
    if data.labeled and data.num_classes > outputs:
        raise ModelMismatchError(
            f"{data.spec} has labels up to {data.num_classes - 1} but the model has {outputs} "
            "outputs; check --data, or --num-classes for torchvision and factory models"
        )
    return outputs


def check_usable_weights(model: nn.Module) -> None:
    """Weights that can be pruned: with values (not on the meta device), finite, and in a
    precision that can factor a Fisher or a Hessian (float32 or float64)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise UsageError(f"{name} is on the meta device (no values); load the weights first")
        if not tensor.is_floating_point():
            continue
        if tensor.dtype not in (torch.float32, torch.float64):
            raise UsageError(
                f"the model holds {str(tensor.dtype).removeprefix('torch.')} weights ({name}); "
                "prune a float32 copy (model.float()) and cast the result back"
            )
        if not torch.isfinite(tensor).all():
            raise ModelMismatchError(
                f"{name} holds {int((~torch.isfinite(tensor)).sum())} NaN or Inf value(s) "
                "before pruning; fix the weights"
            )


def check_finite_model(model: nn.Module) -> None:
    """No NaN model is written: name the first tensor that went non-finite."""
    bad = first_non_finite(model.state_dict())
    if bad is not None:
        raise NumericalError(
            f"after pruning, {bad[0]} holds NaN or Inf; raise --param damp or lower the "
            "sparsity per step (--recompute), or report it with --debug"
        )


def cap_num_grads(config: PruneConfig, pruner: Pruner, available: int) -> list[str]:
    """Fit the default num_grads to a small calibration split (an explicit value must fit)."""
    wanted, batch = pruner.hparams.get("num_grads"), pruner.hparams.get("grad_batch", 1)
    if wanted is None or "num_grads" in config.params or wanted * batch <= available:
        return []
    capped = max(1, available // batch)
    pruner.hparams["num_grads"] = capped
    return [
        f"num_grads lowered from {wanted} to {capped}: the calibration split has "
        f"{available} samples"
    ]


def run(config: PruneConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Prune ``config.model`` and write OUT/model.safetensors, the exports and report.json."""
    device = resolve_device(config.device)
    with distributed.process_group(device):
        return _run(config, reporter if distributed.is_main() else None, device)


def validate_outputs(
    stage: Path, config: PruneConfig, outcome: Outcome, files: list[str]
) -> dict[str, Any]:
    """The validation of model.onnx against dense.onnx, and of the quantized export against
    dense.onnx (accuracy, speed-up) with its parity to model.onnx (the same weights in FP32)."""
    data, options = outcome.data, config.validate_options()
    result = validate(
        stage / "model.onnx",
        data.test,
        data.input_shape,
        options,
        baseline=stage / "dense.onnx",
        torch_model=outcome.model,
    )
    result["model"] = str(config.out / "model.onnx")
    result["baseline"] = str(config.out / "dense.onnx")
    _final_paths(result, stage, config.out)
    quantized = next((f for f in files if f.startswith("model.int")), None)
    if quantized is not None:
        result["quantized"] = validate(
            stage / quantized,
            data.test,
            data.input_shape,
            options,
            baseline=stage / "dense.onnx",
            parity_skipped="a quantized export: compared with model.onnx (parity_fp32)",
            parity_reference=stage / "model.onnx",
        )
        result["quantized"]["model"] = str(config.out / quantized)
        result["quantized"]["baseline"] = str(config.out / "dense.onnx")
        _final_paths(result["quantized"], stage, config.out)
    return result


def _final_paths(report: dict[str, Any], stage: Path, out: Path) -> None:
    """References to files of the staging folder, as they will be named once moved."""
    for key in ("fidelity", "parity_fp32"):
        entry = report.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("reference"), str):
            entry["reference"] = entry["reference"].replace(str(stage), str(out))


def _run(config: PruneConfig, reporter: Reporter | None, device: torch.device) -> dict[str, Any]:
    config = anchored(config)
    reporter = reporter or Silent()
    main = distributed.is_main()  # under torchrun only rank 0 writes
    if config.quantize is not None and "onnx" not in config.exports:
        raise UsageError(
            f"--quantize {config.quantize} writes a quantized ONNX: add --export safetensors,onnx"
        )
    cleaned = prepare_output(config.out, config.force) if main else []
    outcome = execute(config, reporter, device)  # validates the config before any work
    report, data, timings = outcome.report, outcome.data, outcome.timings
    report["warnings"] = cleaned + report["warnings"]
    if not main:
        return report
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
                outcome.quantized.tensors if outcome.quantized else None,
            )
        if outcome.quantized is not None:
            with timings.phase("export"):
                files += write_quantized(
                    stage, config, outcome.model, outcome.data, outcome.quantized, metadata,
                    report, reporter,
                )  # fmt: skip
        report["sizes"] = {name: (stage / name).stat().st_size for name in files}
        if config.validate:
            with reporter.stage("validating in ONNX Runtime"), timings.phase("validation"):
                report["validation"] = validate_outputs(stage, config, outcome, files)
            failures = [
                *report["validation"]["failures"],
                *report["validation"].get("quantized", {}).get("failures", []),
            ]
            gated = config.max_accuracy_drop is not None or config.min_cosine is not None
            if gated and failures:  # nothing is written under the final name
                raise GateError(f"validation failed, nothing written: {'; '.join(failures)}")
        report["outputs"] = [str(config.out / name) for name in [*files, "report.json"]]
        report["phases"] = timings.to_json()
        report["seconds"] = timings.elapsed()
        (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
