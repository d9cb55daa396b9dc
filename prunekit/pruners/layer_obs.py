"""Layer-wise OBS: Optimal Brain Surgeon on each layer's output error, for whole channels.

For a layer y = W x with input Gram H = XᵀX / n (no gradients, no labels), removing the
columns P of one row w and re-fitting the row's other columns by least squares costs
w_P (H⁻¹[P, P])⁻¹ w_Pᵀ of output error, and the re-fit is w -= w_P (H⁻¹[P, P])⁻¹ H⁻¹[P, :]
(OBS with the layer Hessian, as SparseGPT uses it column by column). With ``--structure
channels`` a channel's cost is the error of the layers that *read* it, its input columns in
every row of each consumer, with those consumers re-fitted from their kept input channels:
what removing the channel does downstream, rather than how large its producing weights are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from prunekit.contract.context import StepContext
from prunekit.contract.pruner import CONTRACT_VERSION, NUM_SAMPLES, Param, Pruner
from prunekit.contract.statistics import INPUT_GRAM
from prunekit.contract.target import Target, multiplies_rows
from prunekit.errors import NumericalError, UsageError


class LayerOBSPruner(Pruner):
    """OBS on each layer's output error (input Gram XᵀX), with updates; for --structure
    channels: a channel costs the error of the layers reading it."""

    name = "layer_obs"
    contract = CONTRACT_VERSION
    needs = frozenset({INPUT_GRAM})
    channel_sides = frozenset({"in"})
    params = (
        Param(
            "damp",
            0.01,
            "damping λ = damp · mean diag H added to each layer's input Gram",
            minimum=0.0,
            exclusive_minimum=True,
        ),
        NUM_SAMPLES,
    )
    stats_params = ("num_samples",)

    def prepare(self, context: StepContext, step: int, steps: int) -> None:
        if context.mask == "global":
            raise UsageError(
                f"{self.name} measures each layer's own output error, which does not compare "
                "across layers: use --mask layer or N:M"
            )
        skipped = [t.name for t in context.targets if not multiplies_rows(t.module)]
        if skipped and context.step == 1:
            self.warnings.append(
                f"{self.name} handles Linear and Conv2d (groups 1): left {', '.join(skipped)}"
            )

    def score(self, target: Target, stats: Mapping[str, Any]) -> torch.Tensor | None:
        """w² / [H⁻¹]_jj per weight (larger = keep)."""
        if INPUT_GRAM not in stats:
            return None
        matrix, inverse = self._matrix_and_inverse(target, stats)
        return (matrix.square() / inverse.diagonal()).reshape(target.weight.shape)

    def set_scores(
        self, target: Target, stats: Mapping[str, Any], sets: torch.Tensor
    ) -> torch.Tensor | None:
        """Σ_rows w_P (H⁻¹[P, P])⁻¹ w_Pᵀ per set: the output error of removing the set's
        columns P from every row and re-fitting the rows from the other columns."""
        if INPUT_GRAM not in stats:
            return None
        matrix, inverse = self._matrix_and_inverse(target, stats)
        rows, width = matrix.shape
        if sets.shape[1] % rows:  # not whole columns: the per-weight OBS costs, summed
            return self.score(target, stats).reshape(-1)[sets].sum(1)  # type: ignore[union-attr]
        columns = (sets % width).reshape(len(sets), rows, -1)
        if not bool((columns == columns[:, :1]).all()):
            return self.score(target, stats).reshape(-1)[sets].sum(1)  # type: ignore[union-attr]
        columns = columns[:, 0]  # (n, p): the same columns in every row
        block = inverse[columns[:, :, None], columns[:, None, :]]  # (n, p, p)
        taken = matrix[:, columns].permute(1, 0, 2)  # (n, rows, p)
        solved = torch.linalg.solve(block, taken.transpose(1, 2))  # (n, p, rows)
        return (taken.transpose(1, 2) * solved).sum((1, 2))

    def update(
        self, target: Target, keep: torch.Tensor, stats: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """Each row re-fitted from its kept columns for the columns it loses in this step."""
        if INPUT_GRAM not in stats:
            return None
        matrix, inverse = self._matrix_and_inverse(target, stats)
        lost = (target.mask & ~keep).reshape(matrix.shape)
        kept_rows = keep.reshape(matrix.shape).any(1) & lost.any(1)
        if not kept_rows.any():
            return None
        new = matrix.clone()
        patterns, owner = torch.unique(lost[kept_rows], dim=0, return_inverse=True)
        rows = kept_rows.nonzero().flatten()
        for index, pattern in enumerate(patterns):  # one solve per set of lost columns
            chosen = rows[owner == index]
            columns = pattern.nonzero().flatten()
            block = inverse[columns[:, None], columns[None, :]]
            taken = matrix[chosen][:, columns]
            change = torch.linalg.solve(block, taken.T).T @ inverse[columns]
            new[chosen] -= change
        if not torch.isfinite(new).all():
            raise NumericalError(
                f"{self.name}: the re-fitted weights of {target.name} hold NaN or Inf; "
                "raise --param damp"
            )
        return new.to(target.weight.dtype).reshape(target.weight.shape)

    def _matrix_and_inverse(
        self, target: Target, stats: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked (rows, d) weight matrix in float64, and (H + λI)⁻¹ over the columns
        still read by some row (a removed column: identity, its weights are zero)."""
        gram = stats[INPUT_GRAM].to(target.weight.device, torch.float64)
        matrix = (target.weight.detach() * target.mask).reshape(target.weight.shape[0], -1)
        matrix = matrix.double()
        alive = target.mask.reshape(matrix.shape).any(0)
        inner = gram[alive][:, alive]
        damping = self.hparams["damp"] * float(inner.diagonal().mean().clamp_min(1e-12))
        inner = inner + damping * torch.eye(len(inner), dtype=inner.dtype, device=inner.device)
        inverse = torch.eye(matrix.shape[1], dtype=torch.float64, device=matrix.device)
        index = alive.nonzero().flatten()
        factor = torch.linalg.cholesky(inner)
        inverse[index[:, None], index[None, :]] = torch.cholesky_inverse(factor)
        return matrix, inverse
