"""Targets, mask selection (global / layer), applying masks and reporting sparsity."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn

from prunekit.contract.target import Target, nm_columns, nm_fits, nm_groups
from prunekit.errors import NumericalError, UsageError

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def find_targets(model: nn.Module, exclude: Sequence[str] = ()) -> tuple[list[Target], list[str]]:
    """Every Conv/Linear ``weight`` not matched by an exclusion glob.

    Returns the targets and the globs that matched nothing (worth a warning).
    """
    targets, used, seen = [], set(), set()
    kept_whole = set(getattr(model, "kept_whole", ()))  # a model's own never-pruned weights
    for module_name, module in model.named_modules():
        if not isinstance(module, PRUNABLE) or module.weight is None:
            continue
        if f"{module_name}.weight" in kept_whole:
            continue
        if id(module.weight) in seen:  # a tied weight is one tensor: prune it once
            continue
        seen.add(id(module.weight))
        name = f"{module_name}.weight" if module_name else "weight"
        hits = [g for g in exclude if fnmatch.fnmatchcase(name, g)]
        used.update(hits)
        if not hits:
            weight = cast(nn.Parameter, module.weight)  # the stubs type it as a Tensor
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


def parse_nm(mode: str) -> tuple[int, int] | None:
    """(n, m) for an 'N:M' (or 'N:M:flat') mask mode, None for global/layer; a usage error
    otherwise."""
    if mode in ("global", "layer"):
        return None
    n, sep, rest = mode.partition(":")
    m, _, layout = rest.partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m) and layout in ("", "flat"):
        return int(n), int(m)
    raise UsageError(
        f"unknown mask mode '{mode}': use global, layer or N:M such as 2:4 (N:M:flat groups "
        "a convolution's flattened rows instead of its input channels)"
    )


def nm_layout(mode: str) -> str:
    """Where the groups of an N:M mode run in a convolution: ``channels`` (input channels at
    each kernel position, as sparse kernels read them) unless the mode ends in ``:flat``."""
    return "flat" if mode.endswith(":flat") else "channels"


def check_mask(mode: str, sparsity: float) -> None:
    nm = parse_nm(mode)
    if nm is not None and abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise UsageError(
            f"--mask {mode} keeps {nm[0]} of every {nm[1]} weights, a sparsity of "
            f"{1 - nm[0] / nm[1]:g}; pass --sparsity {1 - nm[0] / nm[1]:g}"
        )


def nm_misfits(targets: Sequence[Target], mode: str) -> list[Target]:
    """Targets an N:M mask cannot cover: inputs per output (input channels of a convolution
    in the channels layout) not a multiple of M."""
    nm = parse_nm(mode)
    if nm is None:
        return []
    return [t for t in targets if not nm_fits(t.weight.shape, nm[1], nm_layout(mode))]


def _n_of_m(score: torch.Tensor, target: Target, n: int, m: int, layout: str) -> torch.Tensor:
    shape = target.weight.shape
    if not nm_fits(shape, m, layout):
        by_channels = layout == "channels" and len(shape) > 2
        count = f"{shape[1]} input channels" if by_channels else (
            f"{target.numel // shape[0]} inputs per output"
        )  # fmt: skip
        raise UsageError(
            f"{target.name} has {count}, not a multiple of {m}; exclude it "
            f"(--exclude '{target.name}') or use another mask"
        )
    columns = nm_columns(shape, layout)
    groups = nm_groups(score.reshape(shape[0], -1), m, columns)
    best = torch.zeros_like(groups, dtype=torch.bool)
    best.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    best = (best & torch.isfinite(groups)).reshape(shape[0], -1)  # pruned stay pruned
    if columns is not None:
        best = best[:, torch.argsort(columns).to(best.device)]
    return best.reshape(shape)


def select(
    targets: Sequence[Target],
    scores: Mapping[str, torch.Tensor | None],
    sparsity: float,
    mode: str = "global",
    own: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """New keep-masks that remove ``sparsity`` of the target weights by lowest score.

    Already pruned weights score -inf and therefore stay pruned. A target whose score is
    None is left as it is (a pruner may decline a tensor it cannot handle); the sparsity is
    then reached on the others. A target named in ``own`` (``--layer-sparsity``) loses its
    own fraction of its weights, the others ``sparsity`` by ``mode``.
    """
    check_sparsity(sparsity)
    check_mask(mode, sparsity)
    own = own or {}
    keep = {t.name: t.mask.clone() for t in targets if scores[t.name] is None}
    for t in targets:
        score = scores[t.name]
        if t.name in own and score is not None:
            lowest = _lowest(_checked(t.name, score, t).reshape(-1), round(own[t.name] * t.numel))
            keep[t.name] = ~lowest.reshape(t.weight.shape) & t.mask  # pruned stay pruned
    ranked = [t for t in targets if scores[t.name] is not None and t.name not in own]
    if not ranked:
        return keep
    checked = [_checked(t.name, cast(torch.Tensor, scores[t.name]), t) for t in ranked]
    nm = parse_nm(mode)
    if nm is not None:
        layout = nm_layout(mode)
        keep.update(
            {t.name: _n_of_m(s, t, *nm, layout) for t, s in zip(ranked, checked, strict=True)}
        )
    elif mode == "layer":
        keep.update(
            {
                t.name: ~_lowest(s.reshape(-1), round(sparsity * t.numel)).reshape(t.weight.shape)
                for t, s in zip(ranked, checked, strict=True)
            }
        )
    else:
        flat = torch.cat([s.reshape(-1) for s in checked])
        pieces = (~_lowest(flat, round(sparsity * flat.numel()))).split([t.numel for t in ranked])
        keep.update(
            {t.name: p.reshape(t.weight.shape) for t, p in zip(ranked, pieces, strict=True)}
        )
    return keep


@torch.no_grad()
def apply(targets: Sequence[Target], keep: Mapping[str, torch.Tensor]) -> None:
    """Record the masks on the targets and zero the pruned weights exactly."""
    for t in targets:
        t.mask = keep[t.name].to(t.weight.device)
        t.weight.masked_fill_(~t.mask, 0.0)


def zeros_of(targets: Sequence[Target]) -> tuple[float, dict[str, float]]:
    """Overall and per-tensor fraction of zero weights, pruned or zero already: what the
    written files hold."""
    zero = {t.name: int(((~t.mask) | (t.weight.detach() == 0)).sum()) for t in targets}
    total = sum(t.numel for t in targets)
    return sum(zero.values()) / max(total, 1), {t.name: zero[t.name] / t.numel for t in targets}


def sparsity_of(targets: Sequence[Target]) -> tuple[float, dict[str, float]]:
    """Overall and per-tensor fraction of pruned (masked) weights."""
    pruned = {t.name: t.numel - int(t.mask.sum()) for t in targets}
    total = sum(t.numel for t in targets)
    return sum(pruned.values()) / total, {t.name: pruned[t.name] / t.numel for t in targets}
