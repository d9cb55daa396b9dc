"""Layer inputs block by block: for a model built as a stack of repeated blocks (the layers of
a transformer decoder), the inputs of the first block are captured once, and every later
measurement runs through one block only, which is the only part of the model that has to be
on the device (SparseGPT's way of pruning models larger than the device's memory).

``BlockInputs`` holds, per calibration chunk, what the first block was called with (hidden
states, the other arguments, keyword arguments; captured where the model is, kept on the
device) and the chunk's token mask; ``advance`` replaces the hidden states by a block's
outputs, so they become the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.calibrate.layer_inputs import layer_rows
from prunekit.errors import UsageError
from prunekit.runtime import distributed
from prunekit.runtime.batches import eval_mode, loader


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList of at least two children of one class (a decoder's layers):
    its dotted name and the list; None when the model has none."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


class _Captured(Exception):
    """Stops the forward pass once the first block's inputs are recorded."""


@dataclass
class _Chunk:
    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None  # (N, L) for token inputs packed as (N, 2, L)


class BlockInputs:
    """The first block's inputs on ``samples`` calibration samples (this rank's share)."""

    def __init__(
        self,
        model: nn.Module,
        first: nn.Module,
        data: Dataset,
        samples: int,
        device: torch.device,
        batch_size: int = 32,
    ) -> None:
        self.chunks: list[_Chunk] = []
        recorded: dict[str, Any] = {}

        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            recorded["args"], recorded["kwargs"] = args, kwargs
            raise _Captured

        data, samples = distributed.shard_samples(data, samples)
        home = next((p.device for p in model.parameters()), device)  # the model's own device
        handle = first.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with eval_mode(model), torch.no_grad():
                seen = 0
                for x, _ in loader(data, batch_size):
                    x = x[: samples - seen].to(home)
                    try:
                        model(x)
                    except _Captured:
                        pass
                    else:
                        raise UsageError("the model's forward pass never reached its blocks")
                    args = moved(recorded["args"], device)
                    kwargs = dict(moved(recorded["kwargs"], device))
                    hidden = args[0] if args else kwargs.pop("hidden_states")
                    mask = x[:, 1] if x.dim() == 3 and not x.is_floating_point() else None
                    self.chunks.append(_Chunk(hidden, tuple(args[1:]), kwargs, mask))
                    seen += len(x)
                    if seen >= samples:
                        break
        finally:
            handle.remove()

    def run(self, block: nn.Module) -> Iterator[torch.Tensor]:
        """``block`` on every chunk (its outputs' hidden states)."""
        with torch.no_grad():
            for chunk in self.chunks:
                out = block(chunk.hidden, *chunk.args, **chunk.kwargs)
                yield cast(torch.Tensor, out[0] if isinstance(out, tuple | list) else out)

    def gram(self, block: nn.Module, module: nn.Module) -> torch.Tensor:
        """H = XᵀX / n (float64) of the rows ``module`` (inside ``block``) multiplies, over
        every chunk's real tokens, through the block as it is now."""
        total: torch.Tensor | None = None
        count = 0
        mask: torch.Tensor | None = None  # the token mask of the chunk being run

        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            nonlocal total, count
            rows = layer_rows(module, inputs[0]).double()
            if mask is not None and mask.numel() == rows.shape[0]:
                rows = rows[mask.reshape(-1).to(rows.device).bool()]
            part = rows.T @ rows
            total = part if total is None else total + part
            count += len(rows)

        handle = module.register_forward_pre_hook(hook)
        try:
            with eval_mode(block), torch.no_grad():
                for chunk in self.chunks:
                    mask = chunk.token_mask
                    block(chunk.hidden, *chunk.args, **chunk.kwargs)
        finally:
            handle.remove()
        return self._mean(total, count, module)

    def _mean(self, total: torch.Tensor | None, count: int, module: nn.Module) -> torch.Tensor:
        if distributed.active():
            width = cast(torch.Tensor, module.weight)[0].numel()
            device = cast(torch.Tensor, module.weight).device
            if total is None:
                total = torch.zeros(width, width, dtype=torch.float64, device=device)
            summed = torch.tensor([float(count)], device=device)
            distributed.all_reduce_sum([summed, total])
            count = int(summed.item())
        if total is None or count == 0:
            raise UsageError("layer-wise pruning needs calibration samples; the split is empty")
        return total / count

    def advance(self, block: nn.Module) -> None:
        """The block's outputs become the next block's inputs."""
        with eval_mode(block):
            outputs = list(self.run(block))
        for chunk, hidden in zip(self.chunks, outputs, strict=True):
            chunk.hidden = hidden


def moved(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """``block`` on ``device`` for the duration, then back where its weights were."""
    home = next((p.device for p in block.parameters()), device)
    block.to(device)
    try:
        yield
    finally:
        block.to(home)
