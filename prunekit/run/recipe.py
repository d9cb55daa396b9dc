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

from prunekit.engine.schedule import ScheduleConfig, recompute_of
from prunekit.engine.train import TrainConfig
from prunekit.errors import InputFileError, UsageError
from prunekit.run.config import PruneConfig

# where and how, not what; trust is the user's decision each time, never a file's
NOT_RECORDED = ("out", "force", "verbose", "command", "trust_checkpoint")


def recipe_of(config: PruneConfig, resolved_params: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready recipe of a run, with the pruner's resolved hyperparameters."""
    view = json.loads(json.dumps(anchored(config).to_json()))
    for key in NOT_RECORDED:
        view.pop(key, None)
    view["params"] = dict(resolved_params)
    return view


def absolute_data(spec: str) -> str:
    """A data spec with its paths made absolute (digits has none)."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("cifar10", "imagefolder", "tensors", "text"):
        return spec
    return f"{kind}:" + ",".join(str(Path(p).expanduser().absolute()) for p in arg.split(","))


def absolute_model(spec: str) -> str:
    """A model spec with its folder made absolute (``hf:DIR``); others are names."""
    kind, sep, arg = spec.partition(":")
    return f"hf:{Path(arg).expanduser().absolute()}" if sep and kind == "hf" else spec


def anchored(config: PruneConfig) -> PruneConfig:
    """The run with its model folder, weights and data paths absolute, so that what it
    records (report.json and its recipe, file metadata) means the same files from any
    folder."""
    data = absolute_data(config.data) if config.data else config.data
    weights = config.weights.absolute() if config.weights is not None else None
    return dataclasses.replace(
        config, model=absolute_model(config.model), data=data, weights=weights
    )


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe from .toml or .json (a report.json gives its ``recipe``)."""
    path = Path(path)
    if path.is_dir() and (path / "report.json").is_file():
        path = path / "report.json"  # a run's output folder
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
    recipe.pop("trust_checkpoint", None)  # only ever from the command line
    return recipe


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _unknown(where: str, given: Mapping[str, Any], cls: type) -> None:
    unknown = sorted(set(given) - _fields(cls))
    if unknown:
        raise UsageError(
            f"recipe{where}: unknown option(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(_fields(cls)))}"
        )


NUMBER, INTEGER, TEXT, FLAG = "a number", "an integer", "a string", "true or false"
TYPES = {  # the options' kinds, as a recipe must hold them
    "model": TEXT, "pruner": TEXT, "sparsity": NUMBER, "mask": TEXT, "data": TEXT,
    "normalize": TEXT, "image_size": INTEGER, "max_length": INTEGER, "weights": TEXT,
    "num_classes": INTEGER, "objective": TEXT, "structure": TEXT, "min_channels": INTEGER,
    "channel_multiple": INTEGER,
    "recalibrate_bn": FLAG, "memory_budget": INTEGER, "verbose": FLAG, "device": TEXT,
    "seed": INTEGER, "validate": FLAG, "out": TEXT, "force": FLAG,
    "quantize": TEXT, "rounding": TEXT, "group_size": INTEGER, "max_accuracy_drop": NUMBER,
    "min_cosine": NUMBER, "validate_runs": INTEGER, "quantize_fallback": FLAG,
    "kind": TEXT, "steps": INTEGER, "initial_sparsity": NUMBER, "finetune_epochs": INTEGER,
    "warmup_epochs": INTEGER, "epochs": INTEGER, "lr": NUMBER, "optimizer": TEXT,
    "lr_schedule": TEXT, "batch_size": INTEGER, "weight_decay": NUMBER, "distill": FLAG,
    "temperature": NUMBER, "distill_weight": NUMBER, "augment": FLAG,
}  # fmt: skip
CHECKS = {
    NUMBER: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool),
    TEXT: lambda v: isinstance(v, str),
    FLAG: lambda v: isinstance(v, bool),
}


