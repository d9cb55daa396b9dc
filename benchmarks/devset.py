"""The CIFAR-10 development set the benchmarks measure on: where it is and what they take.

A folder with resnet20/32/44/56.safetensors, calibration.npz and test.npz (uint8 images,
ImageNet normalisation), built by ``python benchmarks/get_data.py --out DIR`` on a machine with
network access. The benchmarks take it as --dev-dir DIR (default: $PRUNEKIT_DEV_DIR, else
./cifar10-dev). Never copied into the repository.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

DEFAULT_DEV = Path(os.environ.get("PRUNEKIT_DEV_DIR") or "cifar10-dev")


def checked(dev: Path, *needed: str) -> Path:
    """``dev``, or exit with one line saying what is missing and how to point at it."""
    files = needed or ("calibration.npz", "test.npz")
    if not all((dev / name).is_file() for name in files):
        sys.exit(
            f"no CIFAR-10 development set in {dev} (it needs {', '.join(files)}): build one with "
            "`python benchmarks/get_data.py --out DIR` on a machine with network access, then "
            "pass --dev-dir DIR or set PRUNEKIT_DEV_DIR"
        )
    return dev


def test_subset(dev: Path, count: int, folder: Path) -> Path:
    """The first ``count`` test images, written to ``folder``/test.npz."""
    test = np.load(dev / "test.npz")
    subset = folder / "test.npz"
    np.savez(subset, x=test["x"][:count], y=test["y"][:count])
    return subset
