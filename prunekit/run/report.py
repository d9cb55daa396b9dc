"""report.json: what a run records about itself, assembled in one place."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from prunekit.contract.pruner import Pruner
from prunekit.engine.step import Pruning
from prunekit.load.data import Splits
from prunekit.run.config import PruneConfig
from prunekit.run.recipe import recipe_of
from prunekit.runtime import distributed
from prunekit.runtime.batches import eval_mode
from prunekit.runtime.timing import Timings
from prunekit.structured.plan import ChannelPlan

ACCURACY_DROP_WARNING = 0.10  # absolute top-1 loss that earns a warning with remedies


def build_report(
    config: PruneConfig,
    state: Pruning,
    source: dict[str, Any],
    results: dict[str, Any],
    timings: Timings,
) -> dict[str, Any]:
    """The report of a pruning run; ``results`` holds what the run measured (num_classes,
    recalibrate_bn, sparsity, structure, accuracy, fidelity, history, warnings)."""
    pruner, ctx = state.pruner, state.context
    return {
        "command": shlex.join(config.command) if config.command else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **source,
        "preprocess": {
            "normalize": config.normalize,
            "image_size": config.image_size,
            "max_length": config.max_length,
        },
        "num_classes": results["num_classes"],
        "validation_samples": results["validation_samples"],  # held out of training
        "pruner": config.pruner,
        "params": pruner.hparams,
        "recipe": recipe_of(config, pruner.hparams),
        "objective": ctx.objective.name,
        "mask": config.mask,
        "schedule": {
            "kind": config.schedule.kind,
            "recompute": "auto" if config.schedule.recompute is None else config.schedule.recompute,
            "pruning_steps": ctx.step,
        },
        "recalibrate_bn": results["recalibrate_bn"],
        "device": str(ctx.device),
        "world_size": distributed.world_size(),
        "seed": config.seed,
        "sparsity": results["sparsity"],
        "structure": results["structure"],
        # the channels of the architecture kept so far (this run's and the start's cuts):
        # what loading the weights re-applies
        "channels_kept": results.get("channels_kept"),
        "parameters": parameter_counts(ctx.model),
        "accuracy": results["accuracy"],
        "fidelity": results["fidelity"],
        "perplexity": results.get("perplexity"),  # decoders, on the held-out text
        "quantize": results.get("quantize"),
        "history": results["history"],
        "fine_tuning": results.get("fine_tuning"),
        "pruner_diagnostics": pruner.diagnostics(),
        "statistics": state.statistics,
        "warnings": results["warnings"],
        "phases": timings.to_json(),
        "seconds": timings.elapsed(),
    }


def shrunk_record(plan: ChannelPlan, data: Splits) -> dict[str, Any]:
    """Cut the removed channels out of the plan's model (in place); what changed, for the
    report."""
    model, example = plan.model, plan.example
    before = (parameter_counts(model)["total"], flops_of(model, example))
    channels = plan.channels()
    removed = plan.removed_fraction()
    record = plan.shrink()
    after = (parameter_counts(model)["total"], flops_of(model, example))
    return {
        "kind": "channels",
        "groups": len(plan.groups),
        "channels": channels,
        "removed": removed,
        "min_channels": plan.min_channels,
        "channel_multiple": plan.multiple,
        "left_whole": plan.left,
        "kept": record,
        "parameters": {"before": before[0], "after": after[0]},
        "flops_per_sample": {"before": before[1], "after": after[1]},
        "input_shape": list(data.input_shape),
    }


def flops_of(model: nn.Module, example: torch.Tensor) -> int:
    """Floating-point operations of one forward pass (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


def versions() -> dict[str, str]:
    """prunekit and the libraries whose behaviour decides a run's numbers."""
    import onnx
    import onnxruntime

    from prunekit.version import __version__

    return {
        "prunekit": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
    }


def parameter_counts(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "nonzero": sum(int(torch.count_nonzero(p)) for p in params),
    }


def accuracy_warnings(
    config: PruneConfig,
    pruner: Pruner,
    recalibrated: bool,
    dense: float | None,
    pruned: float | None,
) -> list[str]:
    """A warning with the likely remedies when pruning cost much of the dense accuracy."""
    if dense is None or pruned is None or dense - pruned <= ACCURACY_DROP_WARNING:
        return []
    remedies = []
    if pruner.compensates() and config.schedule.recompute is not None:
        remedies.append("--recompute auto (or a larger K)")
    if not pruner.compensates():
        remedies.append("a second-order pruner (--pruner woodfisher)")
    if not recalibrated:
        remedies.append("--recalibrate-bn")
    if not config.schedule.trains():
        remedies.append("--finetune-epochs N or --schedule gradual")
    if config.sparsity > 0.5:
        remedies.append("a lower --sparsity")
    return [
        f"pruned accuracy {pruned:.2%} is {dense - pruned:.1%} below dense ({dense:.2%}); "
        f"try {', '.join(remedies)}"
    ]
