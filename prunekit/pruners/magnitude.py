from __future__ import annotations

from collections.abc import Mapping

import torch

from prunekit.contract.pruner import CONTRACT_VERSION, Pruner
from prunekit.contract.target import Target


class MagnitudePruner(Pruner):
    """Keep the weights of largest absolute value, |θ|."""

    name = "magnitude"
    contract = CONTRACT_VERSION

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return target.weight.detach().abs()
