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
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, create_model

from prunekit.engine.schedule import ScheduleConfig, recompute_of
from prunekit.engine.train import TrainConfig
from prunekit.errors import InputFileError, UsageError
from prunekit.load.hub import is_hub_id
from prunekit.run.config import PruneConfig
from prunekit.runtime.schema import Strict, parsed

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
    """A model spec with its folder made absolute (``hf:DIR``); others (hub ids too) are
    names."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind != "hf" or is_hub_id(arg):
        return spec
    return f"hf:{Path(arg).expanduser().absolute()}"


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
            recipe = json.loads(path.read_text(), object_pairs_hook=_no_repeated_keys)
        else:
            raise InputFileError(f"recipe {path}: use a .toml or .json file (or a report.json)")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(f"recipe {path} cannot be parsed ({exc}); fix the file") from None
    except RecursionError:
        raise InputFileError(f"recipe {path} is nested too deeply; fix the file") from None
    if isinstance(recipe, dict) and "recipe" in recipe:  # a run's report.json
        recipe = recipe["recipe"]
        if not isinstance(recipe, dict):
            raise InputFileError(f"{path}: its recipe is not a table of options; fix the file")
    if not isinstance(recipe, dict):
        raise InputFileError(f"recipe {path} is not a table of options")
    recipe.pop("trust_checkpoint", None)  # only ever from the command line
    return checked_recipe(recipe, str(path))


def _schema(cls: type, nested: Mapping[str, type] | None = None) -> type[Strict]:
    """The recipe schema of a config dataclass: its fields with their annotated types (strict:
    no ``true`` for a number, no ``10.7`` for an integer), every key optional, unknown keys an
    error. ``nested`` replaces a field's dataclass by its own schema."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = (nested or {}).get(f.name, hints[f.name])
        # a key that is also a pydantic method (validate) is held under another name
        name = f"{f.name}_" if hasattr(BaseModel, f.name) else f.name
        fields[name] = (kind, Field(default=None, alias=f.name))
    return create_model(f"{cls.__name__}Recipe", __base__=Strict, **fields)


TRAIN_SCHEMA = _schema(TrainConfig)
SCHEDULE_SCHEMA = _schema(ScheduleConfig, {"train": TRAIN_SCHEMA})
RECIPE_SCHEMA = _schema(PruneConfig, {"schedule": SCHEDULE_SCHEMA})


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"{repeated[0]} is given more than once")
    return dict(pairs)


def _no_nul(value: Any, where: str = "") -> None:
    """No NUL characters in any text (no path or name holds one)."""
    if isinstance(value, str) and "\0" in value:
        raise InputFileError(f"recipe: {where or 'a value'} holds a NUL character; fix it")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _no_nul(k, where)
            _no_nul(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list | tuple):
        for v in value:
            _no_nul(v, where)


def _spelled(table: Mapping[str, Any]) -> dict[str, Any]:
    """The forms the CLI takes, read as values: recompute "auto", memory_budget "2GiB", a
    single exclude or export as a string; null as unset."""
    from prunekit.calibrate.memory import parse_size

    # a null (JSON) or unset option (the CLI) means the default
    values = {k: str(v) if isinstance(v, Path) else v for k, v in table.items() if v is not None}
    if isinstance(values.get("recompute"), str):
        values["recompute"] = recompute_of(values["recompute"])
    if isinstance(values.get("memory_budget"), str):
        values["memory_budget"] = parse_size(values["memory_budget"])
    for key in ("exclude", "exports"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    return values


def _given(model: Strict) -> dict[str, Any]:
    """The keys a recipe set, with their validated values (nested tables as dicts)."""
    fields = type(model).model_fields
    return {fields[k].alias or k: getattr(model, k) for k in model.model_fields_set}


FIX = "see prunekit prune --help"


def _checked(recipe: Mapping[str, Any], source: str) -> Strict:
    """A recipe (the CLI's spellings read) against the schema."""
    _no_nul(recipe)
    table = _spelled(recipe)
    schedule = recipe.get("schedule")
    if isinstance(schedule, Mapping):
        table["schedule"] = _spelled(schedule)
        if isinstance(schedule.get("train"), Mapping):
            table["schedule"]["train"] = _spelled(schedule["train"])
    return parsed(RECIPE_SCHEMA, table, source, FIX)


def checked_recipe(recipe: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A recipe read from a file, checked at the edge: the keys it sets, as JSON-like values
    (so the command line's options can be laid over it)."""
    return _checked(recipe, source).model_dump(mode="json", by_alias=True, exclude_unset=True)


def check_types(config: PruneConfig) -> None:
    """A configuration built in Python (the API) against the recipe schema: the same types
    a recipe or the command line must give (no "no" for a flag, no string for a number)."""
    view = {k: v for k, v in config.to_json().items() if k not in ("command",)}
    _checked(view, "the options")


def config_from(recipe: Mapping[str, Any], source: str = "recipe") -> PruneConfig:
    """A PruneConfig from a recipe, checked against the schema: unknown options, wrong kinds
    and missing essentials are one-line errors naming the key."""
    values = _given(_checked(recipe, source))
    missing = [k for k in ("model", "pruner", "sparsity") if values.get(k) is None]
    if missing:
        raise UsageError(
            f"the run needs {', '.join(missing)}: give them on the command line or in --config"
        )
    if "schedule" in values:
        given = _given(values["schedule"])
        train = TrainConfig(**_given(given.pop("train"))) if "train" in given else TrainConfig()
        values["schedule"] = ScheduleConfig(**given, train=train)
    values.pop("command", None)  # recorded for the report only
    if values.get("structure") and values.get("mask") is None:
        # channels: every group loses the same fraction (a global threshold over groups of
        # different scales cut some to one channel: 98.9 -> 18.4 % on sample:digits-resnet)
        values["mask"] = "layer"
    if values.get("out") is None:
        values["out"] = PruneConfig.default_out(
            values["model"], values["pruner"], values["sparsity"], values.get("mask") or "global",
            values.get("structure"), values.get("quantize"),
        )  # fmt: skip
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
