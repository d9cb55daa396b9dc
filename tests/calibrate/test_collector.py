"""Per-sample gradients, the memory plan, the collector and the OBS pruners end to end."""

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.calibrate import collector as stats_module
from prunekit.calibrate import fisher
from prunekit.calibrate.collector import Collector
from prunekit.calibrate.gradients import per_sample_gradients
from prunekit.calibrate.memory import PeakMemory, parse_size, plan_memory
from prunekit.contract.objectives import LABELS
from prunekit.contract.target import StatsSpec
from prunekit.engine.masks import find_targets, sparsity_of
from prunekit.engine.step import Pruning, auto_recompute, oneshot, prune_step, substep_sparsities
from prunekit.errors import NumericalError, OutOfMemoryError, UsageError
from prunekit.pruners import registry

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
    spec = StatsSpec(num_grads=24, block_size=8, damp=1e-2, damp_mode="absolute")
    collector = Collector(model, targets, data, spec, frozenset({"fisher_inv"}), CPU, budget=10**9)
    ((_group, stats),) = list(collector.collect())
    x, y = data.tensors
    for t in targets:
        g = loop_gradients(model, t.name, x, y, 1)
        torch.testing.assert_close(stats[t.name]["grad_mean"].reshape(-1), g.mean(0))
        torch.testing.assert_close(stats[t.name]["fisher_diag"].reshape(-1), g.square().mean(0))
        expected = fisher.inverse_from_gram(fisher.gram_blocks(g.double(), 8), 24, 1e-2)
        torch.testing.assert_close(
            stats[t.name]["fisher_inv"].blocks.double(), expected, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("budget", [10**9, 7800])  # one pass; two (and a scale pre-pass)
def test_relative_damping_is_alpha_times_the_mean_fisher_diagonal(budget):
    model, data = small_problem()
    targets, _ = find_targets(model)
    spec = StatsSpec(num_grads=24, block_size=8, damp=0.1)  # relative by default
    collector = Collector(model, targets, data, spec, frozenset({"fisher_inv"}), CPU, budget)
    groups = list(collector.collect())
    assert len(groups) == (1 if budget > 10**6 else 2)
    stats = {name: s for _group, per in groups for name, s in per.items()}
    x, y = data.tensors
    rows = {t.name: loop_gradients(model, t.name, x, y, 1).double() for t in targets}
    mean_diag = float(torch.cat([g.square().mean(0) for g in rows.values()]).mean())
    damp = 0.1 * mean_diag  # α · mean of diag F over every target: one λ for the model
    for t in targets:
        g = rows[t.name]
        assert collector.damping[t.name] == pytest.approx(damp, rel=1e-5)
        expected = fisher.inverse_from_gram(fisher.gram_blocks(g, 8), 24, damp)
        torch.testing.assert_close(
            stats[t.name]["fisher_inv"].blocks.double(), expected, rtol=1e-3, atol=0
        )
    assert collector.report()["damping"]["mode"] == "relative"


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


@pytest.mark.parametrize("budget", [10**9, 6000])  # one pass; several (and a scale pre-pass)
def test_gradient_rows_are_the_per_sample_gradients_in_every_plan(budget):
    model, data = small_problem()
    targets, _ = find_targets(model)
    spec = StatsSpec(num_grads=24, damp=0.1)
    collector = Collector(model, targets, data, spec, frozenset({"grad_rows"}), CPU, budget)
    groups = list(collector.collect())
    assert len(groups) == collector.passes and (collector.passes > 1) == (budget < 10**6)
    x, y = data.tensors
    rows = {t.name: loop_gradients(model, t.name, x, y, 1) for t in targets}
    for _group, stats in groups:
        for name, s in stats.items():
            torch.testing.assert_close(s["grad_rows"], rows[name], rtol=1e-5, atol=1e-6)
    mean_diag = float(torch.cat([g.square().mean(0) for g in rows.values()]).mean())
    assert collector.fisher_scale == pytest.approx(mean_diag, rel=1e-5)
    assert collector.report()["memory"]["planned_peak_bytes"] <= budget


def test_memory_plan_splits_targets_and_rejects_tiny_budgets():
    model, _ = small_problem()
    targets, _ = find_targets(model)
    spec = StatsSpec(num_grads=24, block_size=8)
    roomy = plan_memory(targets, spec, frozenset({"fisher_inv"}), 10**9)
    assert len(roomy.groups) == 1 and roomy.chunk == 24
    # fewer passes beat a larger chunk: one pass of single gradients rather than two of 3
    single = plan_memory(targets, spec, frozenset({"fisher_inv"}), 8900)
    assert (len(single.groups), single.chunk) == (1, 1)
    tight = plan_memory(targets, spec, frozenset({"fisher_inv"}), 7800)
    assert len(tight.groups) == 2 and all(b <= tight.budget for b in tight.group_bytes)
    assert "2 pass(es)" in tight.describe()
    with pytest.raises(UsageError, match=r"too small for 0\.weight: it needs at least"):
        plan_memory(targets, spec, frozenset({"fisher_inv"}), 1000)


def test_multi_pass_gives_the_same_result_as_one_pass():
    results = []
    for budget in (10**9, 7800):
        model, data = small_problem()
        targets, _ = find_targets(model)
        pruner = registry.create(
            "woodfisher", {"num_grads": "24", "block_size": "8", "damp": "1e-2"}
        )
        ctx = Pruning.of(model, targets, pruner, data, CPU, memory_budget=budget)
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
    prune_step(Pruning.of(model, targets, pruner, data, CPU), 0.5)
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
    ctx = Pruning.of(model, targets, pruner, data, CPU)
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
    oneshot(Pruning.of(model, targets, pruner, data, CPU), 0.75, recompute=3)
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


def test_not_positive_definite_escalates_the_damping_and_reports_it():
    model, data = small_problem()
    targets, _ = find_targets(model)
    collector = Collector(
        model,
        targets,
        data,
        StatsSpec(num_grads=24, block_size=4, damp=1e-3, damp_mode="absolute"),
        frozenset({"fisher_inv"}),
        CPU,
    )
    indefinite = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.005 * 24])).unsqueeze(0)
    inverse = collector._inverse(targets[0], indefinite, 4)  # -0.005 + 1e-3 < 0 < + 1e-2
    assert "used λ=0.01" in collector.warnings[0]
    assert collector.damping[targets[0].name] == pytest.approx(0.01)
    torch.testing.assert_close(inverse[0].diagonal()[-1], torch.tensor(1 / 0.005))
    hopeless = torch.diag(torch.tensor([1.0, -1e6 * 24, 1.0, 1.0])).unsqueeze(0)
    with pytest.raises(NumericalError, match=r"not positive definite even with λ=10;"):
        collector._inverse(targets[0], hopeless, 4)


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1e6") == 10**6
    with pytest.raises(UsageError, match="give a size"):
        parse_size("lots")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_same_masks_as_cpu():
    masks = []
    for device in ("cpu", "cuda"):
        model, data = small_problem(n=48)
        model.to(device)
        targets, _ = find_targets(model)
        pruner = registry.create("woodfisher", {"num_grads": "48", "block_size": "8"})
        oneshot(Pruning.of(model, targets, pruner, data, torch.device(device)), 0.6)
        masks.append({t.name: t.mask.cpu() for t in targets})
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name])


