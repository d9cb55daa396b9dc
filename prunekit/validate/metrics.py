"""Accuracy of a classifier on a dataset split, and a model's outputs on one."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.errors import ModelMismatchError
from prunekit.runtime.batches import eval_mode, loader


@torch.no_grad()
def accuracy(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256
) -> float:
    """Top-1 accuracy in eval mode, in [0, 1]."""
    correct = total = 0
    with eval_mode(model):
        for x, y in loader(dataset, batch_size):
            try:
                logits = model(x.to(device))
            except RuntimeError as exc:
                raise ModelMismatchError(
                    f"the model cannot take inputs of shape {tuple(x.shape[1:])} from the data "
                    f"({str(exc).splitlines()[0]}); pick --data that matches the architecture"
                ) from exc
            correct += int((logits.argmax(1) == y.to(device)).sum())
            total += len(y)
    return correct / max(total, 1)


@torch.no_grad()
def outputs_on(model: nn.Module, dataset: Dataset, device: torch.device) -> torch.Tensor:
    """The model's outputs on a split (eval mode; the mode is restored), on the CPU."""
    with eval_mode(model):
        outs = [model(x.to(device)).float().cpu() for x, _ in loader(dataset, 256)]
    return torch.cat(outs)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two (N, K) outputs, in float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def cosine_fidelity(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Mean and 5th percentile of the per-sample cosine similarity to the dense outputs
    (what unlabeled data can say about a pruned model, e.g. sentence embeddings)."""
    cosine = cosines(pruned, dense)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_p5": float(torch.quantile(cosine, 0.05)),
    }
