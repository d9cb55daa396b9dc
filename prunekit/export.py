"""Write pruned models: safetensors with the run's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from prunekit import __version__
from prunekit.safetensors_io import read_metadata, write_safetensors

__all__ = ["read_metadata", "save_safetensors", "write_exports"]

EXPORT_FORMATS = ("safetensors", "onnx")


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
    for key in ("dense", "pruned"):
        if report["accuracy"][key] is not None:
            meta[f"accuracy_{key}"] = repr(report["accuracy"][key])
    return meta


def save_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Save the model's state dict (dense tensors, pruned entries exactly zero)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    write_safetensors(state, path, metadata)


def write_exports(
    folder: Path,
    model: nn.Module,
    dense_model: nn.Module | None,
    input_shape: tuple[int, ...],
    metadata: dict[str, str],
    formats: tuple[str, ...],
) -> list[str]:
    """Write the run's files into ``folder``; return their names.

    Always ``model.safetensors`` (dense tensors, pruned entries zero). ``safetensors`` adds
    ``model.compact.safetensors`` (bitmask form); ``onnx`` adds ``model.onnx`` (pruned
    initializers stored sparse where smaller) and ``dense.onnx``, the unpruned baseline.
    """
    from prunekit.compact import save_compact

    save_safetensors(model, folder / "model.safetensors", metadata)
    files = ["model.safetensors"]
    if "safetensors" in formats:
        save_compact(model.state_dict(), folder / "model.compact.safetensors", metadata)
        files.append("model.compact.safetensors")
    if "onnx" in formats:
        from prunekit.onnx_export import export_onnx
        from prunekit.validate import file_sha256

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
