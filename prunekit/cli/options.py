"""Options shared by several commands, each declared once, and how they become a recipe.

``with_options(GROUP, ...)`` appends a group's options to a command's signature and hands
their values to the command as ``options`` (a dict), with ``options["given"]`` the names the
user typed (so a ``--config`` recipe is overridden only by what was given).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from prunekit.errors import UsageError

# Help panels, so ~30 options read in groups.
TARGETS = "Targets"
MODEL_DATA = "Model and data"
STATISTICS = "Statistics and device"
SCHEDULE = "Schedule and training"
EXPORT = "Export and validation"
OUTPUT = "Output"


@dataclass(frozen=True)
class Opt:
    name: str
    annotation: Any
    default: Any


def _opt(name: str, kind: Any, default: Any, flag: str, help: str, panel: str) -> Opt:
    return Opt(name, Annotated[kind, typer.Option(flag, help=help, rich_help_panel=panel)], default)


PREPROCESS = (
    _opt(
        "normalize",
        str | None,
        None,
        "--normalize",
        "Per-channel input normalisation: imagenet, cifar10 or MEAN/STD "
        "(e.g. 0.5,0.5,0.5/0.25,0.25,0.25). uint8 images are scaled to [0, 1] first.",
        MODEL_DATA,
    ),
    _opt(
        "image_size",
        int | None,
        None,
        "--image-size",
        "imagefolder: resize and centre-crop to N x N pixels.",
        MODEL_DATA,
    ),
)
TEXT = (
    _opt(
        "max_length",
        int | None,
        None,
        "--max-length",
        "text: data: tokens per text (default 128, at most the model's limit; longer cut).",
        MODEL_DATA,
    ),
)

JSON = (_opt("as_json", bool, False, "--json", "Print the result as JSON on stdout.", OUTPUT),)
FORCE = (
    _opt(
        "force",
        bool,
        False,
        "--force",
        "Replace the output if it exists (only ever a prunekit output).",
        OUTPUT,
    ),
)
GATES = (
    _opt(
        "max_accuracy_drop",
        float | None,
        None,
        "--max-accuracy-drop",
        "Fail when an export's accuracy falls more than this (0..1) below the dense model's "
        "(prune: with --validate, and nothing is written).",
        EXPORT,
    ),
    _opt(
        "min_cosine",
        float | None,
        None,
        "--min-cosine",
        "Fail when the mean cosine similarity of an export's outputs to the dense model's "
        "(--baseline, or the recorded hf:/sample: model) is below this, e.g. 0.95 (prune: "
        "with --validate, and nothing is written).",
        EXPORT,
    ),
)
VALIDATE_TIMING = (
    _opt(
        "validate_runs",
        int,
        100,
        "--runs",
        "Timed ONNX Runtime runs per model and batch size (prune: with --validate).",
        EXPORT,
    ),
    _opt(
        "validate_threads",
        int | None,
        None,
        "--threads",
        "ONNX Runtime intra-op threads (default: ONNX Runtime's own; on a busy machine fewer "
        "threads time more steadily; prune: with --validate).",
        EXPORT,
    ),
)
TRUST = (
    _opt(
        "trust_checkpoint",
        bool,
        False,
        "--trust-checkpoint",
        "Allow pickled (non weights-only) checkpoints. Only for files you trust.",
        MODEL_DATA,
    ),
)
NUM_CLASSES = (
    _opt(
        "num_classes",
        int | None,
        None,
        "--num-classes",
        "Classes of a torchvision/factory model (default: from the data, or the file).",
        MODEL_DATA,
    ),
)

RUN = (
    _opt(
        "mask",
        str | None,
        None,
        "--mask",
        "global: one threshold; layer: each tensor (each channel group with --structure) "
        "to S; N:M (e.g. 2:4). Default: global, or layer with --structure.",
        TARGETS,
    ),
    _opt(
        "structure",
        str | None,
        None,
        "--structure",
        "channels: remove whole Conv channels / Linear neurons with the layers that depend "
        "on them (-s is then the fraction of channels); the exports are smaller dense models. "
        "channels-or-weights: the same, or unstructured if the model cannot be traced. "
        "The second-order criterion for channels is -p layer_obs (with --mask layer); "
        "--channel-multiple 8 for ONNX Runtime speed.",
        TARGETS,
    ),
    _opt(
        "min_channels",
        int,
        1,
        "--min-channels",
        "--structure: the fewest channels any group keeps.",
        TARGETS,
    ),
    _opt(
        "channel_multiple",
        int,
        1,
        "--channel-multiple",
        "--structure: round every group's kept channels up to a multiple of N (e.g. 8: "
        "channel counts the CPU kernels vectorise well).",
        TARGETS,
    ),
    _opt(
        "exclude",
        list[str] | None,
        None,
        "--exclude",
        "Glob on dotted weight names to leave dense; repeatable.",
        TARGETS,
    ),
    _opt(
        "layer_sparsity",
        list[str] | None,
        None,
        "--layer-sparsity",
        "GLOB=S: the weights whose name matches GLOB pruned to S each (the first matching "
        "glob wins; -s is then the sparsity of the others); repeatable. A recipe written by "
        "`prunekit sensitivity` sets every layer.",
        TARGETS,
    ),
    _opt(
        "param",
        list[str] | None,
        None,
        "--param",
        "Pruner hyperparameter key=value; repeatable.",
        TARGETS,
    ),
    _opt(
        "data",
        str | None,
        None,
        "--data",
        "digits, cifar10:DIR, imagefolder:DIR, tensors:FILE, tensors:TRAIN,TEST or text:FILE "
        "(hf: models; one text per line, or an integer label, a tab and the text). Sample "
        "models bring their own.",
        MODEL_DATA,
    ),
    *PREPROCESS,
    *TEXT,
    _opt(
        "weights",
        Path | None,
        None,
        "--weights",
        "State dict: .safetensors, .pt or .pth.",
        MODEL_DATA,
    ),
    *NUM_CLASSES,
    *TRUST,
    _opt(
        "recalibrate_bn",
        bool | None,
        None,
        "--recalibrate-bn/--no-recalibrate-bn",
        "Re-estimate BatchNorm statistics on the calibration split after pruning "
        "(default: on where --structure removes channels, off otherwise).",
        SCHEDULE,
    ),
    _opt(
        "memory_budget",
        str | None,
        None,
        "--memory-budget",
        "Memory for statistics, e.g. 2GiB (default: a safe share of free).",
        STATISTICS,
    ),
    _opt(
        "objective",
        str | None,
        None,
        "--objective",
        "Loss of the gradient statistics: labels (cross-entropy), kl (to the dense model's "
        "predictions, no labels), mse or cosine (to the dense model's embeddings). Default: "
        "labels on labeled data, else cosine for encoders and kl for classifiers.",
        STATISTICS,
    ),
    _opt("device", str, "auto", "--device", "auto, cpu or cuda[:i].", STATISTICS),
    _opt(
        "quantize",
        str | None,
        None,
        "--quantize",
        "int8: every Conv/Linear weight rounded per channel to INT8 and model.int8.onnx "
        "written (static QDQ with activation ranges from the calibration split; dynamic for "
        "text models). int4: Linear layers to 4 bits in groups (ONNX Runtime's MatMulNBits), "
        "the others INT8; model.int4.onnx.",
        EXPORT,
    ),
    _opt(
        "rounding",
        str,
        "gptq",
        "--rounding",
        "--quantize int4: gptq (column by column, each error compensated under the layer's "
        "input statistics) or rtn (round to nearest).",
        EXPORT,
    ),
    _opt("group_size", int, 32, "--group-size", "--quantize int4: inputs per scale.", EXPORT),
    _opt(
        "quantize_fallback",
        bool,
        False,
        "--quantize-fallback",
        "When ONNX Runtime cannot quantize the model, keep the FP32 export with a warning "
        "(default: the run fails, naming what it could not quantize).",
        EXPORT,
    ),
)

TRAINING = (
    _opt("schedule", str, "oneshot", "--schedule", "oneshot, gradual or pbt.", SCHEDULE),
    _opt(
        "recompute",
        str,
        "auto",
        "--recompute",
        "Split each pruning step into K sub-steps, recomputing the statistics before each; "
        "auto: enough that no sub-step of an OBS-style pruner removes over 25 % of the "
        "remaining weights (1 for the other pruners).",
        SCHEDULE,
    ),
    _opt("steps", int, 1, "--steps", "gradual: number of pruning steps.", SCHEDULE),
    _opt(
        "initial_sparsity",
        float,
        0.0,
        "--initial-sparsity",
        "gradual: sparsity before the first step.",
        SCHEDULE,
    ),
    _opt(
        "finetune_epochs",
        int,
        0,
        "--finetune-epochs",
        "Epochs of masked fine-tuning after each step.",
        SCHEDULE,
    ),
    _opt(
        "warmup_epochs",
        int,
        0,
        "--warmup-epochs",
        "pbt: dense epochs before the mask is chosen.",
        SCHEDULE,
    ),
    _opt("epochs", int, 0, "--epochs", "pbt: epochs trained with the mask.", SCHEDULE),
    _opt("lr", float, 0.05, "--lr", "Learning rate.", SCHEDULE),
    _opt(
        "optimizer",
        str,
        "sgd",
        "--optimizer",
        "sgd (Nesterov momentum 0.9) or adamw (decoupled weight decay).",
        SCHEDULE,
    ),
    _opt("lr_schedule", str, "cosine", "--lr-schedule", "cosine, multistep, constant.", SCHEDULE),
    _opt("batch_size", int, 64, "--batch-size", "Training batch size.", SCHEDULE),
    _opt("weight_decay", float, 5e-4, "--weight-decay", "Weight decay.", SCHEDULE),
    _opt(
        "distill",
        bool | None,
        None,
        "--distill/--no-distill",
        "Fine-tune against the dense model's outputs (KL to its softened logits, mixed with "
        "the labels; cosine to its embeddings for encoders), so unlabeled data can train. "
        "Default: on for unlabeled data, off where there are labels.",
        SCHEDULE,
    ),
    _opt(
        "augment",
        bool | None,
        None,
        "--augment/--no-augment",
        "Random crop (4-pixel padding) and horizontal flip of training images. Default: on "
        "for images.",
        SCHEDULE,
    ),
)


def with_options(*groups: tuple[Opt, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the groups' options to a command; it receives them as ``options``."""
    extra = [o for group in groups for o in group]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name != "options"
        ]
        added = [
            inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                              annotation=o.annotation)
            for o in extra
        ] + [inspect.Parameter("typer_context", inspect.Parameter.KEYWORD_ONLY,
                               annotation=typer.Context)]  # fmt: skip

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs.pop("typer_context")
            options = {o.name: kwargs.pop(o.name) for o in extra}
            sources = {n: ctx.get_parameter_source(n) for n in [*options, *kwargs]}
            options["given"] = {
                n for n, source in sources.items()
                if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
            }  # fmt: skip
            return command(*args, options=options, **kwargs)

        merged = signature.replace(parameters=[*own, *added])
        # read by inspect.signature (typer sees the merged options), a runtime-only attribute
        wrapper.__signature__ = merged  # type: ignore[attr-defined]  # stubs lack __signature__
        wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        return wrapper

    return decorate


