"""An example prunekit plugin: the LAMP score."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from prunekit.api import Pruner, Target


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """w_u² / Σ_{v ≥ u} w_v², with weights sorted by increasing magnitude within the tensor.

    The largest weight of every tensor scores 1, so a global threshold never empties a layer.
    """
    squares = weight.detach().reshape(-1).double().square()
    order = torch.argsort(squares, stable=True)
    ranked = squares[order]
    tail = ranked.flip(0).cumsum(0).flip(0)  # Σ of this weight and every larger one
    scores = torch.empty_like(squares)
    scores[order] = ranked / tail.clamp_min(torch.finfo(tail.dtype).tiny)
    return scores.reshape(weight.shape).float()


class LampPruner(Pruner):
    """Layer-adaptive magnitude pruning (LAMP): magnitude scaled by each tensor's tail mass."""

    name = "lamp"
    contract = 1  # the prunekit.api contract this class is written for

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return lamp_scores(target.weight)
