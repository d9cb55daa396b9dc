"""The statistics a pruner may declare in ``needs`` (plugin contract v1), one constant each.

Every statistic is per target tensor; ``score(target, stats)`` gets ``stats[NAME]``.
"""

from __future__ import annotations

from typing import Final

GRAD_MEAN: Final = "grad_mean"
"""ḡ: the mean loss gradient over the calibration samples, shaped like the weight. Needs true
labels (with labels sampled from the model it averages to zero)."""

FISHER_DIAG: Final = "fisher_diag"
"""diag F = E[g ⊙ g]: the mean squared per-sample (or per-mini-batch) gradient, shaped like
the weight; empirical (true labels) or true Fisher (labels sampled), by StatsSpec.fisher."""

FISHER_INV: Final = "fisher_inv"
"""(F + λI)⁻¹, block-diagonal along the flattened weight, as a ``prunekit.api.BlockInverse``
(``diag()``, ``matvec(v)``, ``solve(v)``); λ by StatsSpec.damp / damp_mode. Its blocks are
positional, unless the pruner sets ``covered_curvature``: then, once weights are pruned, they
cover the unpruned weights only (``index``), and H = 1/λ on the others."""

GRAD_ROWS: Final = "grad_rows"
"""The (m, d) matrix of the m per-sample gradients of the flattened weight, for pruners that
build their own curvature (e.g. FishLeg)."""

HESSIAN_GRAD: Final = "hessian_grad"
"""H ḡ: the Hessian-gradient product of the temperature-scaled loss, shaped like the weight
(GraSP)."""

INPUT_SQUARES: Final = "input_squares"
"""E[x_j²]: the mean square of each input column of a Linear or Conv2d (groups 1; unfolded
patches), over the input rows of ``StatsSpec.num_samples`` calibration samples (padding tokens
left out), as a float64 vector of the weight matrix's column count, measured on the model as
it is before the step. No gradients, no labels (Wanda). Only for those layers; others get
none."""

INPUT_GRAM: Final = "input_gram"
"""H = XᵀX / n: the Gram matrix of the input rows of a Linear or Conv2d (groups 1; unfolded
patches), float64 (d, d) for a weight matrix of d columns, from the same pass and samples as
INPUT_SQUARES: the Hessian of the layer's output error ‖WX − ŴX‖² / n (layer-wise OBS). Only
for those layers; others get none. Costs d² per layer: meant for CNNs and small encoders."""

STATISTICS: Final = {
    GRAD_MEAN: "mean loss gradient ḡ (true labels)",
    FISHER_DIAG: "Fisher diagonal E[g ⊙ g]",
    FISHER_INV: "damped blockwise inverse Fisher, a BlockInverse",
    GRAD_ROWS: "the (m, d) per-sample gradient rows",
    HESSIAN_GRAD: "Hessian-gradient product H ḡ",
    INPUT_SQUARES: "mean square of each layer input column E[x_j²]",
    INPUT_GRAM: "Gram matrix of each layer's input rows XᵀX / n",
}
PER_SAMPLE: Final = frozenset({GRAD_MEAN, FISHER_DIAG, FISHER_INV, GRAD_ROWS})
"""The statistics built from per-sample gradients (one memory-planned pass each)."""
LAYER_INPUTS: Final = frozenset({INPUT_SQUARES, INPUT_GRAM})
"""The statistics of what each layer sees, from forward passes only."""
LABEL_FREE: Final = frozenset({FISHER_DIAG, FISHER_INV, GRAD_ROWS, INPUT_SQUARES, INPUT_GRAM})
"""Statistics that mean something without labels (curvature from targets drawn around the
model's outputs, or inputs only): the mean gradient and Hḡ do not."""
