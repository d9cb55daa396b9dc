from __future__ import annotations

from collections.abc import Mapping

import torch

from prunekit.contract.pruner import CONTRACT_VERSION, Pruner
from prunekit.contract.target import Target


class RandomPruner(Pruner):
    """Uniformly random scores, seeded by --seed (the usual sanity baseline)."""

    name = "random"
    contract = CONTRACT_VERSION

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        weight = target.weight
        return torch.rand(weight.shape, device=weight.device)