def _woodfisher_weights(budget=10**9, **patch):
    model, data = small_problem()
    targets, _ = find_targets(model)
    pruner = registry.create("woodfisher", {"num_grads": "24", "block_size": "8"})
    ctx = Pruning.of(model, targets, pruner, data, CPU, memory_budget=budget)
    warnings = prune_step(ctx, 0.5)
    return [t.weight.detach().clone() for t in targets], warnings, ctx.statistics[-1]


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result(monkeypatch):
    expected, _, _ = _woodfisher_weights()
    real = stats_module.per_sample_gradients
    sizes = []

    def limited(model, targets, x, y, grad_batch=1, objective=LABELS, engine="hooks"):
        sizes.append(len(x))
        if len(x) > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(model, targets, x, y, grad_batch, objective, engine)

    monkeypatch.setattr(stats_module, "per_sample_gradients", limited)
    weights, warnings, record = _woodfisher_weights()
    for a, b in zip(weights, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert sizes[:3] == [24, 12, 6] and set(sizes[3:]) == {3}  # halved until it fits
    assert any("out of memory with 24 gradients per chunk" in w for w in warnings)
    assert record["memory"]["chunk"] == 24 and record["memory"]["chunk_used"] == 3


def test_out_of_memory_at_one_sample_says_what_one_sample_needs(monkeypatch):
    def never(*args, **kwargs):
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(stats_module, "per_sample_gradients", never)
    with pytest.raises(OutOfMemoryError, match=r"one sample needs about .* the budget is"):
        _woodfisher_weights()


def test_other_runtime_errors_are_not_taken_for_out_of_memory(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(stats_module, "per_sample_gradients", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _woodfisher_weights()


def test_multi_pass_on_cpu_recomputes_for_the_update_and_says_so(monkeypatch):
    _, _, one = _woodfisher_weights()
    real, rounds = Collector._fisher_scale, []
    monkeypatch.setattr(Collector, "_fisher_scale", lambda self: rounds.append(1) or real(self))
    _, _, two = _woodfisher_weights(budget=7800)
    assert len(rounds) == 1  # the damping scale is measured once, not again for the update
    assert (one["memory"]["passes"], one["update_passes"]) == (1, 0)
    assert (two["memory"]["passes"], two["update_passes"]) == (2, 2)


def test_kept_statistics_give_the_same_update_without_a_second_round(monkeypatch):
    """The path CUDA takes with several passes: each pass's statistics parked in host
    memory and reused by the OBS update."""
    recomputed, _, _ = _woodfisher_weights(budget=7800)
    monkeypatch.setattr(Collector, "retains_for_update", lambda self: True)
    kept, _, record = _woodfisher_weights(budget=7800)
    assert (record["memory"]["passes"], record["update_passes"]) == (2, 0)
    for a, b in zip(kept, recomputed, strict=True):
        torch.testing.assert_close(a, b)


def test_memory_plan_counts_activations_and_covers_the_measured_peak():
    """A CNN whose activations dwarf its weights: the plan (with its activation estimate)
    is at least the peak resident memory measured while collecting the statistics."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    data = TensorDataset(torch.randn(64, 3, 64, 64, generator=gen), torch.arange(64) % 10)
    targets, _ = find_targets(model)
    spec = StatsSpec(num_grads=64, block_size=64)
    needs = frozenset({"fisher_inv"})
    collector = Collector(model, targets, data, spec, needs, CPU, budget=2 * 2**30)
    plan = collector.plan
    weights_only = plan_memory(targets, spec, needs, plan.budget)  # activations not counted
    assert plan.activation_bytes > 3 * 32 * 64 * 64 * 4  # at least one conv output, x3
    assert plan.planned_peak > 2 * weights_only.planned_peak
    with PeakMemory(CPU) as peak:
        list(collector.collect())
    if peak.peak is None:
        pytest.skip("no /proc/self/clear_refs: peak RSS cannot be measured here")
    assert peak.peak <= plan.planned_peak, (peak.peak, plan.planned_peak)
    assert collector.report()["memory"]["measured_peak_bytes"] == pytest.approx(peak.peak, rel=0.5)


def test_memory_budget_below_one_block_names_the_target_and_its_needs():
    model, _ = small_problem()
    targets, _ = find_targets(model)
    with pytest.raises(UsageError, match=r"too small for 0\.weight: it needs at least .* Fisher"):
        plan_memory(targets, StatsSpec(num_grads=24, block_size=8), frozenset({"fisher_inv"}), 500)


def test_auto_recompute_limits_each_sub_step_to_a_quarter_of_the_remaining_weights():
    woodfisher, magnitude = registry.create("woodfisher"), registry.create("magnitude")
    assert auto_recompute(magnitude, 0.0, 0.9) == 1
    for final, steps in ((0.5, 3), (0.7, 5), (0.8, 6), (0.9, 9), (0.95, 11)):
        assert auto_recompute(woodfisher, 0.0, final) == steps
        densities = [1.0, *(1 - s for s in substep_sparsities(0.0, final, steps))]
        assert all(b / a >= 0.75 - 1e-9 for a, b in itertools.pairwise(densities))
    assert auto_recompute(woodfisher, 0.9, 0.9) == 1


def pruned_in_advance(model, targets, every=3):
    """Prunes every ``every``-th weight of each target (mask and weight), as a step would."""
    with torch.no_grad():
        for t in targets:
            t.mask.reshape(-1)[::every] = False
            t.weight.mul_(t.mask)


def test_the_curvature_covers_only_the_unpruned_weights():
    """A pruned weight has zero gradient rows, so its Fisher is λI and uncoupled: the blocks
    hold the unpruned coordinates only, B consecutive ones each."""
    model, data = small_problem()
    targets, _ = find_targets(model)
    pruned_in_advance(model, targets)
    with torch.no_grad():  # and one target pruned entirely
        targets[1].mask.fill_(False)
        targets[1].weight.zero_()
    x, y = data.tensors
    for m in (24, 8):  # Gram blocks (m >= B), Woodbury rows (m < B)
        spec = StatsSpec(num_grads=m, block_size=12, damp=1e-2, damp_mode="absolute")
        needs = frozenset({"fisher_inv"})
        collector = Collector(model, targets, data, spec, needs, CPU, 10**9, covered=True)
        ((_group, stats),) = list(collector.collect())
        for t in targets:
            inverse = stats[t.name]["fisher_inv"]
            covered = t.mask.reshape(-1).nonzero().squeeze(1)
            torch.testing.assert_close(inverse.index, covered)
            g = loop_gradients(model, t.name, x[:m], y[:m], 1).double()[:, covered]
            block = max(1, min(12, len(covered)))
            expected = fisher.inverse_from_rows(g, block, 1e-2)
            torch.testing.assert_close(inverse.blocks.double(), expected, rtol=1e-4, atol=1e-4)
            assert torch.all(inverse.diag()[~t.mask.reshape(-1)] == 1 / 1e-2)
    assert stats[targets[1].name]["fisher_inv"].blocks.numel() == 0
    positional = Collector(model, targets, data, spec, needs, CPU, 10**9)  # the v1 default
    ((_group, stats),) = list(positional.collect())
    assert all(stats[t.name]["fisher_inv"].index is None for t in targets)
    assert stats[targets[0].name]["fisher_inv"].blocks.shape == (2, 12, 12)  # 20 weights


@pytest.mark.parametrize("exact", [True, False])
def test_obs_on_a_pruned_layer_equals_the_dense_inverse_fisher(exact):
    """With one block per tensor the covered inverse is exact: scores and the compensating
    update equal those of the dense (λI + GᵀG/m)⁻¹ of the masked gradients."""
    model, data = small_problem()
    targets, _ = find_targets(model)
    pruned_in_advance(model, targets)
    damp = 1e-2
    pruner = registry.create(
        "obs", {"num_grads": "24", "damp": str(damp), "damp_mode": "absolute", "exact": str(exact)}
    )
    assert pruner.covered_curvature
    spec, needs = pruner.stats_spec(), pruner.needs
    collector = Collector(model, targets, data, spec, needs, CPU, 10**9, covered=True)
    ((_group, stats),) = list(collector.collect())
    x, y = data.tensors
    for t in targets:
        assert stats[t.name]["fisher_inv"].index is not None
        g = loop_gradients(model, t.name, x, y, 1).double() * t.mask.reshape(1, -1)
        dense = torch.linalg.inv(damp * torch.eye(t.numel, dtype=torch.float64) + g.T @ g / 24)
        w = t.weight.detach().double().reshape(-1)
        scores = pruner.score(t, stats[t.name])
        torch.testing.assert_close(
            scores.double().reshape(-1), w.square() / (2 * dense.diagonal()), rtol=1e-4, atol=1e-9
        )
        keep = t.mask.clone()
        alive = t.mask.reshape(-1).nonzero().squeeze(1)
        keep.reshape(-1)[alive[::2]] = False  # prune half of the rest
        prune = (t.mask & ~keep).reshape(-1)
        p = prune.nonzero().squeeze(1)
        if exact:
            delta = -dense[:, p] @ torch.linalg.solve(dense[p][:, p], w[p])
        else:
            delta = -dense[:, p] @ (w[p] / dense.diagonal()[p])
        expected = (w + delta).masked_fill(prune, 0.0)
        updated = pruner.update(t, keep, stats[t.name]).double().reshape(-1)
        torch.testing.assert_close(updated, expected, rtol=1e-4, atol=1e-6)
        assert torch.all(updated[~t.mask.reshape(-1)] == 0)  # pruned before: still zero


def test_group_scores_over_the_covered_weights_equal_the_dense_formula():
    """--structure channels with woodfisher after a sub-step: set scores ½ θ_Sᵀ (H[S,S])⁻¹ θ_S
    read through the index equal those of the dense inverse (pruned members add nothing)."""
    model, data = small_problem()
    targets, _ = find_targets(model)
    pruned_in_advance(model, targets)
    damp = 1e-2
    pruner = registry.create("obs", {"num_grads": "24", "damp": str(damp), "damp_mode": "absolute"})
    spec, needs = pruner.stats_spec(), pruner.needs
    collector = Collector(model, targets, data, spec, needs, CPU, 10**9, covered=True)
    ((_group, stats),) = list(collector.collect())
    x, y = data.tensors
    t = targets[0]  # (4, 5): a set per input column, padded with -1 in the last one
    sets = torch.arange(20).reshape(4, 5).T.clone()
    sets[-1, -1] = -1
    g = loop_gradients(model, t.name, x, y, 1).double() * t.mask.reshape(1, -1)
    dense = torch.linalg.inv(damp * torch.eye(20, dtype=torch.float64) + g.T @ g / 24)
    w = (t.weight.detach() * t.mask).double().reshape(-1)
    expected = []
    for members in sets:
        s = members[members >= 0]
        s = s[t.mask.reshape(-1)[s]]  # pruned members: zero and uncoupled
        expected.append(0.5 * w[s] @ torch.linalg.solve(dense[s][:, s], w[s]))
    scores = pruner.set_scores(t, stats[t.name], sets)
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-4, atol=1e-9)


def test_a_block_inverse_with_an_index_needs_the_damping_outside():
    from prunekit.contract.curvature import BlockInverse

    with pytest.raises(ValueError, match="outside"):
        BlockInverse(torch.eye(2).unsqueeze(0), 4, torch.tensor([0, 3]))
