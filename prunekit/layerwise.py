"""Layer-wise reconstruction pruning: the inputs each layer sees, and SparseGPT's OBS solver.

For a layer y = W x (a Conv2d as a Linear over its unfolded input patches), pruning that
keeps the layer's outputs on calibration inputs X minimises ‖W X − Ŵ X‖², whose Hessian is
H = X Xᵀ / n, the same for every output row. SparseGPT (Frantar & Alistarh, 2023) removes
the weights column by column, each time moving the row's remaining weights to the right by
the OBS update under H restricted to the columns not yet processed; the inverse Cholesky
factor of H gives every one of those restricted inverses at once, and updates are applied
lazily in blocks of columns. Wanda (Sun et al., 2023) scores |W_ij| · ‖X_j‖ with no update.
No gradients and no per-sample anything: one forward pass per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit import distributed
from prunekit.data import loader
from prunekit.errors import NumericalError, UsageError


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
    was_training = model.training
    model.eval()
    data, samples = distributed.shard_samples(data, samples)
    try:
        seen = 0
        for x, _ in loader(data, batch_size):
            x = x[: samples - seen].to(device)
            model(x)
            seen += len(x)
            if seen >= samples:
                break
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if distributed.active():  # each rank has samples, and its pass reaches the same modules
        for name in modules:
            sums.setdefault(name, torch.zeros((), dtype=torch.float64, device=device))
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
    means = _layer_means(
        model, {"": module}, data, samples, device, batch_size, lambda rows: rows.T @ rows
    )
    if "" not in means:
        raise UsageError("layer-wise pruning needs calibration samples; the split is empty")
    return means[""]


def _lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest entries (stable: ties go to the earlier position)."""
    drop = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count > 0:
        drop[torch.argsort(values.reshape(-1), stable=True)[:count]] = True
    return drop.reshape(values.shape)


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    pruned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the (out, d) ``weight`` by SparseGPT under H = ``gram``; return the new weight
    (pruned entries exactly zero) and the keep-mask.

    Unstructured: within every block of ``block_size`` columns the fraction ``sparsity`` of
    weights with the lowest w² / [H⁻¹]_jj² (adaptive mask selection) is removed; N:M: in every
    group of M consecutive columns the M − N lowest of each row. ``damp`` is λ as a fraction
    of mean(diag H). ``pruned`` (bool, like the weight) are removed whatever their
    saliency (an earlier step's mask). The blocks' counts add up to round(sparsity · numel).
    Computed in float64.
    """
    w = weight.detach().double().clone()
    rows, d = w.shape
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise NumericalError(
            f"the layer Hessian is not positive definite ({exc}); raise damp"
        ) from exc
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, d, block_size):
        end = min(start + block_size, d)
        w1 = w[:, start:end].clone()
        err = torch.zeros_like(w1)
        u1 = upper[start:end, start:end]
        fixed = pruned[:, start:end] if pruned is not None else torch.zeros_like(w1, dtype=bool)
        if nm is None:
            saliency = (w1.square() / u1.diagonal().square()).masked_fill(fixed, -1.0)
            count = round(sparsity * rows * end) - round(sparsity * rows * start)
            block_drop = _lowest(saliency, max(count, int(fixed.sum())))
        else:
            block_drop = fixed.clone()
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                cols = slice(i, min(i + nm[1], end - start))
                saliency = w1[:, cols].square() / u1.diagonal()[cols].square()
                saliency = saliency.masked_fill(fixed[:, cols], -1.0)
                order = torch.argsort(saliency, dim=1, stable=True)[:, : nm[1] - nm[0]]
                block_drop[:, cols].scatter_(1, order, True)
            q = w1[:, i].clone()
            q[block_drop[:, i]] = 0.0
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, start:end] = w1
        w[:, end:] -= err @ upper[start:end, end:]
        keep[:, start:end] = ~block_drop
    w[~keep] = 0.0
    return w.to(weight.dtype).reshape(weight.shape), keep


def dense_sequential_obs(
    weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """The oracle SparseGPT approximates fast: for a given mask, visit the columns left to
    right; at column j remove each row's pruned weight by the OBS update under the explicit
    inverse of H restricted to columns j..d−1. Slow (one inverse per column); for tests."""
    w = weight.detach().double().clone()
    h = gram.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    d = w.shape[1]
    for j in range(d):
        inverse = torch.linalg.inv(h[j:, j:])
        drop = ~keep[:, j]
        if drop.any():
            scale = w[drop, j] / inverse[0, 0]
            w[drop, j:] -= scale.unsqueeze(1) * inverse[0].unsqueeze(0)
            w[drop, j] = 0.0
    return w


def ordered_targets(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` in the order their modules run in a forward pass (registration order)."""
    order = {f"{n}.weight" if n else "weight": i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(names, key=lambda n: order.get(n, len(order)))
