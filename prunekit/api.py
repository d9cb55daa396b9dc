"""The pruner plugin contract, version 1: everything a plugin may import from prunekit.

A pruner subclasses ``Pruner`` and declares:

- ``name`` and a docstring (first line: the summary `prunekit pruners list` shows);
- ``needs``: the statistics to collect, from the constants below (``GRAD_MEAN``,
  ``FISHER_DIAG``, ``FISHER_INV``, ``GRAD_ROWS``, ``HESSIAN_GRAD``, ``INPUT_SQUARES``,
  ``INPUT_GRAM``);
- ``params``: its hyperparameters (``Param``), given by users as ``--param key=value``;
- ``stats_params``: which of those set how statistics are gathered (fields of
  ``StatsSpec``: num_grads, grad_batch, fisher, block_size, damp, damp_mode, temperature,
  num_samples); ``SAMPLING_PARAMS`` / ``SAMPLING_NAMES`` are the common three;

and implements ``score(target, stats)`` (one score per weight, larger = keep; None declines
the tensor), optionally ``update(target, keep, stats)`` (OBS-style compensation) and
``prepare(context, step, steps)`` (before every pruning step, with a ``StepContext``).

A layer-wise method (SparseGPT-style) subclasses ``LayerPruner`` instead: prunekit calibrates
(measures each supported layer's input Gram matrix, in forward order, through the layers
already compressed) and calls ``compress(target, gram, request)``, a pure function returning
a ``Compressed`` (keep-mask and optional new weights) for a ``LayerRequest`` (sparsity or N:M).
``check_pruner`` verifies all of this in a plugin's own tests. The registry refuses a class
whose ``contract`` is not ``CONTRACT_VERSION`` or whose ``needs`` names an unknown statistic.
"""

from __future__ import annotations

from prunekit.calibrate.collector import Collector
from prunekit.contract.context import StepContext
from prunekit.contract.curvature import BlockInverse
from prunekit.contract.pruner import (
    CONTRACT_VERSION,
    NUM_SAMPLES,
    SAMPLING_NAMES,
    SAMPLING_PARAMS,
    Compressed,
    LayerPruner,
    LayerRequest,
    Param,
    Pruner,
)
from prunekit.contract.statistics import (
    FISHER_DIAG,
    FISHER_INV,
    GRAD_MEAN,
    GRAD_ROWS,
    HESSIAN_GRAD,
    INPUT_GRAM,
    INPUT_SQUARES,
    STATISTICS,
)
from prunekit.contract.target import StatsSpec, Target
from prunekit.errors import NumericalError, PrunekitError, UsageError
from prunekit.testing import check_pruner

__all__ = [
    "CONTRACT_VERSION",
    "FISHER_DIAG",
    "FISHER_INV",
    "GRAD_MEAN",
    "GRAD_ROWS",
    "HESSIAN_GRAD",
    "INPUT_GRAM",
    "INPUT_SQUARES",
    "NUM_SAMPLES",
    "SAMPLING_NAMES",
    "SAMPLING_PARAMS",
    "STATISTICS",
    "BlockInverse",
    "Collector",
    "Compressed",
    "LayerPruner",
    "LayerRequest",
    "NumericalError",
    "Param",
    "PrunekitError",
    "Pruner",
    "StatsSpec",
    "StepContext",
    "Target",
    "UsageError",
    "check_pruner",
]
