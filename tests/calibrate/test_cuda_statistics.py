"""CUDA-only paths of the statistics: the activation memory measured by a trial chunk against
the allocator's peak, the out-of-memory back-off on the real allocator, and the statistics of
several passes parked in host memory for the OBS update (run by `pytest -m cuda`, e.g. from
benchmarks/gpu_check.py, where a GPU is at hand)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.calibrate.collector import Collector
from prunekit.calibrate.memory import HEADROOM, PeakMemory, _group_bytes, target_cost
from prunekit.contract.statistics import FISHER_DIAG, FISHER_INV
from prunekit.contract.target import StatsSpec
from prunekit.engine.masks import find_targets
from prunekit.engine.step import Pruning, prune_step
from prunekit.pruners import registry
from tests.calibrate.test_collector import small_problem

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
CUDA = torch.device("cuda")


def test_trial_chunk_plan_covers_the_allocator_peak():
    """A CNN whose activations dwarf its weights: the activations measured by a trial chunk
    make a plan at least the allocator's peak while the statistics are collected."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).to(CUDA)  # fmt: skip
    data = TensorDataset(torch.randn(64, 3, 64, 64, generator=gen), torch.arange(64) % 10)
    targets, _ = find_targets(model)
    spec = StatsSpec(num_grads=64, block_size=64)
    collector = Collector(model, targets, data, spec, frozenset({FISHER_INV}), CUDA, 2 * 2**30)
    plan = collector.plan
    assert plan is not None and plan.activation_source.startswith("measured with a trial chunk")
    assert plan.activation_bytes > 32 * 64 * 64 * 4  # at least one conv output per sample
    with PeakMemory(CUDA) as peak:
        list(collector.collect())
    assert peak.peak is not None and 0 < peak.peak <= plan.planned_peak, (peak.peak, plan)
    measured = collector.report()["memory"]["measured_peak_bytes"]
    assert measured == pytest.approx(peak.peak, rel=0.5)


def test_out_of_memory_halves_the_chunk_on_the_real_allocator():
    """The allocator limited (set_per_process_memory_fraction) below what the plan of a
    generous --memory-budget needs: the chunk is halved until it fits, with a warning, and
    the statistics equal those of an unlimited run."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(CUDA)
    data = TensorDataset(torch.randn(256, 1024, generator=gen), torch.arange(256) % 10)
    spec = StatsSpec(num_grads=256, block_size=32)  # 134 MiB of Gram blocks
    needs = frozenset({FISHER_INV})

    def collect(limit: int | None):
        copied = copy.deepcopy(model)
        targets, _ = find_targets(copied)
        collector = Collector(copied, targets, data, spec, needs, CUDA, budget=64 * 2**30)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(CUDA).total_memory
        if limit is not None:  # rows of 128 gradients alone are 540 MiB
            fraction = (torch.cuda.memory_reserved(CUDA) + limit) / total
            torch.cuda.set_per_process_memory_fraction(fraction, CUDA)
        try:
            stats = {n: {k: v.cpu() for k, v in s.items() if k == FISHER_DIAG}
                     | {FISHER_INV: s[FISHER_INV].blocks.cpu()}
                     for _, group in collector.collect() for n, s in group.items()}  # fmt: skip
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
            torch.cuda.empty_cache()
        return stats, collector

    free, free_collector = collect(None)
    limited, collector = collect(600 * 2**20)
    assert not free_collector.warnings
    assert any("out of memory with 128 gradients per chunk" in w for w in collector.warnings)
    assert collector.chunk < 128
    for name in free:
        for key in (FISHER_DIAG, FISHER_INV):
            torch.testing.assert_close(limited[name][key], free[name][key], rtol=1e-4, atol=1e-6)


def test_statistics_of_several_passes_are_parked_in_host_memory_for_the_update():
    """A budget that fits each layer's statistics alone but not both: two passes, kept in
    host memory, and the OBS update reads them instead of a second round of passes; the
    weights equal a one-pass run's."""
    spec_params = {"num_grads": "24", "block_size": "8"}
    model, data = small_problem()
    model.to(CUDA)
    targets, _ = find_targets(model)
    pruner = registry.create("woodfisher", spec_params)
    spec, needs = pruner.stats_spec(), pruner.needs
    activations = Collector(model, targets, data, spec, needs, CUDA, 2**30).plan.activation_bytes
    costs = [target_cost(t, spec, needs) for t in targets]
    alone = max(_group_bytes([c], 1, activations) for c in costs)
    assert _group_bytes(costs, 1, activations) > alone
    budget = int(alone / HEADROOM) + 1

    def run(memory_budget: int):
        copied, _ = small_problem()
        copied.to(CUDA)
        found, _ = find_targets(copied)
        ctx = Pruning.of(copied, found, registry.create("woodfisher", spec_params), data, CUDA,
                         memory_budget=memory_budget)  # fmt: skip
        prune_step(ctx, 0.5)
        return [t.weight.detach().cpu() for t in found], ctx.statistics[-1]

    one, one_record = run(2**30)
    two, record = run(budget)
    assert one_record["memory"]["passes"] == 1
    assert (record["memory"]["passes"], record["update_passes"]) == (2, 0)
    for a, b in zip(two, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
