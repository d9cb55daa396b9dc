"""The small training loop: SGD or AdamW, cosine or multistep LR, masks held every step;
optionally distilled from the dense model and on augmented images (prunekit.engine.distill)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.contract.target import Target
from prunekit.engine.distill import Distillation, augment_images
from prunekit.errors import NumericalError, UsageError
from prunekit.runtime import distributed

OPTIMIZERS = ("sgd", "adamw", "adam")  # adam: the earlier name of adamw, still read
LR_SCHEDULES = ("cosine", "multistep", "constant")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.05
    optimizer: str = "sgd"
    lr_schedule: str = "cosine"
    batch_size: int = 64
    weight_decay: float = 5e-4
    distill: bool | None = None  # None: from the dense model wherever one is at hand
    temperature: float = 4.0  # distillation: logits divided by it
    distill_weight: float = 0.9  # distillation's share of the loss where labels exist
    augment: bool | None = None  # None: random crop + flip for images, off otherwise

    def check(self, train_size: int | None = None) -> None:
        """Options always; the split size when it is known."""
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer}: use sgd or adamw")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(
                f"--lr-schedule {self.lr_schedule}: use one of {', '.join(LR_SCHEDULES)}"
            )
        finite = all(math.isfinite(v) for v in (self.lr, self.weight_decay, self.temperature))
        if not finite or self.lr <= 0 or self.batch_size < 1 or self.weight_decay < 0:
            raise UsageError(
                "--lr must be a finite number > 0, --batch-size >= 1 and --weight-decay a finite "
                "number >= 0"
            )
        if not self.temperature > 0 or not 0 <= self.distill_weight <= 1:
            raise UsageError(
                f"distillation temperature {self.temperature} must be > 0 and its weight "
                f"{self.distill_weight} in [0, 1]"
            )
        if train_size is not None and train_size < self.batch_size:
            raise UsageError(
                f"the training split has {train_size} samples to train on (after the "
                f"validation part), fewer than --batch-size {self.batch_size}; lower "
                "--batch-size or use more data"
            )


def _scheduler(opt: torch.optim.Optimizer, kind: str, total_steps: int):
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if kind == "multistep":  # ÷10 at 50 % and 75 % of training, as the ResNet recipes do
        marks = [int(total_steps * 0.5), int(total_steps * 0.75)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    device: torch.device,
    config: TrainConfig = TrainConfig(),
    seed: int = 0,
    targets: Sequence[Target] = (),
    evaluate: Callable[[nn.Module], float | None] | None = None,
    distillation: Distillation | None = None,
    augment: bool = False,
) -> list[dict[str, Any]]:
    """Train with cross-entropy, or the ``distillation`` loss against a dense teacher; return
    per-epoch records (loss and, with ``evaluate``, accuracy). ``augment``: random crop and
    flip of image batches.

    Pruned weights of ``targets`` are re-zeroed after every optimiser step, so they stay
    exactly zero whatever momentum or weight decay would do to them.
    """
    if epochs <= 0:
        return []
    config.check(len(cast(Sized, dataset)))
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True
        )
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    batches = distributed.train_loader(dataset, config.batch_size, seed)
    schedule = _scheduler(opt, config.lr_schedule, epochs * len(batches))
    forward = distributed.data_parallel(model, device)
    if distillation is not None:
        distillation.teacher.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        distributed.set_epoch(batches, epoch)
        model.train()
        total, count = 0.0, 0
        for x, y in batches:
            if augment:
                x = augment_images(x, generator)
            x, y = x.to(device), y.to(device)
            if distillation is None:
                loss = nn.functional.cross_entropy(forward(x), y)
            else:
                loss = distillation.loss(forward(x), x, y)
            # every rank decides together, so no rank waits for one that stopped
            if not distributed.all_agree(bool(torch.isfinite(loss)), device):
                raise NumericalError(
                    f"fine-tuning diverged: the loss is {loss.item()} at epoch {epoch} with "
                    f"--lr {config.lr:g}; lower --lr (e.g. {config.lr / 10:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            with torch.no_grad():
                for t in targets:
                    t.weight.mul_(t.mask)
            total += loss.item() * len(y)
            count += len(y)
        model.eval()
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise NumericalError(
                f"fine-tuning diverged: weights became NaN or Inf in epoch {epoch} with "
                f"--lr {config.lr:g}; lower --lr (e.g. {config.lr / 10:g})"
            )
        record: dict[str, Any] = {"epoch": epoch, "loss": total / count}
        if evaluate is not None:
            record["validation_accuracy"] = evaluate(model)
        history.append(record)
    return history
