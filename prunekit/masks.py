"""Targets, mask selection (global / layer), applying masks and reporting sparsity."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prunekit.errors import NumericalError, UsageError
from prunekit.pruners.base import Target

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
MASK_MODES = ("global", "layer")


def find_targets(model: nn.Module, exclude: Sequence[str] = ()) -> tuple[list[Target], list[str]]:
    """Every Conv/Linear ``weight`` not matched by an exclusion glob.

    Returns the targets and the globs that matched nothing (worth a warning).
    """
    targets, used = [], set()
    for module_name, module in model.named_modules():
        if not isinstance(module, PRUNABLE) or module.weight is None:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        hits = [g for g in exclude if fnmatch.fnmatchcase(name, g)]
        used.update(hits)
        if not hits:
            weight = module.weight
            mask = torch.ones_like(weight, dtype=torch.bool)
            targets.append(Target(name, module, weight, mask))
    if not targets:
        raise UsageError("no prunable Conv/Linear weights are left; loosen --exclude")
    return targets, [g for g in exclude if g not in used]


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(
            f"sparsity must be in [0, 1), got {sparsity}: give the fraction of weights to "
            "remove, e.g. 0.9 for 90 %"
        )
    return sparsity


def _checked(name: str, score: torch.Tensor, target: Target) -> torch.Tensor:
    if score.shape != target.weight.shape:
        raise NumericalError(
            f"score for {name} has shape {tuple(score.shape)}, expected "
            f"{tuple(target.weight.shape)}; the pruner is broken"
        )
    score = score.detach().float().masked_fill(~target.mask, float("-inf"))
    if torch.isnan(score).any() or torch.isposinf(score).any():
        raise NumericalError(
            f"scores for {name} contain NaN or +Inf; check the statistics (more calibration "
            "samples or higher damping) or the weights"
        )
    return score


def _lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries; ties go to the earlier position (stable)."""
    drop = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        drop[torch.argsort(flat, stable=True)[:k]] = True
    return drop


def select(
    targets: Sequence[Target],
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    mode: str = "global",
) -> dict[str, torch.Tensor]:
    """New keep-masks that remove ``sparsity`` of the target weights by lowest score.

    Already pruned weights score -inf and therefore stay pruned.
    """
    check_sparsity(sparsity)
    checked = [_checked(t.name, scores[t.name], t).reshape(-1) for t in targets]
    if mode == "layer":
        return {
            t.name: ~_lowest(s, round(sparsity * t.numel)).reshape(t.weight.shape)
            for t, s in zip(targets, checked, strict=True)
        }
    if mode != "global":
        raise UsageError(f"unknown mask mode '{mode}': use one of {', '.join(MASK_MODES)}")
    flat = torch.cat(checked)
    keep = ~_lowest(flat, round(sparsity * flat.numel()))
    pieces = keep.split([t.numel for t in targets])
    return {t.name: p.reshape(t.weight.shape) for t, p in zip(targets, pieces, strict=True)}


@torch.no_grad()
def apply(targets: Sequence[Target], keep: Mapping[str, torch.Tensor]) -> None:
    """Record the masks on the targets and zero the pruned weights exactly."""
    for t in targets:
        t.mask = keep[t.name].to(t.weight.device)
        t.weight.masked_fill_(~t.mask, 0.0)


def sparsity_of(targets: Sequence[Target]) -> tuple[float, dict[str, float]]:
    """Overall and per-tensor fraction of pruned weights."""
    pruned = {t.name: t.numel - int(t.mask.sum()) for t in targets}
    total = sum(t.numel for t in targets)
    return sum(pruned.values()) / total, {t.name: pruned[t.name] / t.numel for t in targets}
