"""The small training loop: SGD or Adam, cosine LR, masks held after every step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.data import loader
from prunekit.pruners.base import Target


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    optimizer: str = "sgd",
    seed: int = 0,
    targets: Sequence[Target] = (),
) -> list[float]:
    """Train with cross-entropy; return the mean loss of each epoch.

    Pruned weights of ``targets`` are re-zeroed after every optimiser step, so they stay
    exactly zero however the optimiser's momentum or weight decay would move them.
    """
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True
        )
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batches = loader(dataset, batch_size, shuffle=True, seed=seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(batches))
    losses = []
    model.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            with torch.no_grad():
                for t in targets:
                    t.weight.mul_(t.mask)
            total += loss.item() * len(y)
            count += len(y)
        losses.append(total / count)
    model.eval()
    return losses
