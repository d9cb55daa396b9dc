"""Helpers for plugin authors: ``check_pruner`` verifies the pruner contract.

Use it in a plugin's own tests::

    from prunekit.testing import check_pruner
    def test_contract():
        check_pruner(MyPruner)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prunekit.masks import find_targets, select
from prunekit.pruners.base import Pruner


def tiny_model() -> nn.Module:
    """A deterministic Conv + Linear model small enough to reason about."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def check_pruner(
    cls: type[Pruner], stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None
) -> None:
    """Assert that ``cls`` honours the contract; ``stats`` feeds pruners that need statistics."""
    assert issubclass(cls, Pruner), f"{cls} must subclass prunekit.pruners.Pruner"
    assert cls.name and cls.name.isidentifier(), "name must be a non-empty identifier"
    assert cls.summary(), "the class docstring's first line is the pruner's summary"
    assert isinstance(cls.needs, frozenset), "needs must be a frozenset of statistic names"
    names = [p.name for p in cls.params]
    assert len(names) == len(set(names)), "parameter names must be unique"
    for p in cls.params:
        assert p.help, f"parameter {p.name} needs a help text"
        assert p.parse(str(p.default)) == p.default, f"default of {p.name} must parse back"
    if cls.needs and stats is None:
        return  # scoring needs statistics the caller did not provide
    pruner = cls()
    model = tiny_model()
    targets, _ = find_targets(model)
    scores = {}
    for t in targets:
        target_stats = (stats or {}).get(t.name, {})
        before = t.weight.detach().clone()
        score = pruner.score(t, target_stats)
        scores[t.name] = score
        if score is None:
            continue  # the pruner declines this tensor
        assert isinstance(score, torch.Tensor), "score must return a tensor or None"
        assert score.shape == t.weight.shape, f"score for {t.name} must match the weight shape"
        assert not torch.isnan(score).any(), f"score for {t.name} has NaN"
        assert torch.equal(before, t.weight.detach()), "score must not modify the weights"
    keep = select(targets, scores, 0.5, "global")
    for t in targets:
        updated = pruner.update(t, keep[t.name], (stats or {}).get(t.name, {}))
        assert updated is None or updated.shape == t.weight.shape, "update must match the shape"
