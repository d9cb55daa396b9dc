"""prunekit: prune PyTorch models with first- and second-order criteria, export and validate.

The stable Python API (see the docs): ``prune`` an ``nn.Module`` in memory, ``load_model`` a
spec with a run's weights, ``hold_masks``
in your own training loop, ``export_onnx``, ``validate_onnx``; ``ScheduleConfig`` and
``TrainConfig`` for schedules that train; ``run_recipe`` / ``load_recipe`` / ``PruneConfig``
for run recipes. Plugin authors: ``prunekit.api``. Names are imported on first use, so that
``import prunekit`` (and the CLI's start) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from prunekit.version import __version__

_API = {
    "prune": "prunekit.library",
    "PruneResult": "prunekit.library",
    "hold_masks": "prunekit.library",
    "load_model": "prunekit.library",
    "MaskHandle": "prunekit.library",
    "export_onnx": "prunekit.library",
    "validate_onnx": "prunekit.library",
    "ScheduleConfig": "prunekit.engine.schedule",
    "TrainConfig": "prunekit.engine.train",
    "PruneConfig": "prunekit.run.config",
    "load_recipe": "prunekit.run.recipe",
    "run_recipe": "prunekit.library",
    "PrunekitError": "prunekit.errors",  # every error prunekit raises (see .exit_code)
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
