"""SparseGPT and Wanda: layer-wise pruning from the inputs each layer sees (no gradients).

Both prune every layer to the step's sparsity (``--mask layer``) or to N:M; a global
threshold has no meaning for them. SparseGPT visits the layers in forward order and
measures each one's inputs through the layers already pruned (sequential propagation), so it
also updates the weights; Wanda measures all inputs once, on the dense model, and does not.
Linear and Conv2d (groups 1) are handled; other prunable layers are left as they are, with
a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunekit.errors import UsageError
from prunekit.layerwise import (
    input_gram,
    input_square_norms,
    layer_rows,
    ordered_targets,
    sparsegpt,
)
from prunekit.masks import parse_nm
from prunekit.pruners.base import CONTRACT_VERSION, Param, Pruner, Target

SAMPLES = Param("num_samples", 128, "calibration samples whose layer inputs are used", minimum=1)


def _supported(t: Target) -> bool:
    m = t.module
    return isinstance(m, nn.Linear) or (
        isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str)
    )


class _LayerWise(Pruner):
    def _check(self, context: Any) -> tuple[list[Target], tuple[int, int] | None]:
        if context.mask == "global":
            raise UsageError(
                f"{self.name} prunes every layer to the sparsity: use --mask layer or N:M"
            )
        kept = [t for t in context.targets if _supported(t)]
        skipped = [t.name for t in context.targets if not _supported(t)]
        if skipped and context.step == 1:
            self.warnings.append(
                f"{self.name} handles Linear and Conv2d (groups 1): left {', '.join(skipped)}"
            )
        return kept, parse_nm(context.mask)


class SparseGPTPruner(_LayerWise):
    """SparseGPT: layer-wise OBS on the input Hessian XXᵀ, column by column, with updates."""

    name = "sparsegpt"
    contract = CONTRACT_VERSION
    structured = False  # its masks come from its own column-by-column OBS
    params = (
        Param(
            "damp",
            0.01,
            "λ added to diag H, as a fraction of its mean",
            minimum=0.0,
            exclusive_minimum=True,
        ),
        Param("block_size", 128, "columns per lazy-update block", minimum=1),
        SAMPLES,
    )

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.keep: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def prepare(self, context: Any, step: int, steps: int) -> None:
        targets, nm = self._check(context)
        by_name = {t.name: t for t in targets}
        self.keep = {}
        for name in ordered_targets(context.model, list(by_name)):
            t = by_name[name]
            context.say(f"sparsegpt: {name}")
            gram = input_gram(
                context.model, t.module, context.calibration, self.hparams["num_samples"],
                context.device,
            )  # fmt: skip
            matrix = t.weight.detach().reshape(t.weight.shape[0], -1)
            new, keep = sparsegpt(
                matrix, gram, context.sparsity, nm, self.hparams["block_size"],
                self.hparams["damp"], pruned=~t.mask.reshape(matrix.shape),
            )  # fmt: skip
            t.weight.copy_(new.reshape(t.weight.shape))
            self.keep[name] = keep.reshape(t.weight.shape)

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        keep = self.keep.get(target.name)
        return None if keep is None else keep.to(target.weight.device, torch.float32)


class WandaPruner(_LayerWise):
    """Wanda: |W_ij| · ‖X_j‖, weight magnitude times the norm of the input it multiplies."""

    name = "wanda"
    contract = CONTRACT_VERSION
    params = (SAMPLES,)

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.norms: dict[str, torch.Tensor] = {}

    def prepare(self, context: Any, step: int, steps: int) -> None:
        targets, _ = self._check(context)
        squares = input_square_norms(
            context.model, {t.name: t.module for t in targets}, context.calibration,
            self.hparams["num_samples"], context.device,
        )  # fmt: skip
        self.norms = {name: s.sqrt().float() for name, s in squares.items()}

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        norms = self.norms.get(target.name)
        if norms is None:
            return None
        w = target.weight.detach()
        scores = w.reshape(w.shape[0], -1).abs() * norms.to(w.device).unsqueeze(0)
        return scores.reshape(w.shape)


__all__ = ["SparseGPTPruner", "WandaPruner", "layer_rows"]
