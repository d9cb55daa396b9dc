"""Optimal Brain Surgeon with a blockwise inverse empirical Fisher (WoodFisher), and OBS."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from prunekit.calibrate.fisher import group_obs_scores, obs_scores, obs_update
from prunekit.contract.pruner import (
    CONTRACT_VERSION,
    SAMPLING_NAMES,
    SAMPLING_PARAMS,
    Param,
    Pruner,
)
from prunekit.contract.statistics import FISHER_INV
from prunekit.contract.target import StatsSpec, Target

GRADIENT_PARAMS = (
    Param(
        "damp",
        StatsSpec.damp,
        "damping added to the Fisher (the most sensitive knob): relative α, λ = α · mean of "
        "the target's Fisher diagonal, or absolute λ (damp_mode)",
        minimum=0.0,
        exclusive_minimum=True,
    ),
    Param(
        "damp_mode",
        StatsSpec.damp_mode,
        "relative: damp scales with each layer's Fisher; absolute: damp is λ itself",
        choices=("relative", "absolute"),
    ),
    *SAMPLING_PARAMS,
    Param(
        "exact",
        True,
        "joint OBS update of the weights pruned together in a block "
        "(false: sum of single-weight updates, as the reference code does)",
    ),
)


class WoodFisherPruner(Pruner):
    """OBS with a blockwise inverse empirical Fisher: score θ²/(2[F⁻¹]qq), compensating update."""

    name = "woodfisher"
    contract = CONTRACT_VERSION
    needs = frozenset({FISHER_INV})
    stats_params: ClassVar[tuple[str, ...]] = (*SAMPLING_NAMES, "block_size", "damp", "damp_mode")
    params: ClassVar[tuple[Param, ...]] = (
        Param("block_size", 128, "weights per Fisher block along each tensor", minimum=1),
        *GRADIENT_PARAMS,
    )

    def score(self, target: Target, stats: Mapping[str, Any]) -> torch.Tensor:
        return obs_scores(target.weight.detach(), stats[FISHER_INV].blocks)

    def set_scores(
        self, target: Target, stats: Mapping[str, Any], sets: torch.Tensor
    ) -> torch.Tensor:
        """Group OBS: ½ θ_Sᵀ (F⁻¹[S, S])⁻¹ θ_S, the loss increase of removing S jointly."""
        weight = target.weight.detach() * target.mask
        return group_obs_scores(weight, stats[FISHER_INV].blocks, sets.to(weight.device))

    def update(
        self, target: Target, keep: torch.Tensor, stats: Mapping[str, Any]
    ) -> torch.Tensor | None:
        prune = target.mask & ~keep  # only the weights removed in this step move the others
        if not prune.any():
            return None
        return obs_update(
            target.weight.detach(), stats[FISHER_INV].blocks, prune, exact=self.hparams["exact"]
        )


class OBSPruner(WoodFisherPruner):
    """OBS with one Fisher block per tensor (the full per-layer inverse), for small layers."""

    name = "obs"
    params = GRADIENT_PARAMS
    stats_params = (*SAMPLING_NAMES, "damp", "damp_mode")

    def stats_spec(self) -> StatsSpec:
        return dataclasses.replace(super().stats_spec(), block_size=None)
