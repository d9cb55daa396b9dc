"""Pruning schedules. ``oneshot`` prunes to the target sparsity in K sub-steps, recomputing the
statistics at the updated weights before each (density interpolated geometrically)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.errors import UsageError
from prunekit.masks import apply, select, sparsity_of
from prunekit.pruners.base import Pruner, Target
from prunekit.stats import Collector


@dataclass
class StepContext:
    """What every pruning step needs besides the sparsity."""

    model: nn.Module
    targets: Sequence[Target]
    pruner: Pruner
    calibration: Dataset
    device: torch.device
    mask: str = "global"
    memory_budget: int | None = None
    seed: int = 0


def substep_sparsities(start: float, final: float, steps: int) -> list[float]:
    """Sparsities after each of ``steps`` sub-steps, densities interpolated geometrically."""
    d0, d1 = 1.0 - start, 1.0 - final
    between = [1.0 - d0 * (d1 / d0) ** (k / steps) for k in range(1, steps)]
    return [*between, final]


def prune_step(ctx: StepContext, sparsity: float) -> list[str]:
    """Score, select and (for OBS-style pruners) compensate once; return warnings."""
    collector = Collector(
        ctx.model,
        ctx.targets,
        ctx.calibration,
        ctx.pruner.stats_spec(),
        ctx.pruner.needs,
        ctx.device,
        ctx.memory_budget,
        ctx.seed,
    )
    scores: dict[str, torch.Tensor] = {}
    kept_stats: dict[str, dict[str, torch.Tensor]] = {}
    for group, stats in collector.collect():
        for t in group:
            scores[t.name] = ctx.pruner.score(t, stats[t.name])
        if collector.passes == 1:
            kept_stats = stats  # reused for the update instead of a second pass
    keep = select(ctx.targets, scores, sparsity, ctx.mask)
    if ctx.pruner.compensates():
        passes = [(ctx.targets, kept_stats)] if kept_stats else collector.collect()
        updates = {}  # applied after all passes, so every pass sees the same weights
        for group, stats in passes:
            for t in group:
                updated = ctx.pruner.update(t, keep[t.name], stats[t.name])
                if updated is not None:
                    updates[t.name] = updated
        with torch.no_grad():
            for t in ctx.targets:
                if t.name in updates:
                    t.weight.copy_(updates[t.name])
    apply(ctx.targets, keep)
    return collector.warnings


def oneshot(ctx: StepContext, sparsity: float, recompute: int = 1) -> list[str]:
    """Prune to ``sparsity`` in ``recompute`` sub-steps; return the warnings raised."""
    if recompute < 1:
        raise UsageError(f"--recompute {recompute}: give at least 1 sub-step")
    warnings: list[str] = []
    start, _ = sparsity_of(ctx.targets)
    for step_sparsity in substep_sparsities(start, sparsity, recompute):
        warnings += prune_step(ctx, step_sparsity)
    return warnings
