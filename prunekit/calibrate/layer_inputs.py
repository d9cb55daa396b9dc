"""Layer inputs: what each Linear or Conv2d multiplies by its weight matrix, measured on
calibration data (Gram matrices for SparseGPT, column mean squares for Wanda).

For a layer y = W x (a Conv2d as a Linear over its unfolded input patches), pruning that
keeps the layer's outputs on calibration inputs X minimises ‖W X − Ŵ X‖², whose Hessian is
H = X Xᵀ / n, the same for every output row. No gradients and no per-sample anything: one
forward pass per measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.errors import UsageError
from prunekit.runtime import distributed
from prunekit.runtime.batches import eval_mode, loader


def real_rows(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Leave out the rows of padding tokens, where the model marks them (``token_mask``, one
    entry per token of the batch); rows of another count (e.g. a pooler's) are kept."""
    mask = getattr(model, "token_mask", None)
    if mask is None or mask.numel() != rows.shape[0]:
        return rows
    return rows[mask.reshape(-1).to(rows.device).bool()]


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (n, d) input rows a Linear or Conv2d multiplies by its (out, d) weight matrix."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise UsageError(
                f"layer-wise pruning handles Conv2d with groups=1 and numeric padding; "
                f"exclude {type(module).__name__} layers with groups={module.groups}"
            )
        patches = nn.functional.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )  # (N, C·kh·kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise UsageError(f"layer-wise pruning handles Linear and Conv2d, not {type(module).__name__}")


def _layer_means(
    model: nn.Module,
    modules: dict[str, nn.Module],
    data: Dataset,
    samples: int,
    device: torch.device,
    batch_size: int,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The mean over input rows of ``reduce(rows)`` (rows in float64, padding left out) for
    every module the pass reaches, from one pass of ``samples`` of ``data`` through the
    model as it is now."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str, module: nn.Module):
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            rows = real_rows(model, layer_rows(module, inputs[0]).double())
            sums[name] = sums[name] + reduce(rows) if name in sums else reduce(rows)
            counts[name] = counts.get(name, 0) + len(rows)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in modules.items()]
    data, samples = distributed.shard_samples(data, samples)
    try:
        with eval_mode(model):
            seen = 0
            for x, _ in loader(data, batch_size):
                x = x[: samples - seen].to(device)
                model(x)
                seen += len(x)
                if seen >= samples:
                    break
    finally:
        for handle in handles:
            handle.remove()
    if distributed.active():  # each rank has samples, and its pass reaches the same modules
        for name, module in modules.items():  # zeros of the right shape where not reached
            width = cast(torch.Tensor, module.weight)[0].numel()
            sums.setdefault(name, reduce(torch.zeros(0, width, dtype=torch.float64, device=device)))
        total = torch.tensor([float(counts.get(name, 0)) for name in modules], device=device)
        distributed.all_reduce_sum([total, *(sums[name] for name in modules)])
        counts = {name: int(c) for name, c in zip(modules, total.tolist(), strict=True) if c}
    return {name: sums[name] / counts[name] for name in counts}  # modules the pass reached


@torch.no_grad()
def input_square_norms(
    model: nn.Module,
    modules: dict[str, nn.Module],
    data: Dataset,
    samples: int,
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """‖X_j‖² / n per input column of every module (name -> (d,)), in one pass of the model."""
    return _layer_means(
        model, modules, data, samples, device, batch_size, lambda rows: rows.square().sum(0)
    )


@torch.no_grad()
def input_grams(
    model: nn.Module,
    modules: dict[str, nn.Module],
    data: Dataset,
    samples: int,
    device: torch.device,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """XᵀX / n (float64, d × d) of every module's inputs (name -> H), in one pass of the
    model as it is now."""
    return _layer_means(
        model, modules, data, samples, device, batch_size, lambda rows: rows.T @ rows
    )


@torch.no_grad()
def input_gram(
    model: nn.Module,
    module: nn.Module,
    data: Dataset,
    samples: int,
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    """H = X Xᵀ / n (float64, d × d) of the inputs ``module`` sees on ``samples`` of ``data``,
    through the model as it is now (so layers pruned before count: sequential propagation)."""
    means = input_grams(model, {"": module}, data, samples, device, batch_size)
    if "" not in means:
        raise UsageError("layer-wise pruning needs calibration samples; the split is empty")
    return means[""]


def ordered_targets(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` in the order their modules run in a forward pass (registration order)."""
    order = {f"{n}.weight" if n else "weight": i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(names, key=lambda n: order.get(n, len(order)))
