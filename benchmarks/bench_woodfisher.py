"""WoodFisher cost, in ratios measured in one process (run: python benchmarks/bench_woodfisher.py).

(a) a whole woodfisher step (gradients + inverse + scores + update) / computing its m gradients
(b) the batched block inverse / the reference codes' sequential rank-1 loop, same gradients
(c) peak memory of collecting the statistics / the memory plan's estimate (an MLP, and a CNN
    whose activations dominate)
(d) the block factorisation in float64 (the default) / in float32
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.calibrate import fisher
from prunekit.calibrate.collector import Collector
from prunekit.calibrate.gradients import per_sample_gradients
from prunekit.calibrate.memory import PeakMemory
from prunekit.engine.masks import find_targets
from prunekit.engine.step import Pruning, prune_step
from prunekit.load.data import load_data
from prunekit.load.models import load_model
from prunekit.pruners import registry
from prunekit.runtime.batches import loader


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def overhead(device: torch.device, m: int, size: int) -> None:
    """digits-resnet on its own 8x8 digits (size 8), or on random size x size inputs."""
    if size == 8:
        calibration = load_data("digits").calibration
    else:
        gen = torch.Generator().manual_seed(0)
        calibration = TensorDataset(
            torch.randn(m, 1, size, size, generator=gen), torch.randint(0, 10, (m,), generator=gen)
        )

    def fresh():
        model = load_model("sample:digits-resnet").model.to(device)
        targets, _ = find_targets(model)
        return model, targets

    def gradients_only():
        model, targets = fresh()
        taken = 0
        for x, y in loader(calibration, 128):
            per_sample_gradients(
                model, targets, x[: m - taken].to(device), y[: m - taken].to(device)
            )
            taken += len(x)
            if taken >= m:
                break
        sync(device)

    def whole_step():
        model, targets = fresh()
        pruner = registry.create("woodfisher", {"num_grads": str(m)})
        prune_step(Pruning.of(model, targets, pruner, calibration, device), 0.9)
        sync(device)

    t_grad, t_step = best_of(gradients_only), best_of(whole_step)
    print(
        f"(a) digits-resnet on {size}x{size} inputs, m={m}, B=128: gradients {t_grad:.3f} s, "
        "whole woodfisher step "
        f"{t_step:.3f} s, ratio {t_step / t_grad:.2f} (aim <= 1.5)"
    )


def inverse_speed(device: torch.device, m: int, block: int, d: int) -> None:
    rows = torch.randn(m, d, device=device) * 1e-2
    path = "Cholesky" if m >= block else "Woodbury"

    def batched():
        if m >= block:
            fisher.inverse_from_gram(fisher.gram_blocks(rows, block), m, 1e-5)
        else:
            fisher.inverse_from_rows(rows, block, 1e-5)
        sync(device)

    def sequential():
        fisher.rank1_inverse_reference(rows, block, 1e-5)
        sync(device)

    t_fast, t_ref = best_of(batched), best_of(sequential, repeats=1)
    print(
        f"(b) m={m}, B={block}, d={d} ({d // block} blocks): batched {path} {t_fast:.3f} s, "
        f"sequential rank-1 {t_ref:.3f} s, speed-up {t_ref / t_fast:.1f}x (aim >= 10x)"
    )


def memory(device: torch.device, m: int) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 1024),
        nn.ReLU(),
        nn.Linear(1024, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    cnn = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    images = TensorDataset(
        torch.randn(m, 3, 64, 64, generator=gen), torch.randint(0, 10, (m,), generator=gen)
    )
    for label, model, data in (
        ("MLP", mlp, load_data("digits").calibration),
        ("CNN on 64x64", cnn, images),
    ):
        model.to(device)
        targets, _ = find_targets(model)
        pruner = registry.create("woodfisher", {"num_grads": str(m)})
        collector = Collector(model, targets, data, pruner.stats_spec(), pruner.needs, device)
        estimate = collector.plan.planned_peak
        with PeakMemory(device) as peak:
            stats = list(collector.collect())
        del stats
        weights = sum(t.numel for t in targets)
        print(
            f"(c) {label} with {weights:,} target weights, m={m}, B=128, chunk "
            f"{collector.plan.chunk}: peak {peak.peak / 2**20:.0f} MiB, plan "
            f"{estimate / 2**20:.0f} MiB (activations "
            f"{collector.plan.activation_bytes / 2**20:.1f} MiB per sample), ratio "
            f"{peak.peak / estimate:.2f} (<= 1 means the plan is safe)"
        )


def precision(device: torch.device, m: int, block: int, d: int) -> None:
    rows = torch.randn(m, d, device=device) * 1e-2
    gram = fisher.gram_blocks(rows, block)

    def run(dtype):
        def go():
            fisher.inverse_from_gram(gram, m, 1e-2 * float(rows.square().mean()), dtype=dtype)
            sync(device)

        return go

    t64, t32 = best_of(run(torch.float64)), best_of(run(torch.float32))
    print(
        f"(d) {d // block} blocks of {block}: factorise + invert in float64 {t64:.3f} s, "
        f"float32 {t32:.3f} s, ratio {t64 / t32:.2f}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-grads", type=int, default=1000)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    overhead(device, args.num_grads, 8)
    overhead(device, args.num_grads, 32)
    inverse_speed(device, args.num_grads, 128, 128 * 64)
    memory(device, args.num_grads)
    precision(device, args.num_grads, 128, 128 * 3600)  # ResNet-32's 461,872 weights


if __name__ == "__main__":
    main()
