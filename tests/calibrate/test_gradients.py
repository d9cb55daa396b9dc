"""Per-sample gradients: the hook engine (one batched backward, per-layer rules) equals vmap
and a loop of single-sample backward passes, in float64; layers without a rule fall back."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.calibrate.collector import Collector
from prunekit.calibrate.gradients import (
    engine_note,
    has_hook_rule,
    hook_gradients,
    per_sample_gradients,
)
from prunekit.contract.objectives import LABELS
from prunekit.contract.statistics import FISHER_DIAG
from prunekit.contract.target import StatsSpec, Target


def _targets(model: nn.Module) -> list[Target]:
    return [
        Target(f"{name}.weight", m, m.weight, torch.ones_like(m.weight, dtype=torch.bool))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]


def _loop(model, targets, x, y, b):
    """The oracle: one backward per mini-batch of b samples."""
    rows = {t.name: [] for t in targets}
    for i in range(len(x) // b):
        model.zero_grad()
        LABELS.loss(model(x[i * b : (i + 1) * b]), y[i * b : (i + 1) * b]).backward()
        for t in targets:
            rows[t.name].append(t.weight.grad.reshape(-1).clone())
    return {k: torch.stack(v) for k, v in rows.items()}


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
        self.b = nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False)
        self.c = nn.Conv2d(6, 6, 3, padding=1, groups=3)  # no rule: vmap
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        return self.head(x.mean((2, 3)))


class _Block(nn.Module):
    """A transformer block (attention's projections called through nn.Linear) on sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.up, self.down, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1)
        x = x + self.proj(attention @ v)
        x = x + self.down(torch.relu(self.up(self.norm(x))))
        return self.head(x.mean(1))


class _Reused(nn.Module):
    """One Linear called twice, and one whose weight is also used outside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.twice, self.tied = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        x = torch.tanh(self.twice(torch.tanh(self.twice(x))))
        return self.tied(x) + x @ self.tied.weight.t()


CASES = {
    "convs": (_Convs, (3, 9, 9), 5),
    "block": (_Block, (7, 8), 3),
    "reused": (_Reused, (6,), 6),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("grad_batch", [1, 3])
def test_hook_gradients_equal_vmap_and_a_backward_loop(case, grad_batch):
    build, shape, classes = CASES[case]
    torch.manual_seed(0)
    model = build().double().eval()
    targets = _targets(model)
    x, y = torch.randn(12, *shape, dtype=torch.float64), torch.arange(12) % classes
    hooks = per_sample_gradients(model, targets, x, y, grad_batch, LABELS, "hooks")
    vmapped = per_sample_gradients(model, targets, x, y, grad_batch, LABELS, "vmap")
    loop = _loop(model, targets, x, y, grad_batch)
    for t in targets:
        assert hooks[t.name].shape == (12 // grad_batch, t.numel)
        torch.testing.assert_close(hooks[t.name], loop[t.name], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(vmapped[t.name], loop[t.name], rtol=1e-6, atol=1e-9)


def test_what_the_hooks_take_and_what_falls_back():
    torch.manual_seed(0)
    convs, reused = _Convs().double().eval(), _Reused().double().eval()
    assert [has_hook_rule(t) for t in _targets(convs)] == [True, True, False, True]
    taken = hook_gradients(convs, _targets(convs), torch.randn(4, 3, 9, 9, dtype=torch.float64),
                           torch.arange(4), 1, LABELS)  # fmt: skip
    assert sorted(taken) == ["a.weight", "b.weight", "head.weight"]  # c: grouped, vmap's
    x = torch.randn(4, 6, dtype=torch.float64)
    taken = hook_gradients(reused, _targets(reused), x, torch.arange(4), 1, LABELS)
    # called twice: the calls' terms add up; used outside its forward: left to vmap
    assert sorted(taken) == ["twice.weight"]


def test_masks_are_applied_and_requires_grad_is_restored():
    torch.manual_seed(0)
    model = _Convs().eval()
    targets = _targets(model)
    targets[0].mask[0] = False
    model.a.weight.requires_grad_(False)
    grads = per_sample_gradients(model, targets, torch.randn(4, 3, 9, 9), torch.arange(4))
    assert (grads["a.weight"].reshape(4, *model.a.weight.shape)[:, 0] == 0).all()
    assert not model.a.weight.requires_grad and model.b.weight.requires_grad


class _SequenceFirst(nn.Module):
    """Linear layers fed (T, N, D) and flattened (N·T, D) tensors, and one called by keyword
    (``input=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.flat, self.keyword = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):  # x: (N, T, 5)
        t = torch.tanh(self.first(x.transpose(0, 1))).transpose(0, 1)  # sequence-first
        t = torch.tanh(self.flat(t.reshape(-1, 5))).reshape(t.shape)  # flattened tokens
        return self.keyword(input=t.mean(1))


@pytest.mark.parametrize("length", [4, 6])  # 6: as many positions as samples
def test_layers_not_batched_along_their_first_dimension_fall_back(length):
    torch.manual_seed(0)
    model = _SequenceFirst().double().eval()
    targets = _targets(model)
    x, y = torch.randn(6, length, 5, dtype=torch.float64), torch.arange(6) % 3
    # sequence-first and flattened: left to vmap; the keyword call is read from its kwargs
    assert sorted(hook_gradients(model, targets, x, y, 1, LABELS)) == ["keyword.weight"]
    hooks = per_sample_gradients(model, targets, x, y, 1, LABELS, "hooks")
    loop = _loop(model, targets, x, y, 1)
    for t in targets:
        torch.testing.assert_close(hooks[t.name], loop[t.name], rtol=1e-6, atol=1e-9)


def test_fewer_samples_than_a_mini_batch_and_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    targets = _targets(model)
    rows = per_sample_gradients(model, targets, torch.randn(2, 4), torch.arange(2), 3)
    assert all(r.shape == (0, t.numel) for t, r in zip(targets, rows.values(), strict=True))
    model.train()
    before = model[1].running_mean.clone()
    hook_gradients(model, targets, torch.randn(8, 4), torch.arange(8) % 3, 1, LABELS)
    assert torch.equal(model[1].running_mean, before) and model.training  # eval inside


def test_fallbacks_are_named_with_their_reason_in_verbose_and_the_report():
    torch.manual_seed(0)
    convs = _Convs().eval()
    note = engine_note(_targets(convs), "hooks")
    assert note == (
        "per-sample gradients: hooks for 3 of 4 targets; vmap for c.weight (grouped convolution)"
    )
    assert engine_note(_targets(convs), "vmap").endswith("all 4 targets (grad_engine=vmap)")
    reused = _Reused().eval()
    data = TensorDataset(torch.randn(8, 6), torch.arange(8) % 6)
    collector = Collector(reused, _targets(reused), data, StatsSpec(num_grads=8), frozenset(
        {FISHER_DIAG}), torch.device("cpu"))  # fmt: skip
    for _ in collector.collect():
        pass
    engine = collector.report()["gradient_engine"]
    assert engine["engine"] == "hooks"
    assert list(engine["vmap"]) == ["tied.weight"]  # used outside its forward: rows differ
    assert "rows differ" in engine["vmap"]["tied.weight"]
