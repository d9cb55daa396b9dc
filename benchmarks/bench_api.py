"""The three ways to run prunekit on a real model, timed in one process: the CLI's pipeline
(`prunekit.run.pipeline.run`), a repeat from its report (`prunekit.run_recipe`, = `prune
--config OUT/report.json`) and the in-memory Python API (`prunekit.prune`). Prints each
one's time, its ratio to the pipeline run, and whether its masks equal the pipeline's.

Needs the CIFAR-10 development set (resnet32.safetensors, calibration.npz, test.npz): build
it with benchmarks/get_data.py and pass --dev-dir.

    python benchmarks/bench_api.py [--dev-dir DIR] [--pruner woodfisher] [--sparsity 0.8]
        [--num-grads 500] [--test-images 2000] [--device auto]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from devset import DEFAULT_DEV, checked, test_subset
from safetensors.torch import load_file

import prunekit
from prunekit.load.data import load_data
from prunekit.load.models import load_model
from prunekit.load.preprocess import Preprocess
from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import run


def masks_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v != 0 for k, v in load_file(folder / "model.safetensors").items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--pruner", default="woodfisher")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--num-grads", type=int, default=500)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    dev = checked(args.dev_dir, "resnet32.safetensors", "calibration.npz", "test.npz")
    with tempfile.TemporaryDirectory() as tmp:
        subset = test_subset(dev, args.test_images, Path(tmp))
        data = f"tensors:{dev / 'calibration.npz'},{subset}"
        config = PruneConfig(
            model="cifar:resnet32",
            pruner=args.pruner,
            sparsity=args.sparsity,
            data=data,
            normalize="imagenet",
            weights=dev / "resnet32.safetensors",
            params={"num_grads": str(args.num_grads)},
            device=args.device,
            out=Path(tmp) / "cli",
        )
        started = time.perf_counter()
        report = run(config)
        base = time.perf_counter() - started
        reference = masks_of(Path(tmp) / "cli")
        rows = [("pipeline (CLI)", base, report["accuracy"]["pruned"], True)]

        started = time.perf_counter()
        again = prunekit.run_recipe(Path(tmp) / "cli" / "report.json", out=str(Path(tmp) / "re"))
        rows.append(
            (
                "run_recipe(report.json)",
                time.perf_counter() - started,
                again["accuracy"]["pruned"],
                same(masks_of(Path(tmp) / "re"), reference),
            )
        )

        splits = load_data(data, Preprocess("imagenet"))
        model = load_model("cifar:resnet32", dev / "resnet32.safetensors").model
        started = time.perf_counter()
        result = prunekit.prune(
            model,
            args.pruner,
            args.sparsity,
            splits.train.tensors,  # type: ignore[attr-defined]
            test_data=splits.test.tensors,  # type: ignore[attr-defined]
            params={"num_grads": args.num_grads},
            device=args.device,
        )
        api_masks = {k: v for k, v in result.masks.items()}
        api_same = all(torch.equal(api_masks[k], reference[k]) for k in api_masks)
        rows.append(
            ("prunekit.prune (in memory)", time.perf_counter() - started,
             result.report["accuracy"]["pruned"], api_same)
        )  # fmt: skip
    print(f"ResNet-32, {args.pruner} {args.sparsity:.0%}, num_grads {args.num_grads}, "
          f"{args.test_images} test images, device {report['device']}")  # fmt: skip
    print("| run | seconds | / pipeline | top-1 % | masks = pipeline |")
    print("|---|---|---|---|---|")
    for label, seconds, acc, equal in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / base:.2f} | {acc * 100:.2f} | {equal} |")


if __name__ == "__main__":
    main()
