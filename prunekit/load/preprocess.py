"""Input preprocessing: uint8 scaling, per-channel normalisation, image resizing.

``--normalize`` takes a preset (``imagenet``, ``cifar10``) or ``MEAN/STD`` with one
comma-separated value per channel, e.g. ``0.5,0.5,0.5/0.25,0.25,0.25``. Images stored as
uint8 are scaled to [0, 1] first; other integer inputs (token ids) are left as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunekit.errors import UsageError

PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def parse(cls, text: str) -> Normalization:
        if text in PRESETS:
            return cls(*PRESETS[text])
        mean_text, sep, std_text = text.partition("/")
        try:
            mean = tuple(float(v) for v in mean_text.split(","))
            std = tuple(float(v) for v in std_text.split(",")) if sep else ()
        except ValueError:
            mean = std = ()
        if not mean or len(mean) != len(std):
            raise UsageError(
                f"--normalize {text}: use {' or '.join(PRESETS)}, or MEAN/STD with one value "
                "per channel each, e.g. 0.5,0.5,0.5/0.25,0.25,0.25"
            )
        if not all(math.isfinite(v) for v in (*mean, *std)):
            raise UsageError(f"--normalize {text}: give finite numbers (no nan or inf)")
        if any(not s >= 1e-6 for s in std):
            raise UsageError(
                f"--normalize {text}: every standard deviation must be at least 1e-6 (a smaller "
                "one turns inputs into Inf)"
            )
        return cls(mean, std)

    def check_channels(self, channels: int, source: str) -> None:
        if len(self.mean) != channels:
            raise UsageError(
                f"--normalize gives {len(self.mean)} channel(s) but {source} has {channels}; "
                f"give {channels} mean and {channels} std values"
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise float inputs shaped (N, C, ...) channel by channel."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype).reshape(shape)
        std = torch.tensor(self.std, dtype=x.dtype).reshape(shape)
        return (x - mean) / std


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; floats -> float32; other integers (token ids) kept."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if x.is_floating_point():
        return x.float()
    return x.long()


@dataclass(frozen=True)
class Preprocess:
    """What the user asked for: ``--normalize`` and, for image folders, ``--image-size``."""

    normalize: str | None = None
    image_size: int | None = None

    def normalization(self) -> Normalization | None:
        return Normalization.parse(self.normalize) if self.normalize else None

    def check(self) -> None:
        self.normalization()
        if self.image_size is not None and self.image_size < 1:
            raise UsageError(f"--image-size {self.image_size}: give a positive number of pixels")

    def tensors(self, x: torch.Tensor, source: str) -> torch.Tensor:
        """Scale and normalise a whole input tensor (N, C, ...)."""
        x = to_model_input(x)
        norm = self.normalization()
        if norm is None:
            return x
        if not x.is_floating_point() or x.dim() < 2:
            raise UsageError(
                f"--normalize needs image-like float inputs (N, C, ...); {source} has "
                f"{x.dtype} inputs of shape {tuple(x.shape)}"
            )
        norm.check_channels(x.shape[1], source)
        return norm(x)
