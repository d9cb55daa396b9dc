"""prunekit from Python: prune an ``nn.Module`` in memory, hold its masks in your own training
loop, export and validate it. The CLI runs the same code (``prunekit.run.pipeline``)."""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from prunekit.contract.pruner import Pruner
from prunekit.contract.quantization import QuantizedTensor
from prunekit.engine.schedule import ScheduleConfig
from prunekit.errors import PrunekitError, UsageError
from prunekit.load.data import (
    MIN_TEST,
    MIN_TRAIN,
    CheckedDataset,
    Splits,
    calibration_of,
    check_pair,
)
from prunekit.pruners import registry
from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import Inputs, check, prune_model
from prunekit.runtime import distributed
from prunekit.runtime.device import resolve_device
from prunekit.runtime.progress import Reporter, Silent
from prunekit.runtime.timing import Timings
from prunekit.version import __version__

DataLike = DataLoader | Dataset | tuple[torch.Tensor, torch.Tensor] | torch.Tensor

_FLAG = re.compile(
    r"--([a-z][a-z0-9-]*)(/--no-[a-z0-9-]+)?"
    r"( (?=[-+]?[.\d]|['\"]|[\w.*?]+[:=,;)]))?"  # a value follows: a number, a quote, X: X,
)
_SCHEDULE = ("schedule", "steps", "recompute", "initial-sparsity", "finetune-epochs",
             "warmup-epochs", "epochs")  # fmt: skip
_TRAIN = ("lr", "optimizer", "lr-schedule", "batch-size", "weight-decay")
_KEYWORDS = {
    "param": "params",
    "schedule": "schedule.kind",
    **{f: f"schedule.{f.replace('-', '_')}" for f in _SCHEDULE[1:]},
    **{f: f"schedule.train.{f.replace('-', '_')}" for f in _TRAIN},
}
_Args = ParamSpec("_Args")
_Result = TypeVar("_Result")


def in_python_words(message: str) -> str:
    """An error message with its command-line flags named as the keywords of the Python API
    (``--mask 2:4`` reads ``mask=2:4``, ``--steps`` reads ``schedule.steps``, ``--param
    damp`` reads ``params damp``)."""

    def keyword(match: re.Match[str]) -> str:
        flag = match.group(1)
        name = _KEYWORDS.get(flag, flag.replace("-", "_"))
        valued = match.group(3) and not match.group(2)  # (a --flag/--no-flag pair: a keyword)
        if not valued:
            return name + (match.group(3) or "")
        return f"{name} " if name == "params" else f"{name}="

    return _FLAG.sub(keyword, message)


def speaks_python(function: Callable[_Args, _Result]) -> Callable[_Args, _Result]:
    """Errors raised from ``function`` name the API's keywords, not the CLI's flags."""

    @functools.wraps(function)
    def wrapper(*args: _Args.args, **kwargs: _Args.kwargs) -> _Result:
        try:
            return function(*args, **kwargs)
        except PrunekitError as exc:
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (in_python_words(exc.args[0]), *exc.args[1:])
            raise

    return wrapper


@dataclass
class PruneResult:
    """The pruned model (the one passed in, pruned in place), its keep-masks and the report."""

    model: nn.Module
    masks: dict[str, torch.Tensor]  # dotted weight name -> bool, True = kept
    report: dict[str, Any]
    # quantize=: dotted weight name -> its integer codes and scales (the weight, dequantized,
    # is what the model now holds); give it to export_onnx for the quantized ONNX
    quantized: dict[str, QuantizedTensor] | None = None

    def hold(self) -> MaskHandle:
        """Keep the pruned weights at zero while you train; ``.remove()`` when done."""
        return hold_masks(self.model, self.masks)


