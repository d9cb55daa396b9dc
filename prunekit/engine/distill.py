"""Fine-tuning against the dense model: knowledge distillation and image augmentation.

Distillation (Hinton et al. 2015): for a classifier, T² · KL(softmax(t/T) ‖ softmax(s/T)) of
the pruned model's logits s to the dense teacher's t, mixed with the label cross-entropy as
``weight`` · KD + (1 − weight) · CE where there are labels (KD alone where there are none);
for a model that returns embeddings, the cosine distance 1 − cos(s, t). The gradient of the
KD term with respect to s is T · (softmax(s/T) − softmax(t/T)) / batch.

Augmentation for images (N, C, H, W): zero-pad by ``padding`` pixels (default H / 8: 4 for
CIFAR's 32 x 32, 1 for the 8 x 8 digits), crop back to H x W at a random offset, flip
horizontally with probability ½ — the standard CIFAR recipe — seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Distillation:
    """A frozen dense teacher and how its outputs are matched."""

    teacher: nn.Module
    temperature: float = 4.0
    weight: float = 0.9  # share of the distillation term where labels exist
    embeddings: bool = False  # outputs are embeddings: cosine distance, not KL

    def loss(self, student: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(x)
        return distillation_loss(
            student, teacher, labels, self.temperature, self.weight, self.embeddings
        )


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    weight: float,
    embeddings: bool = False,
) -> torch.Tensor:
    """The distillation loss of a batch (mean over it); labels of -1 mean none."""
    if embeddings:
        return (1 - nn.functional.cosine_similarity(student, teacher.detach(), dim=-1)).mean()
    t = temperature
    log_student = nn.functional.log_softmax(student / t, dim=1)
    teacher_probs = nn.functional.softmax(teacher.detach() / t, dim=1)
    kd = nn.functional.kl_div(log_student, teacher_probs, reduction="batchmean") * t * t
    labeled = labels >= 0
    if not bool(labeled.any()):
        return kd
    ce = nn.functional.cross_entropy(student[labeled], labels[labeled])
    return weight * kd + (1 - weight) * ce


def augment_images(
    x: torch.Tensor, generator: torch.Generator, padding: int | None = None
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padding = max(1, h // 8) if padding is None else padding
    padded = nn.functional.pad(x, (padding, padding, padding, padding))
    rows = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
    cols = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    out = torch.stack(
        [
            padded[i, :, r : r + h, c : c + w]
            for i, (r, c) in enumerate(zip(rows, cols, strict=True))
        ]
    )
    flipped = torch.tensor(flips, device=x.device)
    return torch.where(flipped.view(n, 1, 1, 1), out.flip(-1), out)


def is_image_batch(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether samples of ``shape`` (C, H, W) and ``dtype`` are images augmentation fits."""
    return len(shape) == 3 and dtype.is_floating_point and min(shape[1:]) >= 8
