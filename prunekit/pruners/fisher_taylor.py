"""The criteria of the "pruning at initialisation" work (Fisher–Taylor family), built on the
gradient mean ḡ, the Fisher diagonal F and the Hessian-gradient product Hḡ."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from prunekit.contract.pruner import (
    CONTRACT_VERSION,
    SAMPLING_NAMES,
    SAMPLING_PARAMS,
    Param,
    Pruner,
)
from prunekit.contract.statistics import FISHER_DIAG, GRAD_MEAN, HESSIAN_GRAD
from prunekit.contract.target import Target

FBSS_EPS = 1e-12  # lower clamp of F in fbss: zero-gradient weights get a finite score


class Saliency(Pruner):
    """A score from the weight and its gradient statistics (no update); subclasses set
    ``name``, ``needs`` and ``saliency``."""

    contract = CONTRACT_VERSION
    params: ClassVar[tuple[Param, ...]] = SAMPLING_PARAMS
    stats_params: ClassVar[tuple[str, ...]] = SAMPLING_NAMES

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.saliency(target.weight.detach(), stats)

    def saliency(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class GradNormPruner(Saliency):
    """Keep the weights with the largest mean gradient, |ḡ|."""

    name = "grad_norm"
    needs = frozenset({GRAD_MEAN})

    def saliency(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return stats[GRAD_MEAN].abs()


class SnipPruner(Saliency):
    """SNIP connection sensitivity, |θ ⊙ ḡ|."""

    name = "snip"
    needs = frozenset({GRAD_MEAN})

    def saliency(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (w * stats[GRAD_MEAN]).abs()


class GraspPruner(Saliency):
    """GraSP: keep the largest θ ⊙ Hḡ (removes what most reduces gradient flow)."""

    name = "grasp"
    needs = frozenset({HESSIAN_GRAD})
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

    def saliency(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return w * stats[HESSIAN_GRAD]


class FisherDiagPruner(Saliency):
    """The diagonal of the empirical Fisher, F = mean of g²."""

    name = "fisher_diag"
    needs = frozenset({FISHER_DIAG})

    def saliency(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return stats[FISHER_DIAG]


class FisherPruner(Saliency):
    """Optimal Brain Damage with the empirical Fisher, ½ θ² ⊙ F."""

    name = "fisher_pruner"
    needs = frozenset({FISHER_DIAG})

    def saliency(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * w.square() * stats[FISHER_DIAG]


class FTSPruner(Saliency):
    """Fisher–Taylor sensitivity, |θ ⊙ ḡ + ½ θ² ⊙ F|."""

    name = "fts"
    needs = frozenset({GRAD_MEAN, FISHER_DIAG})

    def saliency(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (w * stats[GRAD_MEAN] + 0.5 * w.square() * stats[FISHER_DIAG]).abs()


class FBSSPruner(Saliency):
    """Fisher-based saliency, ½ F ⊙ (θ − ḡ/F)², F clamped below so it stays finite."""

    name = "fbss"
    needs = frozenset({GRAD_MEAN, FISHER_DIAG})

    def saliency(self, w: torch.Tensor, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        f = stats[FISHER_DIAG].clamp_min(FBSS_EPS)
        return 0.5 * f * (w - stats[GRAD_MEAN] / f).square()
