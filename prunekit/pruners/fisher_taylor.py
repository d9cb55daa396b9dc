"""The criteria of the "pruning at initialisation" work (Fisher–Taylor family), built on the
gradient mean ḡ, the Fisher diagonal F and the Hessian-gradient product Hḡ."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from prunekit.pruners.base import (
    CONTRACT_VERSION,
    SAMPLING_NAMES,
    SAMPLING_PARAMS,
    Param,
    Pruner,
    Target,
)

FBSS_EPS = 1e-12  # lower clamp of F in fbss: zero-gradient weights get a finite score


def _weight(target: Target) -> torch.Tensor:
    return target.weight.detach()


class GradNormPruner(Pruner):
    """Keep the weights with the largest mean gradient, |ḡ|."""

    name = "grad_norm"
    contract = CONTRACT_VERSION
    needs = frozenset({"grad_mean"})
    params = SAMPLING_PARAMS
    stats_params = SAMPLING_NAMES

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return stats["grad_mean"].abs()


class SnipPruner(Pruner):
    """SNIP connection sensitivity, |θ ⊙ ḡ|."""

    name = "snip"
    contract = CONTRACT_VERSION
    needs = frozenset({"grad_mean"})
    params = SAMPLING_PARAMS
    stats_params = SAMPLING_NAMES

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (_weight(target) * stats["grad_mean"]).abs()


class GraspPruner(Pruner):
    """GraSP: keep the largest θ ⊙ Hḡ (removes what most reduces gradient flow)."""

    name = "grasp"
    contract = CONTRACT_VERSION
    needs = frozenset({"hessian_grad"})
    stats_params = (*SAMPLING_NAMES, "temperature")
    params = (
        *SAMPLING_PARAMS,
        Param(
            "temperature",
            200.0,
            "logits are divided by T for Hḡ",
            minimum=0.0,
            exclusive_minimum=True,
        ),
    )

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _weight(target) * stats["hessian_grad"]


class FisherDiagPruner(Pruner):
    """The diagonal of the empirical Fisher, F = mean of g²."""

    name = "fisher_diag"
    contract = CONTRACT_VERSION
    needs = frozenset({"fisher_diag"})
    params = SAMPLING_PARAMS
    stats_params = SAMPLING_NAMES

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return stats["fisher_diag"]


class FisherPruner(Pruner):
    """Optimal Brain Damage with the empirical Fisher, ½ θ² ⊙ F."""

    name = "fisher_pruner"
    contract = CONTRACT_VERSION
    needs = frozenset({"fisher_diag"})
    params = SAMPLING_PARAMS
    stats_params = SAMPLING_NAMES

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * _weight(target).square() * stats["fisher_diag"]


class FTSPruner(Pruner):
    """Fisher–Taylor sensitivity, |θ ⊙ ḡ + ½ θ² ⊙ F|."""

    name = "fts"
    contract = CONTRACT_VERSION
    needs = frozenset({"grad_mean", "fisher_diag"})
    params = SAMPLING_PARAMS
    stats_params = SAMPLING_NAMES

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = _weight(target)
        return (w * stats["grad_mean"] + 0.5 * w.square() * stats["fisher_diag"]).abs()


class FBSSPruner(Pruner):
    """Fisher-based saliency, ½ F ⊙ (θ − ḡ/F)², F clamped below so it stays finite."""

    name = "fbss"
    contract = CONTRACT_VERSION
    needs = frozenset({"grad_mean", "fisher_diag"})
    params = SAMPLING_PARAMS
    stats_params = SAMPLING_NAMES

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        f = stats["fisher_diag"].clamp_min(FBSS_EPS)
        return 0.5 * f * (_weight(target) - stats["grad_mean"] / f).square()
