"""The tensors a pruner scores, and how their gradient statistics are gathered."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Target:
    """One prunable tensor: its dotted name, owning module, parameter and current mask."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    mask: torch.Tensor  # bool, same shape as weight, True = kept

    @property
    def numel(self) -> int:
        return self.weight.numel()


@dataclass(frozen=True)
class StatsSpec:
    """How gradients are taken: m gradients of mini-batches of b, empirical or true Fisher."""

    num_grads: int = 1000
    grad_batch: int = 1
    fisher: str = "empirical"
    block_size: int | None = 128  # None: one block per tensor
    damp: float = 1e-2  # relative: λ = damp · mean(diag F) of each target; or absolute
    damp_mode: str = "relative"
    temperature: float = 200.0  # logits are divided by it for the Hessian-gradient product
    num_samples: int = 128  # calibration samples whose layer inputs are measured
    grad_engine: str = "hooks"  # per-sample gradients: hooks (vmap where no rule) or vmap

    def block_for(self, target: Target, width: int | None = None) -> int:
        """Weights per Fisher block of a target whose curvature covers ``width`` of its
        weights (None: all of them); at least 1."""
        width = target.numel if width is None else width
        return max(1, min(self.block_size or width, width))


def multiplies_rows(module: nn.Module) -> bool:
    """Whether ``module`` multiplies rows of its input by a weight matrix: Linear, and Conv2d
    with groups 1 and numeric padding (over its unfolded patches). Layer-input statistics and
    layer-wise pruning cover these."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str)
    )


NM_LAYOUTS = ("channels", "flat")


def nm_columns(
    shape: torch.Size | tuple[int, ...], layout: str = "channels"
) -> torch.Tensor | None:
    """The order of a weight row's columns (the flattened in·kh·kw inputs of one output) in
    which every M consecutive columns are one N:M group, or None where that is the natural
    order. ``channels``: a convolution's groups run along its input channels at each kernel
    position, the layout sparse tensor cores (cuSPARSELt, TensorRT) use for convolutions;
    ``flat``: along the flattened row as stored."""
    positions = math.prod(shape[2:])
    if layout == "flat" or positions == 1:
        return None
    return torch.arange(shape[1] * positions).reshape(shape[1], positions).t().reshape(-1)


def nm_groups(rows: torch.Tensor, m: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """The N:M groups of an (out, d) matrix, (out, d / m, m), its columns taken in the order
    ``columns`` (``nm_columns``; None: as stored)."""
    if columns is not None:
        rows = rows[:, columns.to(rows.device)]
    return rows.reshape(rows.shape[0], -1, m)


def nm_fits(shape: torch.Size | tuple[int, ...], m: int, layout: str = "channels") -> bool:
    """Whether an N:M pattern of groups of ``m`` covers a weight of ``shape``."""
    if layout == "flat" or len(shape) < 3:
        return math.prod(shape[1:]) % m == 0
    return shape[1] % m == 0
