"""Re-estimate BatchNorm running statistics after pruning (cheap and often worth a lot)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.runtime.batches import loader, train_mode

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 128
) -> int:
    """Set running mean/var to the average of batch statistics over ``dataset``."""
    norms = [m for m in model.modules() if isinstance(m, NORMS) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    try:
        with train_mode(model):
            for x, _ in loader(dataset, batch_size):
                model(x.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return len(norms)
