"""Rebuild digits.safetensors from scikit-learn's bundled copy (needs scikit-learn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

OUTPUT = Path(__file__).with_name("digits.safetensors")


def main() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    save_file({"images": images, "labels": labels}, OUTPUT, metadata={"source": "sklearn"})
    print(f"wrote {OUTPUT} ({images.shape[0]} images)")


if __name__ == "__main__":
    main()
