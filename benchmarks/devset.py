"""The CIFAR-10 development set the benchmarks measure on: where it is and what they take.

A folder with resnet32/44/56.safetensors, calibration.npz and test.npz (uint8 images, ImageNet
normalisation). In a prunekit checkout it is at ../shared/data/cifar10-dev; elsewhere ask the
maintainers for a copy and pass --dev-dir. Never copied into the repository.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DEFAULT_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-dev"


def checked(dev: Path, *needed: str) -> Path:
    """``dev``, or exit with one line saying what is missing and how to point at it."""
    files = needed or ("calibration.npz", "test.npz")
    if not all((dev / name).is_file() for name in files):
        sys.exit(
            f"no CIFAR-10 development set in {dev}: pass --dev-dir DIR (a folder with "
            f"{', '.join(files)})"
        )
    return dev


def test_subset(dev: Path, count: int, folder: Path) -> Path:
    """The first ``count`` test images, written to ``folder``/test.npz."""
    test = np.load(dev / "test.npz")
    subset = folder / "test.npz"
    np.savez(subset, x=test["x"][:count], y=test["y"][:count])
    return subset