def _typed(where: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """Check each value's kind; read the forms the CLI takes (recompute "auto", "2GiB")."""
    from prunekit.calibrate.memory import parse_size

    values = {k: str(v) if isinstance(v, Path) else v for k, v in table.items()}
    if isinstance(values.get("recompute"), str):
        values["recompute"] = recompute_of(values["recompute"])
    if isinstance(values.get("memory_budget"), str):
        values["memory_budget"] = parse_size(values["memory_budget"])
    for key in ("exclude", "exports"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
        if key in values and not all(isinstance(v, str) for v in values[key] or ()):
            raise UsageError(f"recipe{where}: {key} must be a list of strings")
    for key, value in values.items():
        kind = TYPES.get(key)
        if value is not None and kind is not None and not CHECKS[kind](value):
            raise UsageError(f"recipe{where}: {key} = {value!r} must be {kind}")
    if values.get("recompute") is not None and not CHECKS[INTEGER](values["recompute"]):
        raise UsageError(f'recipe{where}: recompute must be "auto" or an integer')
    return values


def schedule_from(table: Any) -> ScheduleConfig:
    if not isinstance(table, Mapping):
        raise UsageError("recipe: schedule must be a table ([schedule] with kind = ...)")
    _unknown(" [schedule]", table, ScheduleConfig)
    train = table.get("train") or {}
    if not isinstance(train, Mapping):
        raise UsageError("recipe: schedule.train must be a table ([schedule.train])")
    _unknown(" [schedule.train]", train, TrainConfig)
    values = _typed(" [schedule]", {k: v for k, v in table.items() if k != "train"})
    return ScheduleConfig(**values, train=TrainConfig(**_typed(" [schedule.train]", train)))


def config_from(recipe: Mapping[str, Any]) -> PruneConfig:
    """A PruneConfig from a recipe; unknown options, wrong kinds and missing essentials are
    errors."""
    _unknown("", recipe, PruneConfig)
    missing = [k for k in ("model", "pruner", "sparsity") if recipe.get(k) is None]
    if missing:
        raise UsageError(
            f"the run needs {', '.join(missing)}: give them on the command line or in --config"
        )
    values = _typed("", {k: v for k, v in recipe.items() if k not in ("schedule", "params")})
    values["schedule"] = schedule_from(recipe.get("schedule") or {})
    params = recipe.get("params") or {}
    if not isinstance(params, Mapping):
        raise UsageError("recipe: params must be a table ([params] with key = value)")
    values["params"] = dict(params)
    for key in ("exclude", "exports"):
        if key in values:
            values[key] = tuple(values[key])
    values.pop("command", None)  # recorded for the report only
    for key in ("weights", "out"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    if values.get("out") is None:
        values["out"] = PruneConfig.default_out(
            values["model"], values["pruner"], values["sparsity"]
        )
    return PruneConfig(**values)


def kept_params(pruner: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe's hyperparameters that another pruner accepts (the rest belonged to the
    recipe's own pruner)."""
    from prunekit.pruners import registry

    accepted = {p.name for p in registry.load(pruner).params}
    return {k: v for k, v in params.items() if k in accepted}


def refuse_code_and_overwrite(
    recipe: dict[str, Any], path: Path | str, model_given: bool, force_given: bool
) -> None:
    """A file never names code to run nor replaces an output by itself: a recipe's
    ``package.module:factory`` model is refused unless typed on the command line, and its
    ``force`` is dropped unless --force is (so an existing --out stays an error)."""
    from prunekit.load.models import names_code

    model = recipe.get("model")
    if not model_given and isinstance(model, str) and names_code(model):
        raise UsageError(
            f"{path}: model = {model!r} names Python code to import and run, and a recipe "
            f"never runs code: type the model on the command line (prunekit prune {model} "
            f"--config {path})"
        )
    if not force_given:
        recipe.pop("force", None)
