"""What a pruner sees of the run before each pruning step (``Pruner.prepare``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.contract.objectives import LABELS, Objective
from prunekit.contract.target import Target
from prunekit.runtime.timing import Timings


def _silent(_: str) -> None:
    return None


@dataclass
class StepContext:
    """The plugin's view of one pruning step: the model and its targets, the calibration
    data, where and how statistics are gathered, and which step this is.

    The engine keeps its own state (the channel plan, the statistics reports) apart; a
    pruner may read everything here and collect statistics of its own with ``Collector``.
    """

    model: nn.Module
    targets: Sequence[Target]
    calibration: Dataset
    device: torch.device
    mask: str = "global"  # global, layer or N:M (--mask)
    memory_budget: int | None = None  # bytes for statistics; None: a safe default
    seed: int = 0
    step: int = 0  # pruning steps taken so far, this one included (sub-steps counted)
    sparsity: float = 0.0  # the sparsity this step prunes to
    total_steps: int = 1
    say: Callable[[str], None] = _silent  # one progress line for long pruner work
    timings: Timings = field(default_factory=Timings)
    objective: Objective = LABELS  # the loss whose gradients the statistics are

    def pattern(self) -> tuple[int, int] | None:
        """(n, m) when the mask is N:M, else None."""
        n, sep, rest = self.mask.partition(":")
        return (int(n), int(rest.partition(":")[0])) if sep else None
