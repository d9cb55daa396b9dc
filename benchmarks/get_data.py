"""Build the CIFAR-10 development set the benchmarks take (``--dev-dir``), on a machine with
network access: the published pretrained CIFAR-10 ResNet-20/32/44/56 checkpoints of
akamaster/pytorch_resnet_cifar10 (BSD 2-clause) converted to safetensors state dicts, and the
CIFAR-10 images through torchvision's dataset loader.

    python benchmarks/get_data.py [--out cifar10-dev] [--calibration 5000] [--cache DIR]

Writes into ``--out``: resnet20/32/44/56.safetensors (keys of ``cifar:ARCH``, checked to fit
it), calibration.npz (the first ``--calibration`` training images) and test.npz (the 10,000
test images): uint8 images (N, 3, 32, 32) and int64 labels; the checkpoints expect ImageNet's
normalisation (``--normalize imagenet``). The downloads stay in ``--cache`` (default: the
output's ``downloads`` folder), so a second run reads them from there. Nothing is unpickled
as code: checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import urllib.error
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

RELEASES = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models"
CHECKPOINTS = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
}


def checkpoint_to_safetensors(checkpoint: Path, arch: str, out: Path) -> int:
    """A published checkpoint ({'state_dict': {'module.' + key: tensor}, ...}) as a plain
    safetensors state dict of ``cifar:ARCH``; returns its number of tensors."""
    from prunekit.load.models import build, check_fit

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"{checkpoint} holds no state dict of tensors: download it again")
    state = {k.removeprefix("module."): v.contiguous() for k, v in state.items()}
    model, _ = build(f"cifar:{arch}")
    check_fit(model, state, str(checkpoint), f"cifar:{arch}")
    save_file(state, str(out))
    return len(state)


def images_to_npz(dataset, count: int | None, out: Path) -> int:
    """The first ``count`` (all: None) images of a torchvision CIFAR dataset as uint8
    (N, 3, 32, 32) ``x`` and int64 ``y``; returns N."""
    data = np.asarray(dataset.data)[:count]  # (N, 32, 32, 3) uint8
    labels = np.asarray(dataset.targets, dtype=np.int64)[:count]
    np.savez(out, x=np.ascontiguousarray(data.transpose(0, 3, 1, 2)), y=labels)
    return len(labels)


def download(url: str, path: Path) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            partial = Path(tmp) / path.name
            torch.hub.download_url_to_file(url, str(partial), progress=False)
            partial.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("cifar10-dev"))
    parser.add_argument("--calibration", type=int, default=5000, help="training images kept")
    parser.add_argument("--cache", type=Path, help="where downloads are kept")
    args = parser.parse_args()
    out: Path = args.out
    cache: Path = args.cache or out / "downloads"
    out.mkdir(parents=True, exist_ok=True)
    try:
        from torchvision.datasets import CIFAR10

        for arch, name in CHECKPOINTS.items():
            checkpoint = download(f"{RELEASES}/{name}", cache / name)
            tensors = checkpoint_to_safetensors(checkpoint, arch, out / f"{arch}.safetensors")
            print(f"{arch}: {tensors} tensors -> {out / f'{arch}.safetensors'}")
        train = CIFAR10(str(cache), train=True, download=True)
        test = CIFAR10(str(cache), train=False, download=True)
    except (urllib.error.URLError, OSError) as exc:
        sys.exit(f"download failed ({exc}): run this on a machine with network access")
    print(f"calibration.npz: {images_to_npz(train, args.calibration, out / 'calibration.npz')} "
          f"images; test.npz: {images_to_npz(test, None, out / 'test.npz')} images")  # fmt: skip
    print(f"done: pass --dev-dir {out} to the benchmarks")


if __name__ == "__main__":
    main()
