"""Write pruned models: safetensors with the run's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from prunekit.contract.quantization import QuantizedTensor
from prunekit.engine.quantize import Quantized
from prunekit.formats.safetensors_file import read_metadata, untied, write_safetensors
from prunekit.version import __version__

__all__ = ["read_metadata", "save_safetensors", "write_exports"]

EXPORT_FORMATS = ("safetensors", "onnx")


def export_formats(text: str, validate: bool = False) -> tuple[str, ...]:
    """``--export a,b`` as a tuple; validating (and quantizing) needs the ONNX export, so it
    is added."""
    formats = [f.strip() for f in text.split(",") if f.strip()]
    if validate and "onnx" not in formats:
        formats.append("onnx")
    return tuple(formats)


def export_metadata(
    model: str, weights: Path | None, out: Path, data: str | None, num_classes: int | None
) -> dict[str, str]:
    """Metadata of a `prunekit export` file: the run's (from a prunekit safetensors), the
    model spec, the data, and the weights as a path relative to the output with its hash
    (so `prunekit validate` finds them for its parity check)."""
    import os

    from prunekit.run.recipe import absolute_data, absolute_model
    from prunekit.runtime.outputs import file_sha256

    metadata = {"format": "pt", "prunekit_version": __version__, "model": absolute_model(model)}
    if weights is not None and weights.suffix == ".safetensors":
        metadata.update({k: v for k, v in read_metadata(weights).items() if k != "prunekit_sparse"})
    if data:
        metadata["data"] = absolute_data(data)
    if weights is not None:
        metadata["weights_file"] = os.path.relpath(weights.absolute(), out.absolute().parent)
        metadata["weights_sha256"] = file_sha256(weights)
    if num_classes:
        metadata["num_classes"] = str(num_classes)
    return metadata


def metadata_for(report: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """The ``__metadata__`` strings stored in every file prunekit writes."""
    sparsity = report["sparsity"]
    meta = {
        "format": "pt",
        "prunekit_version": __version__,
        "model": report["model"],
        "pruner": report["pruner"],
        "sparsity_target": repr(sparsity["target"]),
        "sparsity_achieved": repr(sparsity["achieved"]),
        "sparsity_per_tensor": json.dumps(sparsity["per_tensor"]),
        "data": report["data"],
        **{k: str(v) for k, v in report.get("preprocess", {}).items() if v is not None},
        "num_classes": str(report["num_classes"]),
        "config": json.dumps(config, sort_keys=True),
    }
    kept = report.get("channels_kept")
    if kept:  # re-applied to the architecture on load (prunekit.structured.plan.reapply)
        meta["structure"] = json.dumps({"kept": kept["kept"], "input_shape": kept["input_shape"]})
    for key in ("dense", "pruned"):
        if report["accuracy"][key] is not None:
            meta[f"accuracy_{key}"] = repr(report["accuracy"][key])
    return meta


def save_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Save the model's state dict (dense tensors, pruned entries exactly zero)."""
    state = {k: v.detach().to("cpu").contiguous().clone()
             for k, v in untied(model.state_dict()).items()}  # fmt: skip
    write_safetensors(state, path, metadata)


