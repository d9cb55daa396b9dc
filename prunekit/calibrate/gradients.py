"""Per-sample (or per-mini-batch) loss gradients of the target tensors, from ``torch.func``
(vmap over grad), and the calibration batches they are taken on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from prunekit.contract.objectives import LABELS, Objective
from prunekit.contract.target import Target
from prunekit.runtime.batches import loader


def _loss_of_batch(model: nn.Module, frozen: dict[str, torch.Tensor], objective: Objective):
    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, {**frozen, **params}, (x,))
        return objective.loss(outputs, y)

    return loss


def _vmap_ready(model: nn.Module) -> AbstractContextManager[Any]:
    """The model's own context for vmapped gradients, where it has one (``hf:`` models)."""
    mode = getattr(model, "per_sample_mode", None)
    return mode() if callable(mode) else nullcontext()


def per_sample_gradients(
    model: nn.Module,
    targets: Sequence[Target],
    x: torch.Tensor,
    y: torch.Tensor,
    grad_batch: int = 1,
    objective: Objective = LABELS,
) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss of each mini-batch of ``grad_batch`` samples; ``y`` holds
    the objective's targets (labels, or targets drawn by ``Objective.targets``).

    Returns, per target, a (len(x) // grad_batch, numel) matrix with pruned entries zeroed.
    """
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    frozen.update(dict(model.named_buffers()))
    params = {t.name: frozen[t.name] for t in targets}
    n = len(x) // grad_batch
    xs = x[: n * grad_batch].reshape(n, grad_batch, *x.shape[1:])
    ys = y[: n * grad_batch].reshape(n, grad_batch, *y.shape[1:])
    loss = _loss_of_batch(model, frozen, objective)
    with _vmap_ready(model):
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    return {t.name: grads[t.name].reshape(n, -1) * t.mask.reshape(1, -1) for t in targets}


def calibration_batches(
    model: nn.Module,
    calibration: Dataset,
    wanted: int,
    batch_size: int,
    objective: Objective,
    device: torch.device,
    seed: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``wanted`` calibration samples on ``device``, in batches, with the
    objective's targets: the labels, or targets drawn (seeded) around the model's outputs.
    """
    generator = torch.Generator(device).manual_seed(seed)
    taken = 0
    if wanted <= 0:
        return
    for x, y in loader(calibration, batch_size):
        x, y = x[: wanted - taken].to(device), y[: wanted - taken].to(device)
        if objective.sampled:
            with torch.no_grad():
                y = objective.targets(model(x), y, generator)
        yield x, y
        taken += len(x)
        if taken >= wanted:
            return
