"""Optimal Brain Surgeon with a blockwise inverse empirical Fisher (WoodFisher), and OBS."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from prunekit.calibrate.fisher import group_obs_scores, obs_scores, obs_update
from prunekit.contract.curvature import BlockInverse
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
    covered_curvature = True
    stats_params: ClassVar[tuple[str, ...]] = (*SAMPLING_NAMES, "block_size", "damp", "damp_mode")
    params: ClassVar[tuple[Param, ...]] = (
        Param(
            "block_size",
            128,
            "weights per Fisher block along each tensor (its unpruned weights, once some are "
            "pruned)",
            minimum=1,
        ),
        *GRADIENT_PARAMS,
    )

    def score(self, target: Target, stats: Mapping[str, Any]) -> torch.Tensor:
        weight = target.weight.detach()
        return obs_scores(weight, stats[FISHER_INV].diag().reshape(weight.shape))

    def set_scores(
        self, target: Target, stats: Mapping[str, Any], sets: torch.Tensor
    ) -> torch.Tensor:
        """Group OBS: ½ θ_Sᵀ (F⁻¹[S, S])⁻¹ θ_S, the loss increase of removing S jointly."""
        inverse: BlockInverse = stats[FISHER_INV]
        weight = (target.weight.detach() * target.mask).reshape(-1)
        sets = sets.to(weight.device)
        if inverse.index is not None:  # positions among the covered coordinates, -1: none
            where = torch.full_like(weight, -1, dtype=torch.long)
            where[inverse.index.to(weight.device)] = torch.arange(
                inverse.covered, device=weight.device
            )
            sets = torch.where(sets >= 0, where[sets.clamp(min=0)], -1)
            weight = inverse.gather(weight)
        return group_obs_scores(weight, inverse.blocks, sets)

    def update(
        self, target: Target, keep: torch.Tensor, stats: Mapping[str, Any]
    ) -> torch.Tensor | None:
        prune = target.mask & ~keep  # only the weights removed in this step move the others
        if not prune.any():
            return None
        inverse: BlockInverse = stats[FISHER_INV]
        weight, exact = target.weight.detach(), self.hparams["exact"]
        # on the covered weights; the others are pruned already and F does not couple them
        moved = obs_update(inverse.gather(weight), inverse.blocks, inverse.gather(prune), exact)
        rest = weight.reshape(-1).masked_fill(prune.reshape(-1), 0.0)
        return inverse.scatter(moved, rest).reshape(weight.shape)


class OBSPruner(WoodFisherPruner):
    """OBS with one Fisher block per tensor (the full per-layer inverse), for small layers."""

    name = "obs"
    params = GRADIENT_PARAMS
    stats_params = (*SAMPLING_NAMES, "damp", "damp_mode")

    def stats_spec(self) -> StatsSpec:
        return dataclasses.replace(super().stats_spec(), block_size=None)
