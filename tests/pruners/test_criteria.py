"""The Fisher–Taylor criteria against numbers worked out by hand, and GraSP's Hḡ vs autograd."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.calibrate.collector import Collector
from prunekit.contract.target import StatsSpec, Target
from prunekit.engine.masks import find_targets
from prunekit.pruners import registry

CPU = torch.device("cpu")
X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
Y = torch.tensor([0, 1])


def zero_linear() -> nn.Module:
    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    return model


def test_gradient_mean_and_fisher_by_hand():
    # W = 0 -> softmax = (½, ½); g_i = (p - onehot(y_i)) x_iᵀ
    # g1 = [[-.5, -1], [.5, 1]], g2 = [[1.5, -.5], [-1.5, .5]]
    model = zero_linear()
    targets, _ = find_targets(model)
    collector = Collector(
        model,
        targets,
        TensorDataset(X, Y),
        StatsSpec(num_grads=2),
        frozenset({"grad_mean", "fisher_diag"}),
        CPU,
    )
    stats = next(collector.collect())[1]["weight"]
    torch.testing.assert_close(stats["grad_mean"], torch.tensor([[0.5, -0.75], [-0.5, 0.75]]))
    torch.testing.assert_close(stats["fisher_diag"], torch.tensor([[1.25, 0.625], [1.25, 0.625]]))


THETA = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
STATS = {
    "grad_mean": torch.tensor([[0.5, -0.75], [-0.5, 0.75]]),
    "fisher_diag": torch.tensor([[1.25, 0.625], [1.25, 0.625]]),
}
EXPECTED = {
    "grad_norm": [[0.5, 0.75], [0.5, 0.75]],  # |ḡ|
    "snip": [[0.5, 1.5], [0.25, 0.0]],  # |θ ḡ|
    "fisher_diag": [[1.25, 0.625], [1.25, 0.625]],  # F
    "fisher_pruner": [[0.625, 1.25], [0.15625, 0.0]],  # ½ θ² F
    "fts": [[1.125, 2.75], [0.09375, 0.0]],  # |θ ḡ + ½ θ² F|
    "fbss": [[0.225, 0.2], [0.50625, 0.45]],  # ½ F (θ − ḡ/F)²
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scores_by_hand(name):
    target = Target(
        "w", nn.Identity(), nn.Parameter(THETA.clone()), torch.ones(2, 2, dtype=torch.bool)
    )
    score = registry.create(name).score(target, STATS)
    torch.testing.assert_close(score, torch.tensor(EXPECTED[name]))


def test_fbss_is_finite_where_the_gradient_is_zero():
    target = Target(
        "w", nn.Identity(), nn.Parameter(THETA.clone()), torch.ones(2, 2, dtype=torch.bool)
    )
    zeros = {"grad_mean": torch.zeros(2, 2), "fisher_diag": torch.zeros(2, 2)}
    score = registry.create("fbss").score(target, zeros)
    assert torch.isfinite(score).all()
    assert score[0, 1] > score[0, 0] > score[1, 1] == 0.0  # still ordered by |θ|


def test_hessian_gradient_product_equals_autograd_hvp():
    torch.manual_seed(0)
    model = nn.Linear(2, 3, bias=False)
    x, y = torch.randn(8, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    temperature = 2.0
    targets, _ = find_targets(model)
    collector = Collector(
        model,
        targets,
        TensorDataset(x, y),
        StatsSpec(num_grads=8, temperature=temperature),
        frozenset({"hessian_grad"}),
        CPU,
    )
    collector.plan.chunk = 3  # several chunks: accumulation must match one full batch
    hg = next(collector.collect())[1]["weight"]["hessian_grad"]

    def loss(w):
        return nn.functional.cross_entropy(x @ w.T / temperature, y)

    w = model.weight.detach()
    g = torch.autograd.grad(loss(w.requires_grad_()), w)[0]
    _, expected = torch.autograd.functional.hvp(loss, w.detach(), g)
    torch.testing.assert_close(hg, expected)
    target = targets[0]
    torch.testing.assert_close(
        registry.create("grasp").score(target, {"hessian_grad": hg}), w * expected
    )