def _dataset(data: DataLike, what: str) -> tuple[Dataset, bool, int]:
    """(dataset, labeled, num_classes or 0 when unknown) of tensors, a Dataset or a loader."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, IterableDataset) or (
        isinstance(data, Dataset) and not hasattr(data, "__len__")
    ):
        raise UsageError(
            f"{what}: an IterableDataset (or a Dataset without len) cannot be split or sampled; "
            "give a map-style Dataset, or tensors"
        )
    if isinstance(data, tuple):  # numpy arrays are tensors
        data = cast(
            Any, tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in data)
        )
    elif isinstance(data, np.ndarray):
        data = torch.as_tensor(data)
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = (data.tensors[0], data.tensors[1])
    if isinstance(data, torch.Tensor):
        return TensorDataset(data, torch.full((len(data),), -1)), False, 0
    if isinstance(data, tuple):
        if len(data) != 2:
            raise UsageError(f"{what}: give (x, y) tensors, a Dataset or a DataLoader")
        x, y = data
        y = check_pair(what, x, y)
        labeled = not bool((y == -1).all())
        return TensorDataset(x, y), labeled, int(y.max()) + 1 if labeled else 0
    if isinstance(data, Dataset):  # checked sample by sample as it is read
        checked = CheckedDataset(data, what)
        if len(checked) == 0:
            raise UsageError(f"{what} is empty; give at least {MIN_TRAIN + MIN_TEST} samples")
        checked[0]
        return checked, bool(checked.labeled), 0
    raise UsageError(f"{what}: give (x, y) tensors, a Dataset or a DataLoader")


def splits_of(data: DataLike, test_data: DataLike | None = None) -> Splits:
    """Splits for in-memory data; without ``test_data`` accuracy is measured on ``data``."""
    train, labeled, classes = _dataset(data, "data")
    test, test_labeled, test_classes = (
        _dataset(test_data, "test_data") if test_data is not None else (train, labeled, classes)
    )
    first = train[0][0]
    return Splits(
        spec="in-memory" if test_data is not None else "in-memory (no test split)",
        train=train,
        calibration=calibration_of(train),
        test=test,
        num_classes=max(classes, test_classes),
        input_shape=tuple(first.shape),
        labeled=labeled and test_labeled,
    )


@speaks_python
def prune(
    model: nn.Module,
    pruner: str | Pruner,
    sparsity: float,
    data: DataLike,
    *,
    test_data: DataLike | None = None,
    mask: str | None = None,
    exclude: Sequence[str] = (),
    layer_sparsity: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    schedule: ScheduleConfig | None = None,
    device: str = "auto",
    seed: int = 0,
    memory_budget: int | None = None,
    recalibrate_bn: bool | None = None,
    objective: str | None = None,
    structure: str | None = None,
    min_channels: int = 1,
    channel_multiple: int = 1,
    quantize: str | None = None,
    rounding: str = "gptq",
    group_size: int = 32,
    distill: bool | None = None,
    augment: bool | None = None,
    reporter: Reporter | None = None,
) -> PruneResult:
    """Prune ``model`` in place to ``sparsity`` with ``pruner`` (a name or an instance).

    ``data`` is the calibration (and, for schedules that train, training) data: ``(x, y)``
    tensors, a Dataset of ``(x, y)`` or a DataLoader; x alone is unlabeled data.
    ``test_data`` (same forms) is where accuracy is measured; without it, on ``data``.
    ``mask`` is global, layer or N:M (default: global; layer with ``structure``);
    ``layer_sparsity`` maps name globs to a sparsity of their own (the first match wins;
    ``sparsity`` is then that of the other weights);
    ``schedule`` a ScheduleConfig (default: one-shot with automatic recomputation);
    ``objective`` the loss of the gradient statistics (labels, kl, mse, cosine; default:
    labels, or kl on unlabeled data). ``structure="channels"`` removes
    whole channels (``sparsity`` is then the fraction of channels) and shrinks ``model`` in
    place to its new shapes; the result then has no masks. ``quantize`` ("int8" or "int4",
    with ``rounding`` "gptq" or "rtn" and ``group_size`` for the 4-bit Linear layers) rounds
    every weight to its integer grid afterwards (the model holds the dequantized weights,
    ``result.quantized`` the codes). Training (a schedule that fine-tunes) distills from the
    dense model (``distill``, default on for unlabeled data only) and augments images (``augment``,
    default on for images). Everything numeric runs on
    ``device``. Under torchrun (or in a process group the caller started) each process
    takes its share of the calibration samples and every process gets the same result.
    """
    if isinstance(exclude, str):
        exclude = (exclude,)
    # numpy scalars are the numbers they hold (other types meet the schema's check)
    if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool | str):
        sparsity = float(sparsity)
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = int(seed)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model is a {type(model).__name__}; give a torch.nn.Module")
    if not isinstance(pruner, str | Pruner):
        raise UsageError(f"pruner is a {type(pruner).__name__}; give a name or a Pruner instance")
    if schedule is not None and not isinstance(schedule, ScheduleConfig):
        raise UsageError(f"schedule is a {type(schedule).__name__}; give a prunekit.ScheduleConfig")
    if isinstance(pruner, Pruner):
        if params:
            raise UsageError("params go to a pruner given by name; set them on the instance")
        instance, name = pruner, pruner.name
    else:
        instance, name = registry.create(pruner, dict(params or {})), pruner
    config = PruneConfig(
        model=f"in-memory:{type(model).__name__}",
        pruner=name,
        sparsity=sparsity,
        mask=mask if mask is not None else "layer" if structure else "global",
        exclude=tuple(exclude),
        layer_sparsity=dict(layer_sparsity or {}),
        params={k: str(v) for k, v in (params or {}).items()},
        schedule=_with_fine_tuning(schedule or ScheduleConfig(), distill, augment),
        recalibrate_bn=recalibrate_bn,
        memory_budget=memory_budget,
        objective=objective,
        structure=structure,
        min_channels=min_channels,
        channel_multiple=channel_multiple,
        quantize=quantize,
        rounding=rounding,
        group_size=group_size,
        device=device,
        seed=seed,
        exports=(),
    )
    check(config)
    splits = splits_of(data, test_data)
    source = {"model": config.model, "weights": None, "trusted_checkpoint": None}
    source["data"] = splits.spec
    where = resolve_device(device)
    timings = Timings(where)
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    with (
        torch.random.fork_rng(devices=[]),  # the caller's random state is left as it was
        distributed.process_group(where),  # under torchrun (or the caller's group)
    ):
        outcome = prune_model(
            config, Inputs(model, splits, source), instance, where, reporter or Silent(), timings
        )
    model.to(home)  # where the caller had it
    quantized = outcome.quantized.tensors if outcome.quantized else None
    return PruneResult(model, outcome.masks(), outcome.report, quantized)


def _with_fine_tuning(
    schedule: ScheduleConfig, distill: bool | None, augment: bool | None
) -> ScheduleConfig:
    """``schedule`` with ``distill`` / ``augment`` set on its training where given."""
    import dataclasses

    train = schedule.train
    if distill is not None:
        train = dataclasses.replace(train, distill=distill)
    if augment is not None:
        train = dataclasses.replace(train, augment=augment)
    return dataclasses.replace(schedule, train=train)


class _KeepMask(nn.Module):
    """A parametrization: the weight as trained, times a fixed keep-mask."""

    mask: torch.Tensor  # a buffer, registered in __init__

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


class MaskHandle:
    """Masks held on a model by ``hold_masks``; ``remove()`` bakes the zeros in and detaches."""

    def __init__(self, held: list[tuple[nn.Module, str]]) -> None:
        self.held = held

    def remove(self) -> None:
        for module, name in self.held:
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        self.held = []

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@speaks_python
def load_model(
    spec: str,
    weights: str | Path | None = None,
    *,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
) -> nn.Module:
    """The model ``spec`` names (``sample:NAME``, ``cifar:ARCH``, ``torchvision:ARCH[:WEIGHTS]``,
    ``hf:DIR`` or ``hf:ORG/NAME``, ``package.module:factory``) with ``weights`` loaded, e.g.
    a run's ``model.safetensors`` (a structured run's channels are cut out first), in eval
    mode on the CPU. Pickled checkpoints are refused unless ``trust_checkpoint``."""
    from prunekit.load.models import load_model as build_and_load

    path = Path(weights).expanduser() if weights is not None else None
    return build_and_load(spec, path, num_classes, trust_checkpoint).model.eval()


@speaks_python
def hold_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MaskHandle:
    """Hold ``masks`` (weight name -> keep, True = kept) on ``model`` with parametrizations.

    The forward pass sees ``weight * mask``, so pruned weights stay zero and get no
    gradient, whatever optimizer, weight decay or loop you use; a weight shared by several
    modules is masked in each. Optimizers made before or after both work (the parameter
    object is kept). Call ``remove()`` (or use it as a context manager) before saving or
    exporting: the zeros are then written into the weight. A weight that already has a
    parametrization of yours is refused (removing ours would remove yours).
    """
    planned: list[tuple[nn.Module, str, torch.Tensor]] = []
    for name, keep in masks.items():  # check every mask before holding any
        module_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(module_name)
        except AttributeError:
            raise UsageError(f"mask {name} names no module of the model") from None
        weight = getattr(owner, attr, None)
        if not isinstance(weight, torch.Tensor) or weight.shape != keep.shape:
            raise UsageError(f"mask {name} does not fit the model's {name}")
        for module in model.modules():  # every module sharing this very parameter
            if (
                module._parameters.get(attr) is weight
                or (
                    parametrize.is_parametrized(module, attr)
                    and getattr(
                        cast(nn.ModuleDict, module.parametrizations)[attr], "original", None
                    )
                    is weight
                )
                or (module is owner and parametrize.is_parametrized(module, attr))
            ):
                if parametrize.is_parametrized(module, attr):
                    raise UsageError(
                        f"{name} already has a parametrization; remove it before holding masks"
                    )
                planned.append((module, attr, keep.to(weight.device).bool()))
    held = []
    for module, attr, keep in planned:
        parametrize.register_parametrization(module, attr, _KeepMask(keep))
        held.append((module, attr))
    return MaskHandle(held)


@speaks_python
def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    metadata: Mapping[str, str] | None = None,
    sparse: bool = True,
    quantized: Mapping[str, QuantizedTensor] | None = None,
    calibration: torch.Tensor | None = None,
    force: bool = False,
) -> dict[str, object]:
    """Export ``model`` (CPU copy, eval mode) to a self-contained ONNX file; pruned
    initializers are stored as sparse tensors where that is smaller (``sparse``).

    With ``quantized`` (``PruneResult.quantized``) the file is the quantized model instead:
    static INT8 with activation ranges from ``calibration`` inputs (at least 32 samples), or,
    without calibration, dynamic INT8; the 4-bit Linear layers as MatMulNBits.

    An existing ``path`` is replaced only with ``force`` and only if prunekit wrote it; the
    file appears whole or not at all."""
    import copy

    from prunekit.formats.onnx_file import check_exportable
    from prunekit.formats.onnx_file import export_onnx as write
    from prunekit.formats.onnx_quant import check_calibration, export_quantized, input_batches
    from prunekit.runtime.outputs import staged_file

    check_exportable(model, input_shape)
    exported = copy.deepcopy(model).cpu().eval()
    target, shape = Path(path), tuple(input_shape)
    meta = {**dict(metadata or {}), "prunekit_version": __version__}  # what --force checks
    with staged_file(target, force, kind="export") as tmp:
        if quantized is None:
            info = write(exported, shape, tmp, meta, sparse=sparse, final_name=target.name)
        else:
            batches = None
            if calibration is not None:
                check_calibration(len(calibration))
                batches = input_batches(calibration.detach().cpu().numpy())
            mode = "static" if batches is not None else "dynamic"
            info = export_quantized(exported, shape, tmp, meta, mode, quantized, batches)
    return {**info, "path": str(target), "bytes": target.stat().st_size}


@speaks_python
def validate_onnx(
    path: str | Path,
    data: DataLike,
    *,
    torch_model: nn.Module | None = None,
    baseline: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    runs: int = 100,
    max_accuracy_drop: float | None = None,
    provider: str = "cpu",
) -> dict[str, Any]:
    """Run ``path`` in ONNX Runtime on ``data``: accuracy, parity with ``torch_model``,
    latency (against ``baseline``); ``passed`` is false when a gate fails."""
    from prunekit.validate.onnx_runtime import ValidateOptions, validate

    if torch_model is not None and not isinstance(torch_model, nn.Module):
        raise UsageError(f"torch_model is a {type(torch_model).__name__}; give a torch.nn.Module")
    splits = splits_of(data)
    options = ValidateOptions(
        batch_sizes=tuple(batch_sizes),
        provider=provider,
        runs=runs,
        max_accuracy_drop=max_accuracy_drop,
    )
    import copy

    reference = copy.deepcopy(torch_model) if torch_model is not None else None  # yours stays
    return validate(
        Path(path),
        splits.test,
        splits.input_shape,
        options,
        Path(baseline) if baseline else None,
        reference,
    )


@speaks_python
def run_recipe(recipe: str | Path | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Run a recipe — a .toml/.json file, a run's report.json, or a dict — like
    ``prunekit prune --config``: ``overrides`` (recipe keys, e.g. ``out=...``, ``seed=1``)
    replace its own values. Writes OUT and returns the report."""
    from prunekit.run.pipeline import run
    from prunekit.run.recipe import config_from, load_recipe, refuse_code_and_overwrite

    if isinstance(recipe, Mapping):  # the caller's own values: as trusted as its code
        base = dict(recipe)
    else:  # a file is data: it names no code and replaces nothing by itself
        base = load_recipe(recipe)
        refuse_code_and_overwrite(base, recipe, "model" in overrides, "force" in overrides)
    source = "recipe" if isinstance(recipe, Mapping) else str(recipe)
    return run(config_from({**base, **overrides}, source))
