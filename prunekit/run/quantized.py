"""--quantize in a run: rounding the pruned weights (with the report's record of it) and
writing the quantized ONNX export beside the FP32 one."""

from __future__ import annotations

from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from prunekit.engine.masks import find_targets
from prunekit.engine.quantize import QuantizeConfig, Quantized, quantize_weights
from prunekit.engine.step import Pruning
from prunekit.formats.onnx_quant import CALIBRATION_SAMPLES, QuantizationError, input_batches
from prunekit.load.data import Splits
from prunekit.run.config import PruneConfig
from prunekit.run.exports import write_quantized_onnx
from prunekit.runtime.progress import Reporter


def round_weights(
    model: nn.Module,
    state: Pruning,
    config: QuantizeConfig,
    evaluate: Callable[[nn.Module], float | None],
    reporter: Reporter,
    warnings: list[str],
) -> tuple[Quantized, dict[str, Any]]:
    """Round the pruned model's weights in place; the codes, and the report's record."""
    timings = state.context.timings
    with reporter.stage("evaluating before rounding"), timings.phase("evaluation"):
        unrounded = evaluate(model)
    with reporter.stage(f"rounding the weights to {config.kind}") as status:
        quantized = quantize_model(model, state, config, status)
    left = quantized.left_int8
    if left:
        warnings.append(
            f"--quantize int4: {len(left)} layer(s) stay INT8 (not a Linear whose inputs "
            f"divide into groups of {config.group_size}): {', '.join(left[:5])}"
            f"{' and more' if len(left) > 5 else ''}"
        )
    return quantized, {
        "kind": config.kind,
        "rounding": config.rounding if config.bits == 4 else "rtn",
        "group_size": config.group_size if config.bits == 4 else None,
        "layers": quantized.kinds(),
        "left_int8": left,
        "rounded_while_pruning": quantized.joint,
        "accuracy_before_rounding": unrounded,
    }


def quantize_model(
    model: nn.Module, state: Pruning, config: QuantizeConfig, say: Callable[[str], None]
) -> Quantized:
    """Round every Conv/Linear weight of ``model`` (as it is now: shrunk after --structure)
    to its grid in place; zeros, pruned or not, stay zero."""
    ctx = state.context
    targets, _ = find_targets(model)
    for t in targets:
        t.mask = t.weight.detach() != 0
    rounding = Pruning.of(
        model, targets, state.pruner, ctx.calibration, ctx.device, timings=ctx.timings,
        objective=ctx.objective,
    )  # fmt: skip
    rounding.context.say = say
    return quantize_weights(rounding, config, state.rounded)


def quantize_mode(data: Splits) -> str:
    """static INT8 (calibrated activation ranges) for images and tensors; dynamic for text
    (transformer encoders, whose activation ranges vary too much for fixed ones)."""
    return "dynamic" if data.spec.startswith("text:") else "static"


def calibration_batches(data: Splits) -> list[np.ndarray]:
    """The first samples of the calibration split as input batches, for activation ranges."""
    count = min(CALIBRATION_SAMPLES, len(cast(Sized, data.calibration)))
    return input_batches(torch.stack([data.calibration[i][0] for i in range(count)]).numpy())


def write_quantized(
    stage: Path,
    config: PruneConfig,
    model: nn.Module,
    data: Splits,
    quantized: Quantized,
    metadata: dict[str, str],
    report: dict[str, Any],
    reporter: Reporter,
) -> list[str]:
    """The quantized ONNX export into ``stage`` (recorded in ``report``); the files written."""
    quantization = config.quantization()
    assert quantization is not None
    mode = quantize_mode(data)
    with reporter.stage(f"quantizing the ONNX export ({mode})"):
        try:
            name, info = write_quantized_onnx(
                stage, model, data.input_shape, metadata, quantization.kind, mode, quantized,
                calibration_batches(data) if mode == "static" else None,
            )  # fmt: skip
        except QuantizationError as exc:
            if not config.quantize_fallback:
                raise
            report["warnings"].append(f"{exc}: kept the FP32 export only")
            name, info = "", {"skipped": str(exc)}
    if name and info["float_ops"]:
        ops = ", ".join(f"{op} x{n}" for op, n in info["float_ops"].items())
        report["warnings"].append(
            f"ONNX Runtime left {ops} in FP32 in {name} (the rest is quantized)"
        )
    report["quantize"]["onnx"] = {"file": name or None, **info}
    return [name] if name else []
