"""layer_obs against least squares solved directly: a channel's score is its consumers' best
reconstruction error without it, and the update is that reconstruction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.calibrate.layer_inputs import layer_rows
from prunekit.contract.statistics import INPUT_GRAM
from prunekit.contract.target import Target
from prunekit.pruners import registry
from prunekit.structured.plan import channel_sets

DAMP = 0.01


def _least_squares(
    weight: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor, read: torch.Tensor | None = None
):
    """The best refit of every row from the ``kept`` columns, solved directly: least squares
    on the rows X with √(nλ)·I appended (the damping λ = DAMP · mean diag XᵀX/n that OBS adds
    to H, over the columns ``read`` before the step); the error of the fit (/ n) and the
    fitted full-width weight (removed columns 0)."""
    n, d = rows.shape
    read = torch.arange(d) if read is None else read
    lam = DAMP * float((rows.T @ rows / n).diagonal()[read].mean())
    design = torch.cat([rows, (n * lam) ** 0.5 * torch.eye(d, dtype=rows.dtype)])
    target = design @ weight.T  # (n + d, out)
    fit = torch.linalg.lstsq(design[:, kept], target).solution  # (kept, out)
    error = ((design[:, kept] @ fit - target).square().sum() / n).item()
    full = torch.zeros_like(weight)
    full[:, kept] = fit.T
    return error, full


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 4, bias=False).double(), torch.randn(40, 6, dtype=torch.float64)
    return nn.Conv2d(3, 4, 3, padding=1, bias=False).double(), torch.randn(
        5, 3, 5, 5, dtype=torch.float64
    )


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_channel_score_and_update_are_the_consumer_least_squares_refit(kind):
    module, x = _layer(kind)
    rows = layer_rows(module, x)  # unfolded patches for the conv: (n, 3·3·3)
    stats = {INPUT_GRAM: rows.T @ rows / len(rows)}
    weight = module.weight
    target = Target("w", module, weight, torch.ones_like(weight, dtype=torch.bool))
    pruner = registry.create("layer_obs")
    channels = weight.shape[1]
    sets = channel_sets(weight.shape, channels, "in", 1)
    scores = pruner.set_scores(target, stats, sets)
    matrix = weight.detach().reshape(weight.shape[0], -1)
    per = matrix.shape[1] // channels
    for c in range(channels):
        kept = torch.tensor([j for j in range(matrix.shape[1]) if j // per != c])
        expected, _ = _least_squares(matrix, rows, kept)
        assert scores[c].item() == pytest.approx(expected, rel=1e-8)
    # remove channel 1 everywhere: the update is the damped least-squares refit
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep[:, 1] = False
    new = pruner.update(target, keep, stats)
    kept = torch.tensor([j for j in range(matrix.shape[1]) if j // per != 1])
    _, refit = _least_squares(matrix, rows, kept)
    torch.testing.assert_close(new.reshape(matrix.shape), refit, rtol=1e-6, atol=1e-8)


def test_rows_with_different_masks_are_each_refit_from_their_own_columns():
    module, x = _layer("linear")
    rows = layer_rows(module, x)
    stats = {INPUT_GRAM: rows.T @ rows / len(rows)}
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = False  # an earlier unstructured step: rows read other columns
    with torch.no_grad():
        module.weight.mul_(mask)
    target = Target("w", module, module.weight, mask)
    keep = mask.clone()
    keep[:, 2] = False  # this step removes column 2 from every row
    new = registry.create("layer_obs").update(target, keep, stats)
    matrix = module.weight.detach()
    for r in range(4):
        kept = keep[r].nonzero().flatten()
        _, refit = _least_squares(matrix[r : r + 1], rows, kept, mask[r].nonzero().flatten())
        torch.testing.assert_close(new[r], refit[0], rtol=1e-6, atol=1e-8)
    assert new[0, 0] == 0 and new[1, 1] == 0  # nothing moved into columns a row had lost


def test_too_many_distinct_row_masks_is_a_usage_error():
    from prunekit.errors import UsageError

    module = nn.Linear(8, 80, bias=False).double()
    rows = torch.randn(50, 8, dtype=torch.float64)
    mask = torch.rand(80, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    target = Target("w", module, module.weight, mask)
    with pytest.raises(UsageError, match=r"different masks.*use sparsegpt"):
        registry.create("layer_obs").score(target, {INPUT_GRAM: rows.T @ rows / 50})


def test_input_grams_over_the_memory_budget_are_refused_before_any_pass():
    from prunekit.calibrate.collector import Collector
    from prunekit.contract.target import StatsSpec
    from prunekit.engine.masks import find_targets
    from prunekit.errors import UsageError

    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 3))
    targets, _ = find_targets(model)
    data = torch.utils.data.TensorDataset(torch.randn(8, 300), torch.zeros(8, dtype=torch.long))
    spec, needs, cpu = StatsSpec(num_samples=8), frozenset({INPUT_GRAM}), torch.device("cpu")
    collector = Collector(model, targets, data, spec, needs, cpu, budget=8 * 300**2)
    with pytest.raises(UsageError, match=r"Gram matrices need .* \(widest: 0.weight, 2.weight\)"):
        next(collector.collect())
    roomy = Collector(model, targets, data, spec, needs, cpu, budget=8 * 400**2)
    ((_, stats),) = roomy.collect()
    assert stats["0.weight"][INPUT_GRAM].shape == (300, 300)