def parse_params(items: list[str] | None) -> dict[str, str]:
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects key=value, got '{item}'")
        if key.strip() in params:
            raise UsageError(f"--param {key.strip()} is given twice; give each parameter once")
        params[key.strip()] = value.strip()
    return params


def parse_layer_sparsity(items: list[str]) -> dict[str, float]:
    """``--layer-sparsity GLOB=S`` items, in order; the values are checked with the run."""
    table: dict[str, float] = {}
    for item in items:
        glob, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not glob.strip() or number is None:
            raise UsageError(
                f"--layer-sparsity expects GLOB=S such as 'layer1.*=0.5', got '{item}'"
            )
        if glob.strip() in table:
            raise UsageError(f"--layer-sparsity {glob.strip()} is given twice; give each once")
        table[glob.strip()] = number
    return table


_SCHEDULE_KEYS = {"schedule": "kind", "recompute": "recompute", "steps": "steps",
                  "initial_sparsity": "initial_sparsity", "finetune_epochs": "finetune_epochs",
                  "warmup_epochs": "warmup_epochs", "epochs": "epochs"}  # fmt: skip
_TRAIN_KEYS = ("lr", "optimizer", "lr_schedule", "batch_size", "weight_decay", "distill",
               "augment")  # fmt: skip


def _value(name: str, value: Any) -> Any:
    """An option's value as a recipe holds it; the recipe reader (prunekit.run.recipe) parses
    the forms the command line and files share ("auto", "2GiB", paths)."""
    if name == "exclude":
        return list(value or ())
    if name == "memory_budget" and value is None:
        return None
    return value


def pick(groups: tuple[tuple[Opt, ...], ...], *names: str) -> tuple[Opt, ...]:
    """The options ``names`` of ``groups``, declared once there (a command that takes some)."""
    found = {o.name: o for group in groups for o in group}
    return tuple(found[name] for name in names)


def to_recipe(options: dict[str, Any], recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe of the options: all of them, or over ``recipe`` only those given."""
    given = options.get("given", set())
    result: dict[str, Any] = dict(recipe or {})  # checked by load_recipe
    schedule = dict(result.get("schedule") or {})
    train = dict(schedule.get("train") or {})
    for name, value in options.items():
        if name in ("given", "as_json") or (recipe is not None and name not in given):
            continue
        if name == "param":
            result["params"] = {**(result.get("params") or {}), **parse_params(value)}
        elif name == "layer_sparsity":
            if value:
                result["layer_sparsity"] = parse_layer_sparsity(value)
        elif name in _SCHEDULE_KEYS:
            schedule[_SCHEDULE_KEYS[name]] = _value(name, value)
        elif name in _TRAIN_KEYS:
            train[name] = value
        else:
            result[name] = _value(name, value)
    schedule["train"] = train
    result["schedule"] = schedule
    return result
