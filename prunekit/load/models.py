"""Model specs and weights.

Specs: ``sample:NAME`` (shipped, with weights and a dataset), ``cifar:ARCH`` (the CIFAR
ResNets 20/32/44/56, built in; give ``--weights``), ``torchvision:ARCH`` (built untrained;
give ``--weights``) or ``torchvision:ARCH:WEIGHTS`` (torchvision's published weights),
``hf:DIR`` or ``hf:ORG/NAME[@REVISION]`` (a Hugging Face folder or hub id; see
``prunekit.load.hub``) and ``package.module:factory`` (any callable returning an
``nn.Module``). Weights are a state dict in .safetensors, .pt or .pth, always read with
``weights_only=True`` unless the user trusts the file explicitly.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import (
    InputFileError,
    ModelMismatchError,
    UnknownNameError,
    UsageError,
    did_you_mean,
)
from prunekit.formats.metadata import LOAD_BOUNDS, StructureRecord, weights_metadata
from prunekit.formats.safetensors_file import tied_aliases
from prunekit.load.sample_models import SAMPLES

__all__ = ["LOAD_BOUNDS"]  # (re-exported: the bounds of what a model is given as)

SPEC_FORMS = (
    "sample:NAME, cifar:ARCH, torchvision:ARCH[:WEIGHTS], hf:DIR, hf:ORG/NAME[@REVISION] or "
    "package.module:factory"
)
_SHOWN = 5  # how many keys an error message lists


@dataclass
class LoadedModel:
    spec: str
    model: nn.Module
    weights: str | None
    warnings: list[str] = field(default_factory=list)
    trusted_checkpoint: str | None = None  # a pickle loaded with --trust-checkpoint
    structure: StructureRecord | None = None  # the channels an earlier structured run kept


def _sample(name: str, num_classes: int | None) -> tuple[nn.Module, Path]:
    sample = SAMPLES[name]
    kwargs = {"num_classes": num_classes} if num_classes else {}
    return sample.factory(**kwargs), sample.weights


def _torchvision(rest: str, num_classes: int | None) -> tuple[nn.Module, Path | None]:
    """``torchvision:ARCH`` (untrained) or ``torchvision:ARCH:WEIGHTS`` (published weights,
    from torch's hub cache)."""
    from torchvision import models

    arch, _, weights = rest.partition(":")
    if weights:
        from prunekit.load.hub import torchvision_weights

        published = torchvision_weights(arch, weights)
        if num_classes is not None and num_classes != published.num_classes:
            raise UsageError(
                f"torchvision:{rest} was trained for {published.num_classes} classes, not "
                f"--num-classes {num_classes}: drop --num-classes, or use torchvision:{arch} "
                "with --weights of your own"
            )
        return models.get_model(arch, weights=None, num_classes=published.num_classes), (
            published.path
        )
    available = models.list_models(module=models)
    if arch not in available:
        raise UnknownNameError(
            f"unknown torchvision architecture '{arch}': {did_you_mean(arch, available)}"
            "see torchvision.models.list_models()"
        )
    return models.get_model(arch, weights=None, num_classes=num_classes or 1000), None


def _cifar(arch: str, num_classes: int | None) -> nn.Module:
    from prunekit.load.cifar_resnet import DEPTHS, cifar_resnet

    if arch not in DEPTHS:
        raise UnknownNameError(
            f"unknown CIFAR architecture '{arch}': {did_you_mean(arch, list(DEPTHS))}"
            f"use one of {', '.join(DEPTHS)}"
        )
    return cifar_resnet(arch, num_classes or 10)


def architecture_rows() -> list[dict[str, object]]:
    """`prunekit models list` rows of the built-in architectures (no weights of their own)."""
    from prunekit.load.cifar_resnet import DEPTHS, cifar_resnet

    rows: list[dict[str, object]] = []
    for arch, depth in DEPTHS.items():
        model = cifar_resnet(arch)
        rows.append(
            {
                "model": f"cifar:{arch}",
                "data": "give --data",
                "parameters": sum(p.numel() for p in model.parameters()),
                "test_accuracy": None,
                "description": f"CIFAR ResNet-{6 * depth + 2}, 32x32 RGB; weights: --weights",
            }
        )
    return rows


def _import_factory(spec: str):
    """Import ``module:attr``, looking in the current folder first (as ``python -m`` does)."""
    module_name, _, attr = spec.partition(":")
    added = "" not in sys.path and "." not in sys.path
    if added:
        sys.path.insert(0, "")
    try:  # prints go to stderr (stdout may be --json); SystemExit is an error like any
        with contextlib.redirect_stdout(sys.stderr):
            return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownNameError(
            f"cannot import model factory '{spec}' ({type(exc).__name__}: {exc}); prunekit "
            f"looks in the current folder and the installed packages; use {SPEC_FORMS}"
        ) from exc
    except (Exception, SystemExit) as exc:  # the module itself failed while importing
        raise UsageError(
            f"importing model factory '{spec}' failed ({type(exc).__name__}: {exc}); fix "
            "that module"
        ) from exc
    finally:
        if added:
            sys.path.remove("")


def _takes_num_classes(factory) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True  # unknown: let the call decide
    return "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _factory(spec: str, num_classes: int | None) -> nn.Module:
    factory = _import_factory(spec)
    if num_classes and not _takes_num_classes(factory):
        raise UsageError(
            f"model factory '{spec}' has no num_classes argument; drop --num-classes or add "
            "the argument to the factory"
        )
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model = factory(num_classes=num_classes) if num_classes else factory()
    except (Exception, SystemExit) as exc:
        raise UsageError(
            f"model factory '{spec}' failed ({type(exc).__name__}: {exc}); fix the factory"
        ) from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"model factory '{spec}' returned {type(model).__name__}, not a Module")
    return model


