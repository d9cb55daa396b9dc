"""The example plugin's own tests: exact LAMP scores and discovery through entry points."""

import pytest
import torch

from prunekit.pruners import registry
from prunekit.testing import check_pruner


@pytest.fixture(autouse=True)
def only_this_plugin(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "prunekit-example")


def test_discovered_through_entry_point():
    info = registry.discover()["lamp"]
    assert [i.distribution for i in info] == ["prunekit-example"]
    cls = registry.load("lamp")
    assert cls.__module__ == "prunekit_example"


def test_contract():
    check_pruner(registry.load("lamp"))


def test_scores_by_hand():
    # squares 9, 1, 4 -> sorted 1, 4, 9 with tails 14, 13, 9
    from prunekit.api import Target

    weight = torch.nn.Parameter(torch.tensor([[3.0, -1.0, 2.0]]))
    target = Target("w", torch.nn.Identity(), weight, torch.ones(1, 3, dtype=torch.bool))
    expected = torch.tensor([[1.0, 1 / 14, 4 / 13]])
    torch.testing.assert_close(registry.create("lamp").score(target, {}), expected)


def test_global_lamp_keeps_every_layers_largest_weight():
    from prunekit.api import Target
    from prunekit.engine.masks import select

    big = torch.nn.Parameter(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    small = torch.nn.Parameter(torch.tensor([0.1, 0.2]))
    targets = [
        Target(n, torch.nn.Identity(), w, torch.ones_like(w, dtype=torch.bool))
        for n, w in (("big", big), ("small", small))
    ]
    pruner = registry.create("lamp")
    keep = select(targets, {t.name: pruner.score(t, {}) for t in targets}, 0.5)
    # LAMP: big -> 100/3000, 400/2900, 900/2500, 1; small -> 0.01/0.05, 1
    assert keep["big"].tolist() == [False, False, True, True]
    assert keep["small"].tolist() == [False, True]
