"""Run recipes: every option of a run in one TOML or JSON document.

A recipe has the fields of ``PruneConfig`` (``model``, ``pruner``, ``sparsity``, ``mask``,
``exclude``, ``data``, ``weights``, ``params``, ``seed``, ...), with the schedule as a table::

    model = "sample:digits-cnn"
    pruner = "woodfisher"
    sparsity = 0.9
    [params]
    num_grads = 500
    [schedule]
    kind = "gradual"
    steps = 4
    finetune_epochs = 1
    [schedule.train]
    lr = 0.01

Every run's ``report.json`` holds its resolved recipe under ``"recipe"`` (all hyperparameters,
defaults included), so ``prunekit prune --config OUT/report.json --out NEW`` repeats it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunekit.config import PruneConfig
from prunekit.errors import InputFileError, UsageError
from prunekit.schedule import ScheduleConfig
from prunekit.train import TrainConfig

NOT_RECORDED = ("out", "force", "verbose", "command")  # where and how, not what


def recipe_of(config: PruneConfig, resolved_params: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready recipe of a run, with the pruner's resolved hyperparameters."""
    view = json.loads(json.dumps(config.to_json()))
    for key in NOT_RECORDED:
        view.pop(key, None)
    view["params"] = dict(resolved_params)
    return view


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe from .toml or .json (a report.json gives its ``recipe``)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"recipe {path} does not exist; check --config")
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            recipe = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            recipe = json.loads(path.read_text())
        else:
            raise InputFileError(f"recipe {path}: use a .toml or .json file (or a report.json)")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(f"recipe {path} cannot be parsed ({exc}); fix the file") from exc
    if isinstance(recipe, dict) and isinstance(recipe.get("recipe"), dict):
        recipe = recipe["recipe"]  # a run's report.json
    if not isinstance(recipe, dict):
        raise InputFileError(f"recipe {path} is not a table of options")
    return recipe


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _unknown(where: str, given: Mapping[str, Any], cls: type) -> None:
    unknown = sorted(set(given) - _fields(cls))
    if unknown:
        raise UsageError(
            f"recipe {where}: unknown option(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(_fields(cls)))}"
        )


def schedule_from(table: Mapping[str, Any]) -> ScheduleConfig:
    _unknown("[schedule]", table, ScheduleConfig)
    train = table.get("train") or {}
    _unknown("[schedule.train]", train, TrainConfig)
    return ScheduleConfig(**{**table, "train": TrainConfig(**train)})


def config_from(recipe: Mapping[str, Any]) -> PruneConfig:
    """A PruneConfig from a recipe; unknown options and missing essentials are errors."""
    _unknown("", recipe, PruneConfig)
    missing = [k for k in ("model", "pruner", "sparsity") if recipe.get(k) is None]
    if missing:
        raise UsageError(
            f"the run needs {', '.join(missing)}: give them on the command line or in --config"
        )
    values = dict(recipe)
    values["schedule"] = schedule_from(values.get("schedule") or {})
    values["params"] = dict(values.get("params") or {})
    for key in ("exclude", "exports", "command"):
        if key in values:
            values[key] = tuple(values[key])
    for key in ("weights", "out"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    if values.get("out") is None:
        values["out"] = PruneConfig.default_out(
            values["model"], values["pruner"], values["sparsity"]
        )
    try:
        return PruneConfig(**values)
    except TypeError as exc:
        raise UsageError(f"recipe: {exc}") from None
