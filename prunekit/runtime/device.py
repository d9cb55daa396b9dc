"""Resolve ``--device auto|cpu|cuda[:i]``."""

from __future__ import annotations

import os

import torch

from prunekit.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}': use auto, cpu or cuda[:i]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        if device.index is None and "LOCAL_RANK" in os.environ:  # one GPU per torchrun process
            device = resolve_device(f"cuda:{os.environ['LOCAL_RANK']}")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device '{name}': use auto, cpu or cuda[:i]")
    return device