def write_exports(
    folder: Path,
    model: nn.Module,
    dense_model: nn.Module | None,
    input_shape: tuple[int, ...],
    metadata: dict[str, str],
    formats: tuple[str, ...],
    quantized: dict[str, QuantizedTensor] | None = None,
) -> list[str]:
    """Write the run's files into ``folder``; return their names.

    Always ``model.safetensors`` (dense tensors, pruned entries zero). ``safetensors`` adds
    ``model.compact.safetensors`` (bitmask form); ``onnx`` adds ``model.onnx`` (pruned
    initializers stored sparse where smaller) and ``dense.onnx``, the unpruned baseline.
    """
    from prunekit.formats.compact import save_compact

    save_safetensors(model, folder / "model.safetensors", metadata)
    files = ["model.safetensors"]
    if "safetensors" in formats:
        save_compact(untied(model.state_dict()), folder / "model.compact.safetensors", metadata,
                     quantized)  # fmt: skip
        files.append("model.compact.safetensors")
    if "onnx" in formats:
        from prunekit.formats.onnx_file import export_onnx
        from prunekit.runtime.outputs import file_sha256

        export_onnx(
            model,
            input_shape,
            folder / "model.onnx",
            {
                **metadata,
                "weights_file": "model.safetensors",
                "weights_sha256": file_sha256(folder / "model.safetensors"),
            },
        )
        assert dense_model is not None
        dense_meta = {**metadata, "pruner": "none (dense baseline)", "sparsity_target": "0.0"}
        dense_meta.pop("sparsity_per_tensor")
        dense_meta["sparsity_achieved"] = "0.0"
        export_onnx(dense_model, input_shape, folder / "dense.onnx", dense_meta, sparse=False)
        files += ["model.onnx", "dense.onnx"]
    return files


def export_file(
    model: str,
    out: Path,
    format: str = "onnx",
    weights: Path | None = None,
    data: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    dense: bool = False,
    trust_checkpoint: bool = False,
    force: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """`prunekit export`: write MODEL (with ``weights``) as ONNX or (compact) safetensors.

    Returns a summary and the warnings (stale files tidied, untrusted or missing weights).
    """
    from prunekit.errors import UsageError
    from prunekit.formats.compact import save_compact
    from prunekit.load.models import default_data, load_model
    from prunekit.runtime.outputs import prepare_output, staged_file

    if format not in {"onnx", "safetensors"}:
        raise UsageError(f"--format {format}: use onnx or safetensors")
    data_spec = data or default_data(model)
    if input_shape is not None:
        from prunekit.formats.onnx_file import check_input_shape

        check_input_shape(input_shape, "--input-shape")
    if input_shape is None and format == "onnx":
        if data_spec is None:
            raise UsageError(f"{model} has no dataset: pass --data SPEC or --input-shape C,H,W")
        from prunekit.load.data import load_data

        input_shape = load_data(data_spec, model_spec=model).input_shape
    notes = prepare_output(out, force, kind="export")
    loaded = load_model(model, weights, num_classes, trust_checkpoint)
    metadata = export_metadata(model, weights, out, data_spec, num_classes)
    with staged_file(out, force, kind="export") as tmp:
        if format == "onnx":
            from prunekit.formats.onnx_file import check_exportable, export_onnx

            assert input_shape is not None
            check_exportable(loaded.model, input_shape, "--input-shape")
            export_onnx(loaded.model, input_shape, tmp, metadata, sparse=not dense,
                        final_name=out.name)  # fmt: skip
        elif dense:
            save_safetensors(loaded.model, tmp, metadata)
        else:
            save_compact(untied(loaded.model.state_dict()), tmp, metadata)
    summary = {"model": model, "format": format, "out": str(out), "bytes": out.stat().st_size}
    return summary, [*notes, *loaded.warnings]


def write_quantized_onnx(
    folder: Path,
    model: nn.Module,
    input_shape: tuple[int, ...],
    metadata: dict[str, str],
    kind: str,
    mode: str,
    quantized: Quantized,
    calibration: list[np.ndarray] | None,
) -> tuple[str, dict[str, Any]]:
    """``model.int8.onnx`` / ``model.int4.onnx`` in ``folder``: the model (its weights on the
    grid) exported in FP32 and quantized by ONNX Runtime (``mode`` static or dynamic), the
    4-bit layers as MatMulNBits with prunekit's codes; return its name and what was done."""
    from prunekit.formats.onnx_quant import export_quantized

    name = f"model.{kind}.onnx"
    info = export_quantized(
        model, input_shape, folder / name, {**metadata, "quantize": kind, "quantize_mode": mode},
        mode, quantized.tensors, calibration,
    )  # fmt: skip
    return name, info
