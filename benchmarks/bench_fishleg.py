"""FishLeg vs WoodFisher for the same one-shot step: time and peak memory, one process.

    python benchmarks/bench_fishleg.py   (needs plugins/prunekit-fishleg installed)
    python benchmarks/bench_fishleg.py --dev-dir DIR [--archs resnet32,resnet56]
        [--num-grads 1000] [--probes 16,4]

The first form runs the shipped digits models; with ``--dev-dir`` (the CIFAR-10 development
set) it times one 50 % step of each pruner on the dev ResNets at equal num_grads, fishleg
once per ``--probes`` value, and prints fishleg's time as a multiple of woodfisher's.

Peak memory is the rise of the process's peak resident set (Linux VmHWM, reset before each
run); time is wall-clock of one pruning step (statistics or auxiliary fit + scores + update).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from prunekit.calibrate.memory import peak_rss, reset_peak_rss
from prunekit.engine.masks import find_targets
from prunekit.engine.step import Pruning, prune_step
from prunekit.load.data import load_data
from prunekit.load.models import load_model
from prunekit.pruners import registry
from prunekit.validate.metrics import accuracy

MODELS = ("digits-mlp", "digits-cnn", "digits-resnet")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the dev set's normalisation
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def measure(name: str, pruner: str, data, sparsity: float) -> tuple[float, int, float]:
    model = load_model(f"sample:{name}").model
    targets, _ = find_targets(model)
    ctx = Pruning.of(model, targets, registry.create(pruner), data.calibration, torch.device("cpu"))
    base = reset_peak_rss()
    start = time.perf_counter()
    prune_step(ctx, sparsity)
    seconds = time.perf_counter() - start
    return seconds, peak_rss() - base, accuracy(model, data.test, torch.device("cpu"))


def dev_ratios(args: argparse.Namespace) -> None:
    """One 50 % step per pruner on the dev ResNets at equal num_grads: time and the ratio."""
    from devset import checked

    dev = checked(args.dev_dir)
    data = np.load(dev / "calibration.npz")
    x = torch.from_numpy(data["x"][: args.num_grads]).float() / 255.0
    x = (x - MEAN) / STD
    calibration = TensorDataset(x, torch.from_numpy(data["y"][: args.num_grads]).long())
    print(f"one 50 % step, {args.num_grads} gradients each, {torch.get_num_threads()} threads")
    print("| model | pruner | step s | x woodfisher |")
    print("|---|---|---|---|")
    for arch in args.archs.split(","):
        runs = [("woodfisher", {})] + [
            ("fishleg", {"probes": int(p)}) for p in args.probes.split(",")
        ]
        base = None
        for name, extra in runs:
            model = load_model(f"cifar:{arch}", dev / f"{arch}.safetensors").model
            targets, _ = find_targets(model)
            pruner = registry.create(name, {"num_grads": args.num_grads, **extra})
            ctx = Pruning.of(model, targets, pruner, calibration, torch.device("cpu"))
            start = time.perf_counter()
            prune_step(ctx, 0.5)
            seconds = time.perf_counter() - start
            base = base or seconds
            label = name + "".join(f", {k} {v}" for k, v in extra.items())
            print(f"| {arch} | {label} | {seconds:.1f} | {seconds / base:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, help="the CIFAR-10 development set")
    parser.add_argument("--archs", default="resnet32,resnet56")
    parser.add_argument("--num-grads", type=int, default=1000)
    parser.add_argument("--probes", default="16,4", help="fishleg probes per iteration")
    args = parser.parse_args()
    if args.dev_dir is not None:
        return dev_ratios(args)
    data = load_data("digits")
    print("| model | pruner | one-shot 90 % step (s) | peak memory rise (MiB) | accuracy |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        measure(name, "magnitude", data, 0.5)  # warm up imports and allocator
        for pruner in ("woodfisher", "fishleg"):
            seconds, memory, acc = measure(name, pruner, data, 0.9)
            print(
                f"| {name} | {pruner} | {seconds:.2f} | {memory / 2**20:.0f} | {acc:.2%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
