"""``--quantize``: every pruned weight rounded to an integer grid, held dequantized.

INT8 (``int8``): every target per output channel, round to nearest on ONNX Runtime's own
per-channel grid (s = max|w| / 127), so its static and dynamic quantizers re-derive exactly
these codes (also after folding BatchNorm, which scales a channel's weights and scale alike).
INT4 (``int4``): the Linear layers whose inputs divide into groups of ``group_size``, one
scale per group, by ``rounding``: ``rtn`` (round to nearest) or ``gptq`` (column by column
with OBS compensation under each layer's input Gram matrix, the statistic SparseGPT uses,
layers in forward order measured through those already rounded); every other target is left
at INT8 and listed. Pruned entries have code 0, so they stay exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.calibrate.layer_inputs import input_gram, ordered_targets
from prunekit.contract.quantization import QuantGrid, QuantizedTensor
from prunekit.contract.target import Target
from prunekit.engine.step import Pruning
from prunekit.errors import UsageError
from prunekit.pruners.layerwise import gptq

QUANTIZE = ("int8", "int4")
ROUNDING = ("rtn", "gptq")
GROUP_SIZES = (16, 32, 64, 128, 256)  # what ONNX Runtime's 4-bit MatMul takes


@dataclass(frozen=True)
class QuantizeConfig:
    """How weights are quantized: ``kind`` int8 or int4, the rounding of the 4-bit layers,
    inputs per 4-bit scale, and the GPTQ damping and calibration samples."""

    kind: str = "int8"
    rounding: str = "gptq"
    group_size: int = 32
    damp: float = 0.01
    num_samples: int = 128

    def check(self) -> None:
        if self.kind not in QUANTIZE:
            raise UsageError(f"--quantize {self.kind}: use {' or '.join(QUANTIZE)}")
        if self.rounding not in ROUNDING:
            raise UsageError(f"--rounding {self.rounding}: use {' or '.join(ROUNDING)}")
        if self.group_size not in GROUP_SIZES:
            raise UsageError(
                f"--group-size {self.group_size}: use one of "
                f"{', '.join(map(str, GROUP_SIZES))} (ONNX Runtime's 4-bit blocks)"
            )

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4


@dataclass
class Quantized:
    """What ``quantize_weights`` did: a grid per target, and the layers left at INT8."""

    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)
    left_int8: list[str] = field(default_factory=list)
    joint: list[str] = field(default_factory=list)  # rounded by the pruner in its last pass

    def kinds(self) -> dict[str, str]:
        return {name: f"int{q.bits}" for name, q in self.tensors.items()}


def joint_grids(state: Pruning, config: QuantizeConfig) -> dict[str, QuantGrid]:
    """The 4-bit grids a layer-wise pruner rounds to in its last pass (GPTQ rounding inside
    SparseGPT's column solver: prune and quantize at once)."""
    if config.bits != 4 or config.rounding != "gptq":
        return {}
    grids = {t.name: grid_for(t, config) for t in state.context.targets}
    return {name: grid for name, grid in grids.items() if grid.bits == 4}


def grid_for(target: Target, config: QuantizeConfig) -> QuantGrid:
    """INT4 groups for a Linear whose inputs divide into them; INT8 per channel otherwise."""
    module = target.module
    if (
        config.bits == 4
        and isinstance(module, nn.Linear)
        and module.in_features % config.group_size == 0
    ):
        return QuantGrid(4, config.group_size)
    return QuantGrid(8)


@torch.no_grad()
def quantize_weights(
    state: Pruning, config: QuantizeConfig, rounded: dict[str, QuantizedTensor] | None = None
) -> Quantized:
    """Round every target of ``state`` to its grid in place (forward order); return the
    codes and scales. ``rounded``: targets a layer-wise pruner already rounded to their grid
    in its last pass (kept as they are)."""
    ctx = state.context
    result = Quantized()
    by_name = {t.name: t for t in ctx.targets}
    for name in ordered_targets(ctx.model, list(by_name)):
        t = by_name[name]
        grid = grid_for(t, config)
        if config.bits == 4 and grid.bits == 8:
            result.left_int8.append(name)
        matrix = t.weight.detach().reshape(t.weight.shape[0], -1)
        done = (rounded or {}).get(name)
        if done is not None and torch.equal(done.dequantized().to(matrix), matrix):
            result.tensors[name] = done  # rounded while pruned, in the same pass
            result.joint.append(name)
            continue
        if grid.bits == 4 and config.rounding == "gptq":
            ctx.say(f"gptq: {name}")
            with ctx.timings.phase("statistics"):
                gram = input_gram(
                    ctx.model, t.module, ctx.calibration, config.num_samples, ctx.device
                )
            with ctx.timings.phase("quantize"):
                pruned = ~t.mask.reshape(matrix.shape)
                new, scales = gptq(matrix, gram, grid, damp=config.damp, pruned=pruned)
                quantized = grid.on_grid(new, scales)
        else:
            with ctx.timings.phase("quantize"):
                codes, scales = grid.quantize(matrix)
                quantized = QuantizedTensor(codes.cpu(), scales.cpu(), grid.bits, grid.group_size)
        t.weight.copy_(quantized.dequantized().reshape(t.weight.shape).to(t.weight))
        t.weight.masked_fill_(~t.mask, 0.0)
        result.tensors[name] = quantized
    return result
