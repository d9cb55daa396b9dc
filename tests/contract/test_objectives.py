"""Label-free objectives: the Fisher estimated from targets drawn around the model's outputs
equals the Hessian of the objective (distance to the dense outputs) at the dense weights,
checked against autograd; bad combinations are one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import TensorDataset

from prunekit.calibrate.collector import Collector
from prunekit.contract.objectives import COSINE, KL, LABELS, MSE, OBJECTIVES, resolve_objective
from prunekit.contract.pruner import StatsSpec
from prunekit.engine.masks import find_targets
from prunekit.errors import UsageError

CPU = torch.device("cpu")


def _distance(name: str, out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The objectives written out directly, per sample: what their Hessians are taken of."""
    if name == "kl":
        p = torch.softmax(dense, 1)
        return (p * (torch.log_softmax(dense, 1) - torch.log_softmax(out, 1))).sum(1)
    if name == "mse":
        return 0.5 * (out - dense).square().sum(1)
    return 1 - nn.functional.cosine_similarity(out, dense, dim=1)


@pytest.mark.parametrize("objective", [KL, MSE, COSINE], ids=lambda o: o.name)
def test_drawn_targets_give_the_hessian_of_the_objective_at_the_dense_weights(objective):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    n = 6000
    x = torch.randn(n, 4, dtype=torch.float64)
    targets, _ = find_targets(model, ())
    spec = StatsSpec(num_grads=n)
    data = TensorDataset(x, torch.full((n,), -1))
    collector = Collector(
        model, targets, data, spec, frozenset({"fisher_diag"}), CPU, seed=1, objective=objective
    )
    (_, stats), = list(collector.collect())  # fmt: skip
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        dense = model(x)
    for t in targets:

        def loss(w: torch.Tensor, name: str = t.name) -> torch.Tensor:
            out = functional_call(model, {**params, name: w}, (x,))
            return _distance(objective.name, out, dense).mean()

        h = hessian(loss)(params[t.name]).reshape(t.numel, t.numel)
        estimate = stats[t.name]["fisher_diag"].double().flatten()
        torch.testing.assert_close(estimate, h.diagonal(), rtol=0.12, atol=1e-6)
        assert float(estimate.sum() / h.diagonal().sum()) == pytest.approx(1.0, abs=0.04)


def test_labels_with_true_fisher_is_kl_and_the_defaults():
    assert LABELS.for_fisher("true") is KL and LABELS.for_fisher("empirical") is LABELS
    assert MSE.for_fisher("empirical") is MSE  # drawn targets whatever fisher says
    assert resolve_objective(None, True, False, "d") is LABELS
    assert resolve_objective(None, False, False, "d") is KL
    assert resolve_objective(None, True, True, "d") is COSINE  # embeddings: no classes
    assert set(OBJECTIVES) == {"labels", "kl", "mse", "cosine"}
    for name, labeled, embeddings, message in (
        ("kl", False, True, "needs class logits but the model returns embeddings"),
        ("labels", False, False, "--objective labels needs labels but d has none"),
        ("hinge", True, False, "--objective hinge: choose from labels, kl, mse, cosine"),
    ):
        with pytest.raises(UsageError, match=message):
            resolve_objective(name, labeled, embeddings, "d")


def test_woodfisher_without_labels_prunes_as_well_as_with_them(tmp_path):
    from tests.cli_helpers import prune_report

    def pruned(pruner: str, *extra: str) -> float:
        out = tmp_path / "-".join((pruner, *extra))
        report = prune_report(
            "sample:digits-mlp", "-p", pruner, "-s", "0.9", "--out", str(out), *extra
        )
        return report["accuracy"]["pruned"]

    labels = pruned("woodfisher", "--objective", "labels")
    kl = pruned("woodfisher", "--objective", "kl")  # the labels are there, but not used
    assert kl > pruned("magnitude") + 0.05 and kl > labels - 0.02
