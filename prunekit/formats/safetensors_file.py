"""safetensors reads and writes with prunekit's errors: OSError for a failed write (disk
full, permission), InputFileError for a file that is not safetensors."""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from prunekit.errors import InputFileError


def tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The names whose tensor is an earlier name's tensor (tied weights, e.g. a decoder's
    output projection and its token embeddings): alias -> the first name."""
    first: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), t.stride())
        if t.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
    return aliases


def untied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor stored once, under its first name (as
    save_pretrained does; loading re-ties it)."""
    aliases = tied_aliases(state)
    return {k: v for k, v in state.items() if k not in aliases}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]):
    """safetensors' save_file; its Rust I/O errors come back as OSError with their errno."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"(?:code: |os error )(\d+)", str(exc))
        number = int(code[1]) if code else errno.EIO
        raise OSError(number, f"writing safetensors failed: {exc}", str(path)) from exc


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputFileError(f"{path} is not a valid safetensors file ({exc})") from exc
