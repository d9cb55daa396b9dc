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
from typing import Any, cast

import torch

from prunekit.contract.context import StepContext
from prunekit.contract.pruner import CONTRACT_VERSION, NUM_SAMPLES, Param, Pruner
from prunekit.contract.statistics import INPUT_GRAM
from prunekit.contract.target import Target, multiplies_rows
from prunekit.errors import NumericalError, UsageError

MAX_ROW_MASKS = 64  # distinct row masks one layer may have: one inverse of H each


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
        """w² / [H⁻¹]_jj per weight (larger = keep), H⁻¹ over the columns each row keeps."""
        if INPUT_GRAM not in stats:
            return None
        matrix = self._matrix(target)
        score = torch.zeros_like(matrix)
        for rows, alive in self._row_sets(target):
            inverse = self._inverse(target, stats, alive)
            score[rows] = matrix[rows].square() / inverse.diagonal()
        return score.reshape(target.weight.shape)

    def set_scores(
        self, target: Target, stats: Mapping[str, Any], sets: torch.Tensor
    ) -> torch.Tensor | None:
        """Σ_rows w_P (H⁻¹[P, P])⁻¹ w_Pᵀ per set: the output error of removing the set's
        columns P from every row and re-fitting the rows from the other columns."""
        if INPUT_GRAM not in stats:
            return None
        matrix = self._matrix(target)
        rows, width = matrix.shape
        columns = (sets % width).reshape(len(sets), rows, -1) if sets.shape[1] % rows == 0 else None
        if columns is None or not bool((columns == columns[:, :1]).all()):
            per_weight = cast(torch.Tensor, self.score(target, stats))  # not whole columns
            return per_weight.reshape(-1)[sets].sum(1)
        columns = columns[:, 0]  # (n, p): the same columns in every row
        total = torch.zeros(len(sets), dtype=torch.float64, device=matrix.device)
        for chosen, alive in self._row_sets(target):
            inverse = self._inverse(target, stats, alive)
            block = inverse[columns[:, :, None], columns[:, None, :]]  # (n, p, p)
            taken = matrix[chosen][:, columns].permute(1, 0, 2)  # (n, rows, p)
            solved = torch.linalg.solve(block, taken.transpose(1, 2))  # (n, p, rows)
            total += (taken.transpose(1, 2) * solved).sum((1, 2))
        return total

    def update(
        self, target: Target, keep: torch.Tensor, stats: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """Each row re-fitted from its kept columns for the columns it loses in this step."""
        if INPUT_GRAM not in stats:
            return None
        matrix = self._matrix(target)
        lost = (target.mask & ~keep).reshape(matrix.shape)
        new = matrix.clone()
        changed = False
        for chosen, alive in self._row_sets(target, keep):
            rows = chosen[lost[chosen].any(1)]
            if not len(rows):
                continue
            inverse = self._inverse(target, stats, alive)
            patterns, owner = torch.unique(lost[rows], dim=0, return_inverse=True)
            for index, pattern in enumerate(patterns):  # one solve per set of lost columns
                same = rows[owner == index]
                columns = pattern.nonzero().flatten()
                block = inverse[columns[:, None], columns[None, :]]
                taken = matrix[same][:, columns]
                new[same] -= torch.linalg.solve(block, taken.T).T @ inverse[columns]
                changed = True
        if not changed:
            return None
        return new.to(target.weight.dtype).reshape(target.weight.shape)

    def _matrix(self, target: Target) -> torch.Tensor:
        """The masked (rows, d) weight matrix in float64."""
        matrix = (target.weight.detach() * target.mask).reshape(target.weight.shape[0], -1)
        return matrix.double()

    def _row_sets(
        self, target: Target, keep: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The rows that keep some weight (after ``keep``, if given), grouped by the columns
        they read now: (rows, their columns). One set after channel pruning or in a first
        step; an unstructured mask from an earlier step gives one per distinct row mask."""
        mask = target.mask.reshape(target.weight.shape[0], -1)
        live = mask.any(1) if keep is None else keep.reshape(mask.shape).any(1)
        rows = live.nonzero().flatten()
        if not len(rows):
            return []
        patterns, owner = torch.unique(mask[rows], dim=0, return_inverse=True)
        if len(patterns) > MAX_ROW_MASKS:
            raise UsageError(
                f"{self.name} re-fits the rows of {target.name} that read the same columns, and "
                f"its {len(rows)} rows have {len(patterns)} different masks (unstructured, from "
                "an earlier step): prune it in one step (--recompute 1, no gradual schedule), "
                "with --structure channels, or use sparsegpt"
            )
        return [(rows[owner == i], pattern) for i, pattern in enumerate(patterns)]

    def _inverse(self, target: Target, stats: Mapping[str, Any], alive: torch.Tensor):
        """(H + λI)⁻¹ over the columns ``alive`` (a removed column: identity, its weights
        are zero)."""
        gram = stats[INPUT_GRAM].to(target.weight.device, torch.float64)
        inner = gram[alive][:, alive]
        size = gram.shape[0]
        inverse = torch.eye(size, dtype=torch.float64, device=gram.device)
        if not len(inner):
            return inverse
        damping = self.hparams["damp"] * float(inner.diagonal().mean().clamp_min(1e-12))
        inner = inner + damping * torch.eye(len(inner), dtype=inner.dtype, device=inner.device)
        factor, info = torch.linalg.cholesky_ex(inner)
        if int(info) != 0 or not torch.isfinite(factor).all():
            raise NumericalError(
                f"{self.name}: the input Gram matrix of {target.name} is not positive definite "
                "(NaN or Inf in the layer's inputs?); raise --param damp"
            )
        index = alive.nonzero().flatten()
        inverse[index[:, None], index[None, :]] = torch.cholesky_inverse(factor)
        return inverse