BUILT_IN_KINDS = ("sample", "cifar", "torchvision", "hf")


def names_code(spec: str) -> bool:
    """Whether ``spec`` is a ``package.module:factory`` (Python code to import and call)."""
    return spec.partition(":")[0] not in BUILT_IN_KINDS


def sized_by_data(spec: str, weights: Path | None = None) -> bool:
    """Whether ``spec`` takes the data's class count where ``--num-classes`` is not given:
    cifar:, torchvision: (published weights must match it) and a factory that takes
    ``num_classes``, unless ``weights`` of the factory bring their own head."""
    kind = spec.partition(":")[0]
    if kind in ("cifar", "torchvision"):
        return True
    return names_code(spec) and weights is None and _takes_num_classes(_import_factory(spec))


def build(spec: str, num_classes: int | None = None) -> tuple[nn.Module, Path | None]:
    """Build the architecture named by ``spec``; return it and its default weights."""
    default_data(spec)  # validates the spec
    low, high = LOAD_BOUNDS["num_classes"]
    if num_classes is not None and not low <= num_classes <= high:
        raise UsageError(f"--num-classes {num_classes}: give an integer from {low} to {high}")
    kind, _, rest = spec.partition(":")
    if kind == "sample":
        return _sample(rest, num_classes)
    if kind == "torchvision":
        return _torchvision(rest, num_classes)
    if kind == "cifar":
        return _cifar(rest, num_classes), None
    if kind == "hf":
        from prunekit.load.hf import load_hf
        from prunekit.load.hub import hf_root

        return load_hf(hf_root(rest)).module, None
    return _factory(spec, num_classes), None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a state dict, a checkpoint dict holding one, or (trusted) a whole module."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict | nn.Module):
                return _unwrap(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            if all(k.startswith("module.") for k in obj):  # saved from DataParallel
                obj = {k.removeprefix("module."): v for k, v in obj.items()}
            return obj
    raise InputFileError(
        f"{path} does not hold a state dict of tensors; save one with "
        "torch.save(model.state_dict(), PATH) or safetensors"
    )


def read_state_dict(path: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors / .pt / .pth, safely unless ``trust``."""
    if path.is_dir():
        raise InputFileError(f"--weights {path} is a folder; give the weights file in it")
    if not path.is_file():
        raise InputFileError(f"weights file {path} does not exist; check --weights")
    if path.suffix == ".safetensors":
        from prunekit.formats.compact import load_sparse

        return load_sparse(path)  # plain or compact (bitmask) form
    if path.suffix not in {".pt", ".pth", ".bin"}:
        raise InputFileError(f"{path}: weights must be .safetensors, .pt or .pth")
    try:
        with warnings.catch_warnings():  # a damaged file is an error, not a warning
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not _looks_like_checkpoint(path):
            raise InputFileError(
                f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                "pickle); check that the file is complete and is what you meant"
            ) from exc
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise InputFileError(
                f"{path} contains pickled Python objects that safe loading refuses; re-save "
                "it with torch.save(model.state_dict(), PATH), or pass --trust-checkpoint if "
                "you trust where it came from"
            ) from exc
        raise InputFileError(f"{path} is not a readable PyTorch checkpoint ({exc})") from exc
    except Exception as exc:  # corrupt zip, truncated file, wrong format
        raise InputFileError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); "
            "check the file or re-save it"
        ) from exc
    return _unwrap(obj, path)


def _looks_like_checkpoint(path: Path) -> bool:
    """torch.save writes a zip archive (or, legacy, a pickle: protocol 2+ starts with 0x80,
    protocols 0 and 1 with an opcode such as '(' ']' '}' 'c')."""
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as f:
        return f.read(1) in {b"\x80", b"(", b"]", b"}", b"c", b"N", b"I", b"L"}


def first_non_finite(state: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """The first tensor holding NaN or Inf, and how many such values; None if there is none."""
    for name, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            return name, int((~torch.isfinite(t)).sum())
    return None


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """One error naming the first tensor holding NaN or Inf."""
    bad = first_non_finite(state)
    if bad is not None:
        raise InputFileError(
            f"{source}: tensor {bad[0]} holds {bad[1]} NaN/Inf value(s); the weights are "
            "broken: use a good checkpoint"
        )


def check_fit(model: nn.Module, state: dict[str, torch.Tensor], source: str, spec: str) -> None:
    """Raise one error listing the first missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    tied = tied_aliases(expected)  # stored once, under the first name
    optional |= {k for k, first in tied.items() if first in state}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} ({'x'.join(map(str, state[k].shape))} in file, "
        f"{'x'.join(map(str, expected[k].shape))} in model)"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", shapes),
    ):
        if keys:
            more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
            problems.append(f"{label}: {', '.join(keys[:_SHOWN])}{more}")
    if problems:
        raise ModelMismatchError(
            f"weights {source} do not fit {spec}: {'; '.join(problems)}. Check that the "
            "weights belong to this architecture (and --num-classes)"
        )


def saved_structure(path: Path) -> StructureRecord | None:
    """The channels a structured run kept, as recorded in its safetensors file (checked: a
    file may have been edited)."""
    if path.suffix != ".safetensors":
        return None
    return weights_metadata(path).structure


def load_model(
    spec: str, weights: Path | None = None, num_classes: int | None = None, trust: bool = False
) -> LoadedModel:
    """Build ``spec`` and load ``weights`` (or the sample's own) into it, on the CPU."""
    model, default_weights = build(spec, num_classes)
    path = weights or default_weights
    loaded = LoadedModel(spec, model, str(path) if path else None)
    if path is not None:
        state = read_state_dict(path, trust)
        structure = saved_structure(path)
        if structure is not None:  # a --structure run: its channels cut out first
            loaded.structure = structure
            from prunekit.structured.plan import reapply

            example = torch.zeros(1, *structure.input_shape)
            reapply(model, example.to(getattr(model, "input_dtype", torch.float32)),
                    structure.kept, str(path))  # fmt: skip
        check_fit(model, state, str(path), spec)
        check_finite(state, f"weights {path}")
        model.load_state_dict(state, strict=False)
        if trust and path.suffix != ".safetensors":
            loaded.trusted_checkpoint = str(path)
            loaded.warnings.append(
                f"--trust-checkpoint: {path} was unpickled, which runs any code it holds; "
                "use it only for files you trust, and re-save as safetensors"
            )
    elif not spec.startswith("hf:"):  # a Hugging Face directory holds its weights
        loaded.warnings.append(
            f"{spec} has no --weights: it is randomly initialised, so its accuracy means "
            "nothing; pass --weights FILE"
        )
    model.eval()
    return loaded


def brings_weights(spec: str) -> bool:
    """Whether ``spec`` comes with its weights (the dense model is the one it builds)."""
    kind, _, rest = spec.partition(":")
    return kind in {"sample", "hf"} or (kind == "torchvision" and ":" in rest)


def default_data(spec: str) -> str | None:
    """Check the spec's form and return the dataset it comes with, without building it."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise UnknownNameError(f"unknown model spec '{spec}': use {SPEC_FORMS}")
    if kind != "sample":
        return None
    if name not in SAMPLES:
        raise UnknownNameError(
            f"unknown sample model '{name}': {did_you_mean(name, list(SAMPLES))}"
            f"see `prunekit models list` (known: {', '.join(SAMPLES)})"
        )
    return SAMPLES[name].data
