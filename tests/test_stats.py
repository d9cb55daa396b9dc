"""Per-sample gradients, the memory plan, the collector and the OBS pruners end to end."""

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit import fisher, registry
from prunekit.errors import NumericalError, UsageError
from prunekit.masks import find_targets, sparsity_of
from prunekit.pruners.base import StatsSpec
from prunekit.schedule import StepContext, oneshot, prune_step, substep_sparsities
from prunekit.stats import Collector, parse_size, per_sample_gradients, plan_memory

CPU = torch.device("cpu")


def small_problem(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(n, 5, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, TensorDataset(x, y)


def loop_gradients(model, name, x, y, batch):
    """The slow oracle: one backward per mini-batch."""
    param = dict(model.named_parameters())[name]
    rows = []
    for i in range(0, len(x), batch):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch]).backward()
        rows.append(param.grad.reshape(-1).clone())
    return torch.stack(rows)


@pytest.mark.parametrize("batch", [1, 3])
def test_per_sample_gradients_match_a_backward_loop(batch):
    model, data = small_problem()
    targets, _ = find_targets(model)
    targets[0].mask[0, 0] = False
    x, y = data.tensors
    rows = per_sample_gradients(model, targets, x, y, batch)
    for t in targets:
        expected = loop_gradients(model, t.name, x, y, batch) * t.mask.reshape(1, -1)
        torch.testing.assert_close(rows[t.name], expected, rtol=1e-5, atol=1e-6)
    assert rows["0.weight"][:, 0].abs().sum() == 0  # the masked weight has no gradient


def test_collector_statistics_equal_dense_formulas():
    model, data = small_problem()
    targets, _ = find_targets(model)
    spec = StatsSpec(num_grads=24, block_size=8, damp=1e-2)
    collector = Collector(model, targets, data, spec, frozenset({"fisher_inv"}), CPU, budget=10**9)
    ((_group, stats),) = list(collector.collect())
    x, y = data.tensors
    for t in targets:
        g = loop_gradients(model, t.name, x, y, 1)
        torch.testing.assert_close(stats[t.name]["grad_mean"].reshape(-1), g.mean(0))
        torch.testing.assert_close(stats[t.name]["fisher_diag"].reshape(-1), g.square().mean(0))
        expected = fisher.inverse_from_gram(fisher.gram_blocks(g.double(), 8), 24, 1e-2)
        torch.testing.assert_close(
            stats[t.name]["fisher_inv"].double(), expected, rtol=1e-4, atol=1e-4
        )


def test_true_fisher_samples_labels_from_the_model():
    model, data = small_problem()
    targets, _ = find_targets(model)
    spec = StatsSpec(num_grads=24, fisher="true")
    empirical = next(
        Collector(
            model, targets, data, StatsSpec(num_grads=24), frozenset({"fisher_diag"}), CPU
        ).collect()
    )[1]
    true1 = next(
        Collector(model, targets, data, spec, frozenset({"fisher_diag"}), CPU, seed=3).collect()
    )[1]
    true2 = next(
        Collector(model, targets, data, spec, frozenset({"fisher_diag"}), CPU, seed=3).collect()
    )[1]
    assert torch.equal(true1["2.weight"]["fisher_diag"], true2["2.weight"]["fisher_diag"])
    assert not torch.equal(true1["2.weight"]["fisher_diag"], empirical["2.weight"]["fisher_diag"])


def test_memory_plan_splits_targets_and_rejects_tiny_budgets():
    model, _ = small_problem()
    targets, _ = find_targets(model)
    spec = StatsSpec(num_grads=24, block_size=8)
    roomy = plan_memory(targets, spec, frozenset({"fisher_inv"}), 10**9)
    assert len(roomy.groups) == 1 and roomy.chunk == 24
    tight = plan_memory(targets, spec, frozenset({"fisher_inv"}), roomy.group_bytes[0] - 1)
    assert len(tight.groups) == 2 and all(b <= tight.budget for b in tight.group_bytes)
    assert "2 pass(es)" in tight.describe()
    with pytest.raises(UsageError, match=r"too small for 0\.weight: it needs at least"):
        plan_memory(targets, spec, frozenset({"fisher_inv"}), 1000)


def test_multi_pass_gives_the_same_result_as_one_pass():
    results = []
    for budget in (10**9, 6000):
        model, data = small_problem()
        targets, _ = find_targets(model)
        pruner = registry.create(
            "woodfisher", {"num_grads": "24", "block_size": "8", "damp": "1e-2"}
        )
        ctx = StepContext(model, targets, pruner, data, CPU, memory_budget=budget)
        assert Collector(
            model, targets, data, pruner.stats_spec(), pruner.needs, CPU, budget
        ).passes == (1 if budget > 10**6 else 2)
        prune_step(ctx, 0.5)
        results.append([t.weight.detach().clone() for t in targets])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_woodfisher_step_zeroes_pruned_weights_and_compensates():
    model, data = small_problem()
    targets, _ = find_targets(model)
    before = [t.weight.detach().clone() for t in targets]
    pruner = registry.create("woodfisher", {"num_grads": "24", "block_size": "8"})
    prune_step(StepContext(model, targets, pruner, data, CPU), 0.5)
    assert sparsity_of(targets)[0] == 0.5
    for t, _old in zip(targets, before, strict=True):
        assert torch.all(t.weight[~t.mask] == 0.0)
    moved = any(
        not torch.equal(t.weight[t.mask], old[t.mask])
        for t, old in zip(targets, before, strict=True)
    )
    assert moved  # the surviving weights were compensated


