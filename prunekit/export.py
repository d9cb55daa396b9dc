"""Write pruned models: safetensors with the run's metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from prunekit import __version__


def metadata_for(report: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """The ``__metadata__`` strings stored in every file prunekit writes."""
    sparsity = report["sparsity"]
    return {
        "format": "pt",
        "prunekit_version": __version__,
        "model": report["model"],
        "pruner": report["pruner"],
        "sparsity_target": repr(sparsity["target"]),
        "sparsity_achieved": repr(sparsity["achieved"]),
        "sparsity_per_tensor": json.dumps(sparsity["per_tensor"]),
        "config": json.dumps(config, sort_keys=True),
    }


def save_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Save the model's state dict (dense tensors, pruned entries exactly zero)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
