"""SparseGPT and Wanda: layer-wise pruning from the inputs each layer sees (no gradients).

Both prune every layer to the step's sparsity (``--mask layer``) or to N:M; a global
threshold has no meaning for them. SparseGPT (Frantar & Alistarh, 2023) is a ``LayerPruner``:
prunekit visits the layers in forward order, measures each one's input Gram matrix H through
the layers already pruned, and ``compress`` removes the weights column by column, each time
moving the row's remaining weights to the right by the OBS update under H restricted to the
columns not yet processed (the inverse Cholesky factor of H gives every one of those
restricted inverses at once; updates are applied lazily in blocks of columns). Wanda (Sun et
al., 2023) is a score, |W_ij| · ‖X_j‖, from the inputs measured once on the model before the
step, with no update. Linear and Conv2d (groups 1) are handled; other prunable layers are
left as they are, with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from prunekit.contract.context import StepContext
from prunekit.contract.pruner import (
    CONTRACT_VERSION,
    NUM_SAMPLES,
    Compressed,
    LayerPruner,
    LayerRequest,
    Param,
    Pruner,
)
from prunekit.contract.quantization import QuantGrid
from prunekit.contract.statistics import INPUT_SQUARES
from prunekit.contract.target import Target, multiplies_rows
from prunekit.errors import NumericalError, UsageError


def _refuse_global(name: str, context: StepContext) -> None:
    if context.mask == "global":
        raise UsageError(f"{name} prunes every layer to the sparsity: use --mask layer or N:M")


class SparseGPTPruner(LayerPruner):
    """SparseGPT: layer-wise OBS on the input Hessian XXᵀ, column by column, with updates."""

    name = "sparsegpt"
    contract = CONTRACT_VERSION
    params = (
        Param(
            "damp",
            0.01,
            "λ added to diag H, as a fraction of its mean",
            minimum=0.0,
            exclusive_minimum=True,
        ),
        Param("block_size", 128, "columns per lazy-update block", minimum=1),
        NUM_SAMPLES,
    )
    stats_params = ("num_samples",)

    def prepare(self, context: StepContext, step: int, steps: int) -> None:
        _refuse_global(self.name, context)

    def compress(self, target: Target, gram: torch.Tensor, request: LayerRequest) -> Compressed:
        matrix = target.weight.detach().reshape(target.weight.shape[0], -1)
        pruned = ~target.mask.reshape(matrix.shape)
        columns = request.columns
        if columns is not None:  # N:M groups along another order of the columns
            columns = columns.to(matrix.device)
            matrix, pruned = matrix[:, columns], pruned[:, columns]
            gram = gram[columns.to(gram.device)][:, columns.to(gram.device)]
        new, keep, scales = obs_columns(
            matrix, gram, request.sparsity, request.pattern, self.hparams["block_size"],
            self.hparams["damp"], pruned=pruned, grid=request.grid,
        )  # fmt: skip
        if columns is not None:
            back = torch.argsort(columns)
            new, keep = new[:, back], keep[:, back]
        shape = target.weight.shape
        return Compressed(keep.reshape(shape), new.reshape(shape), scales)


class WandaPruner(Pruner):
    """Wanda: |W_ij| · ‖X_j‖, weight magnitude times the norm of the input it multiplies."""

    name = "wanda"
    contract = CONTRACT_VERSION
    needs = frozenset({INPUT_SQUARES})
    params = (NUM_SAMPLES,)
    stats_params = ("num_samples",)

    def prepare(self, context: StepContext, step: int, steps: int) -> None:
        _refuse_global(self.name, context)
        skipped = [t.name for t in context.targets if not multiplies_rows(t.module)]
        if skipped and context.step == 1:
            self.warnings.append(
                f"{self.name} handles Linear and Conv2d (groups 1): left {', '.join(skipped)}"
            )

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        squares = stats.get(INPUT_SQUARES)
        if squares is None:  # a layer it does not handle
            return None
        w = target.weight.detach()
        norms = squares.sqrt().float().to(w.device)
        return (w.reshape(w.shape[0], -1).abs() * norms.unsqueeze(0)).reshape(w.shape)


def _lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest entries (stable: ties go to the earlier position)."""
    drop = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count > 0:
        drop[torch.argsort(values.reshape(-1), stable=True)[:count]] = True
    return drop.reshape(values.shape)


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    pruned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the (out, d) ``weight`` by SparseGPT under H = ``gram``; return the new weight
    (pruned entries exactly zero) and the keep-mask.

    Unstructured: within every block of ``block_size`` columns the fraction ``sparsity`` of
    weights with the lowest w² / [H⁻¹]_jj² (adaptive mask selection) is removed; N:M: in every
    group of M consecutive columns the M − N lowest of each row. ``damp`` is λ as a fraction
    of mean(diag H). ``pruned`` (bool, like the weight) are removed whatever their
    saliency (an earlier step's mask). The blocks' counts add up to round(sparsity · numel).
    Computed in float64.
    """
    new, keep, _ = obs_columns(weight, gram, sparsity, nm, block_size, damp, pruned)
    return new, keep


def gptq(
    weight: torch.Tensor,
    gram: torch.Tensor,
    grid: QuantGrid,
    block_size: int = 128,
    damp: float = 0.01,
    pruned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the (out, d) ``weight`` to ``grid`` column by column (GPTQ), each rounding error
    moved onto the columns not yet rounded by the OBS update under H = ``gram``; ``pruned``
    entries stay exactly zero. Returns the rounded weight (on the grid) and its scales
    (rows, groups)."""
    new, _, scales = obs_columns(weight, gram, 0.0, None, block_size, damp, pruned, grid)
    assert scales is not None
    return new, scales


def obs_columns(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    pruned: torch.Tensor | None = None,
    grid: QuantGrid | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The column-by-column OBS solver behind SparseGPT and GPTQ: every column is pruned (by
    the mask chosen as in ``sparsegpt``) and, with a ``grid``, the kept entries are rounded to
    it; the difference is compensated on the columns to the right under H restricted to
    them. Returns the weight, the keep-mask and, with a grid, the scales (rows, groups):
    per row from the whole row before any update, or per group of ``grid.group_size``
    columns from the group's weights when its first column is reached."""
    w = weight.detach().double().clone()
    rows, d = w.shape
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise NumericalError(
            f"the layer Hessian is not positive definite ({exc}); raise damp"
        ) from exc
    group, scales, scale = d, None, None
    if grid is not None:
        group = grid.group_of(d)
        if grid.group_size is not None:  # blocks hold whole groups
            block_size = max(group, block_size // group * group)
        scales = torch.empty(rows, -(-d // group), dtype=torch.float32, device=w.device)
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, d, block_size):
        end = min(start + block_size, d)
        w1 = w[:, start:end].clone()
        err = torch.zeros_like(w1)
        u1 = upper[start:end, start:end]
        fixed = (
            pruned[:, start:end] if pruned is not None else torch.zeros_like(w1, dtype=torch.bool)
        )
        if nm is None:
            saliency = (w1.square() / u1.diagonal().square()).masked_fill(fixed, -1.0)
            count = round(sparsity * rows * end) - round(sparsity * rows * start)
            block_drop = _lowest(saliency, max(count, int(fixed.sum())))
        else:
            block_drop = fixed.clone()
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                cols = slice(i, min(i + nm[1], end - start))
                saliency = w1[:, cols].square() / u1.diagonal()[cols].square()
                saliency = saliency.masked_fill(fixed[:, cols], -1.0)
                order = torch.argsort(saliency, dim=1, stable=True)[:, : nm[1] - nm[0]]
                block_drop[:, cols].scatter_(1, order, True)
            q = w1[:, i].clone()
            q[block_drop[:, i]] = 0.0
            if grid is not None and scales is not None:
                column = start + i
                if column % group == 0:  # a new scale: the whole row, or this group
                    source = w if grid.group_size is None else w1[:, i : i + group]
                    kept = keep if grid.group_size is None else ~block_drop[:, i : i + group]
                    scale = grid.scales(source.masked_fill(~kept, 0.0))
                    scales[:, column // group] = scale
                assert scale is not None
                q = grid.round(q.unsqueeze(1), scale).squeeze(1)
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, start:end] = w1
        w[:, end:] -= err @ upper[start:end, end:]
        keep[:, start:end] = ~block_drop
    w[~keep] = 0.0
    return w.to(weight.dtype).reshape(weight.shape), keep, scales


__all__ = ["SparseGPTPruner", "WandaPruner", "gptq", "obs_columns", "sparsegpt"]