def test_obs_uses_one_block_per_tensor():
    pruner = registry.create("obs")
    assert pruner.stats_spec().block_size is None
    model, _ = small_problem()
    targets, _ = find_targets(model)
    assert pruner.stats_spec().block_for(targets[0]) == 20


def test_masks_persist_across_recomputation():
    model, data = small_problem()
    targets, _ = find_targets(model)
    pruner = registry.create("woodfisher", {"num_grads": "24", "block_size": "8"})
    ctx = StepContext(model, targets, pruner, data, CPU)
    history = []
    for s in substep_sparsities(0.0, 0.8, 4):
        prune_step(ctx, s)
        history.append({t.name: t.mask.clone() for t in targets})
        assert all(torch.all(t.weight[~t.mask] == 0) for t in targets)
    for earlier, later in itertools.pairwise(history):
        for name in earlier:
            assert not torch.any(later[name] & ~earlier[name])  # nothing pruned comes back
    assert sparsity_of(targets)[0] == pytest.approx(0.8, abs=1 / 32)


def test_substep_sparsities_interpolate_density_geometrically():
    steps = substep_sparsities(0.0, 0.9, 2)
    assert steps[0] == pytest.approx(1 - 0.1**0.5) and steps[1] == 0.9
    assert substep_sparsities(0.2, 0.5, 1) == [0.5]


def test_recompute_reaches_target_exactly():
    model, data = small_problem()
    targets, _ = find_targets(model)
    pruner = registry.create("woodfisher", {"num_grads": "24", "block_size": "8"})
    oneshot(StepContext(model, targets, pruner, data, CPU), 0.75, recompute=3)
    assert sparsity_of(targets)[0] == 0.75


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"damp": "0"}, "must be > 0.0"),
        ({"damp": "-1"}, "must be > 0.0"),
        ({"block_size": "0"}, "must be >= 1"),
        ({"num_grads": "0"}, "must be >= 1"),
        ({"fisher": "fake"}, "choose one of empirical, true"),
    ],
)
def test_bad_hyperparameters(params, message):
    with pytest.raises(UsageError, match=message):
        registry.create("woodfisher", params)


def test_more_gradients_than_calibration_samples():
    model, data = small_problem()
    targets, _ = find_targets(model)
    with pytest.raises(UsageError, match="calibration split has 24; lower --param num_grads"):
        Collector(model, targets, data, StatsSpec(num_grads=25), frozenset({"fisher_inv"}), CPU)


def test_nan_gradients_name_the_tensor():
    model, data = small_problem()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    targets, _ = find_targets(model)
    collector = Collector(
        model, targets, data, StatsSpec(num_grads=24), frozenset({"fisher_diag"}), CPU
    )
    with pytest.raises(NumericalError, match=r"gradients of 0\.weight contain NaN"):
        list(collector.collect())


def test_not_positive_definite_raises_damping_once(monkeypatch):
    model, data = small_problem()
    targets, _ = find_targets(model)
    collector = Collector(
        model,
        targets,
        data,
        StatsSpec(num_grads=24, block_size=4, damp=1e-3),
        frozenset({"fisher_inv"}),
        CPU,
    )
    indefinite = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.005 * 24])).unsqueeze(0)
    inverse = collector._inverse(targets[0], [], indefinite)  # -0.005 + 1e-3 < 0 < -0.005 + 1e-2
    assert "used damp=0.01" in collector.warnings[0]
    torch.testing.assert_close(inverse[0].diagonal()[-1], torch.tensor(1 / 0.005))
    hopeless = torch.diag(torch.tensor([1.0, -1.0 * 24, 1.0, 1.0])).unsqueeze(0)
    with pytest.raises(NumericalError, match=r"not positive definite even with damp=0\.01"):
        collector._inverse(targets[0], [], hopeless)


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1e6") == 10**6
    with pytest.raises(UsageError, match="give a size"):
        parse_size("lots")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_same_masks_as_cpu():
    masks = []
    for device in ("cpu", "cuda"):
        model, data = small_problem(n=48)
        model.to(device)
        targets, _ = find_targets(model)
        pruner = registry.create("woodfisher", {"num_grads": "48", "block_size": "8"})
        oneshot(StepContext(model, targets, pruner, data, torch.device(device)), 0.6)
        masks.append({t.name: t.mask.cpu() for t in targets})
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name])
