"""FishLeg vs WoodFisher for the same one-shot step: time and peak memory, one process.

    python benchmarks/bench_fishleg.py   (needs plugins/prunekit-fishleg installed)

Peak memory is the rise of the process's peak resident set (Linux VmHWM, reset before each
run); time is wall-clock of one pruning step (statistics or auxiliary fit + scores + update).
"""

from __future__ import annotations

import time

import torch

from prunekit.calibrate.memory import peak_rss, reset_peak_rss
from prunekit.engine.masks import find_targets
from prunekit.engine.step import Pruning, prune_step
from prunekit.load.data import load_data
from prunekit.load.models import load_model
from prunekit.pruners import registry
from prunekit.validate.metrics import accuracy

MODELS = ("digits-mlp", "digits-cnn", "digits-resnet")


def measure(name: str, pruner: str, data, sparsity: float) -> tuple[float, int, float]:
    model = load_model(f"sample:{name}").model
    targets, _ = find_targets(model)
    ctx = Pruning.of(model, targets, registry.create(pruner), data.calibration, torch.device("cpu"))
    base = reset_peak_rss()
    start = time.perf_counter()
    prune_step(ctx, sparsity)
    seconds = time.perf_counter() - start
    return seconds, peak_rss() - base, accuracy(model, data.test, torch.device("cpu"))


def main() -> None:
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
