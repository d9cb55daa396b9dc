"""Removing a group's channels: masks on the full model, and the physically smaller model.

``group_masks`` zeroes, for the removed channels, the rows of the layers that make them and
the input columns of the layers that read them: the masked model computes exactly what the
shrunk one does (nothing reads a removed channel any more), so masked fine-tuning and the
existing exports work unchanged. ``shrink`` then cuts the removed channels out of every
member (Conv2d / Linear rows and columns, BatchNorm and depthwise channels): new shapes,
same outputs.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from prunekit.structured.groups import ChannelMapping, Group, Member


def input_columns(keep: torch.Tensor, block: int) -> torch.Tensor:
    """Input features of the kept channels, with ``block`` features per channel."""
    return (keep[:, None] * block + torch.arange(block, device=keep.device)).flatten()


def member_channels(index: tuple[int, ...] | None, keep: torch.Tensor) -> torch.Tensor:
    """A member's own kept channels: those whose group channel is in ``keep``."""
    if index is None:
        return keep
    held = torch.tensor(index, dtype=torch.long, device=keep.device)
    return torch.isin(held, keep).nonzero().flatten()


def group_masks(
    modules: dict[str, nn.Module], group: Group, keep: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Keep-masks of the members' weights (by dotted weight name) for kept channels ``keep``."""
    masks: dict[str, torch.Tensor] = {}
    for m in group.members:
        if m.role in ("channel", "map"):
            continue
        weight = cast(torch.Tensor, modules[m.module].weight)
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        kept = member_channels(m.index, keep.to(weight.device))
        if m.role == "out":
            mask[kept] = True
        else:
            mask[:, input_columns(kept, m.block)] = True
        name = f"{m.module}.weight"  # a layer may both read and write the group's axis
        masks[name] = masks[name] & mask if name in masks else mask
    return masks


@torch.no_grad()
def shrink(modules: dict[str, nn.Module], group: Group, keep: torch.Tensor) -> None:
    """Cut every member of ``group`` down to the channels ``keep`` (sorted indices), in place."""
    for m in group.members:
        module, kept = modules[m.module], member_channels(m.index, keep.cpu())
        if m.role == "map":
            cast(ChannelMapping, module).keep_channels(member_channels(m.source, keep.cpu()), kept)
        else:
            _shrink_member(module, m, kept)
    position = {int(c): i for i, c in enumerate(keep.tolist())}  # renumbered group channels
    for m in group.members:
        m.index, m.source = (
            None if held is None else tuple(position[c] for c in held if c in position)
            for held in (m.index, m.source)
        )
    group.channels = len(keep)


def _take(param: nn.Parameter | torch.Tensor | None, index: torch.Tensor, dim: int):
    if param is None:
        return None
    taken = param.detach().index_select(dim, index.to(param.device)).clone()
    return nn.Parameter(taken, param.requires_grad) if isinstance(param, nn.Parameter) else taken


def _shrink_member(module: nn.Module, member: Member, keep: torch.Tensor) -> None:
    n = len(keep)
    if member.role == "in":
        columns = input_columns(keep.cpu(), member.block)
        module.weight = _take(cast(torch.Tensor, module.weight), columns, 1)
        if isinstance(module, nn.Conv2d):
            module.in_channels = n
        else:  # only a Conv2d or a Linear reads a group's channels
            cast(nn.Linear, module).in_features = len(columns)
        return
    module.weight = _take(cast(torch.Tensor, module.weight), keep, 0)
    module.bias = _take(cast("torch.Tensor | None", module.bias), keep, 0)
    if isinstance(module, nn.Conv2d):
        module.out_channels = n
        if member.role == "channel":  # depthwise
            module.in_channels = module.groups = n
    elif isinstance(module, nn.Linear):
        module.out_features = n
    else:  # BatchNorm
        cast("nn.BatchNorm1d | nn.BatchNorm2d", module).num_features = n
        for name in ("running_mean", "running_var"):
            buffer = getattr(module, name)
            if buffer is not None:
                setattr(module, name, _take(buffer, keep, 0))
