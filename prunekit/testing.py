"""Helpers for plugin authors: ``check_pruner`` verifies the plugin contract (v1).

Use it in a plugin's own tests::

    from prunekit.api import check_pruner
    def test_contract():
        check_pruner(MyPruner)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.contract.context import StepContext
from prunekit.contract.pruner import CONTRACT_VERSION, Compressed, LayerPruner, LayerRequest, Pruner
from prunekit.contract.statistics import STATISTICS
from prunekit.contract.target import StatsSpec, Target, nm_columns, nm_fits, nm_groups
from prunekit.engine.masks import find_targets, select
from prunekit.errors import UsageError

TINY_SAMPLES = 16


def tiny_model() -> nn.Module:
    """A deterministic Conv + Linear model small enough to reason about."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def tiny_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TINY_SAMPLES, 1, 6, 6, generator=generator)
    return TensorDataset(x, torch.randint(0, 3, (TINY_SAMPLES,), generator=generator))


def check_declarations(cls: type[Pruner]) -> None:
    """What a class declares: name, summary, contract, statistics, parameters."""
    assert issubclass(cls, Pruner), f"{cls} must subclass prunekit.api.Pruner"
    assert cls.name and re.fullmatch(r"[A-Za-z0-9_.-]+", cls.name), (
        "name must be non-empty: letters, digits, _ . -"
    )
    assert cls.summary(), "the class docstring's first line is the pruner's summary"
    assert cls.declared_contract() == CONTRACT_VERSION, (
        f"{cls.name} declares plugin contract {cls.declared_contract()}, prunekit speaks "
        f"{CONTRACT_VERSION}: set contract = {CONTRACT_VERSION} on the class"
    )
    assert isinstance(cls.needs, frozenset), "needs must be a frozenset of statistic names"
    unknown = sorted(cls.needs - set(STATISTICS))
    assert not unknown, f"needs names unknown statistics {unknown}; known: {list(STATISTICS)}"
    names = [p.name for p in cls.params]
    assert len(names) == len(set(names)), "parameter names must be unique"
    for p in cls.params:
        assert p.help, f"parameter {p.name} needs a help text"
        assert p.parse(str(p.default)) == p.default, f"default of {p.name} must parse back"
    fields = {f.name for f in dataclasses.fields(StatsSpec)}
    for name in cls.stats_params:
        assert name in names, f"stats_params names {name}, which is not one of params"
        assert name in fields, f"stats_params names {name}, which is not a StatsSpec field"


def tiny_statistics(pruner: Pruner, model: nn.Module, targets: list[Target]) -> dict:
    """The statistics ``pruner.needs`` on the tiny model and data, by prunekit's collector."""
    from prunekit.calibrate.collector import Collector

    spec = pruner.stats_spec()
    spec = dataclasses.replace(spec, num_grads=max(1, TINY_SAMPLES // spec.grad_batch))
    collector = Collector(model, targets, tiny_data(), spec, pruner.needs, torch.device("cpu"))
    stats: dict = {}
    for _, group_stats in collector.collect():
        stats.update(group_stats)
    return stats


def check_pruner(
    cls: type[Pruner], stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None
) -> None:
    """Assert that ``cls`` honours the contract, end to end on a tiny model.

    ``prepare`` gets a real ``StepContext``; the statistics in ``needs`` are collected by
    prunekit on tiny data unless ``stats`` (target name -> statistics) is given; every score
    and update must have the weight's shape, no NaN, and leave the weights untouched.
    """
    check_declarations(cls)
    num_grads = next((p for p in cls.params if p.name == "num_grads"), None)
    small = {"num_grads": max(8, int(num_grads.minimum or 1))} if num_grads else {}
    pruner = cls(**small)
    model = tiny_model()
    targets, _ = find_targets(model)
    context = StepContext(model, targets, tiny_data(), torch.device("cpu"), mask="layer")
    context.sparsity, context.step = 0.5, 1
    pruner.prepare(context, 1, 1)
    if isinstance(pruner, LayerPruner):
        check_compression(pruner, model, targets)
        return
    if stats is None:
        stats = tiny_statistics(pruner, model, targets) if cls.needs else {}
    scores = {}
    for t in targets:
        before = t.weight.detach().clone()
        score = pruner.score(t, stats.get(t.name, {}))
        scores[t.name] = score
        if score is None:
            continue  # the pruner declines this tensor
        assert isinstance(score, torch.Tensor), "score must return a tensor or None"
        assert score.shape == t.weight.shape, (
            f"score for {t.name} has shape {tuple(score.shape)}, the weight {tuple(t.weight.shape)}"
        )
        assert not torch.isnan(score).any(), f"score for {t.name} has NaN"
        assert torch.equal(before, t.weight.detach()), "score must not modify the weights"
    keep = select(targets, scores, 0.5, "layer")
    for t in targets:
        before = t.weight.detach().clone()
        updated = pruner.update(t, keep[t.name], stats.get(t.name, {}))
        assert torch.equal(before, t.weight.detach()), "update must not modify the weights"
        if updated is None:
            continue
        assert updated.shape == t.weight.shape, (
            f"update for {t.name} must have the weight's shape {tuple(t.weight.shape)}"
        )
        assert torch.isfinite(updated).all(), f"update for {t.name} has NaN or Inf"


def check_compression(pruner: LayerPruner, model: nn.Module, targets: list[Target]) -> None:
    """``compress`` on every layer it supports: a bool keep-mask and finite weights of the
    weight's shape, the requested sparsity (or 2:4, unless refused with a UsageError), the
    weights left untouched."""
    from prunekit.calibrate.layer_inputs import input_gram

    for plain in (LayerRequest(0.5), LayerRequest(0.5, (2, 4))):
        for t in targets:
            if not pruner.supports(t.module):
                continue
            if plain.pattern and not nm_fits(t.weight.shape, plain.pattern[1]):
                continue  # prunekit leaves layers an N:M pattern does not fit dense
            columns = nm_columns(t.weight.shape) if plain.pattern else None
            request = dataclasses.replace(plain, columns=columns)
            gram = input_gram(model, t.module, tiny_data(), TINY_SAMPLES, torch.device("cpu"))
            before = t.weight.detach().clone()
            try:
                result = pruner.compress(t, gram, request)
            except UsageError:
                if request.pattern is None:
                    raise
                continue  # a pruner may refuse N:M with a usage error
            assert torch.equal(before, t.weight.detach()), "compress must not modify the weights"
            assert isinstance(result, Compressed), "compress must return a Compressed"
            assert result.keep.dtype == torch.bool, "the keep-mask must be bool"
            assert result.keep.shape == t.weight.shape, f"keep-mask for {t.name}: wrong shape"
            if request.pattern is None:
                pruned = t.numel - int(result.keep.sum())
                assert pruned == round(0.5 * t.numel), f"{t.name}: {pruned} pruned, asked half"
            else:
                groups = nm_groups(result.keep.reshape(t.weight.shape[0], -1), 4, columns)
                assert bool((groups.sum(-1) == 2).all()), f"{t.name}: not 2 of every 4 kept"
            if result.weight is not None:
                assert result.weight.shape == t.weight.shape, f"weight for {t.name}: wrong shape"
                assert torch.isfinite(result.weight).all(), f"weight for {t.name}: NaN or Inf"
