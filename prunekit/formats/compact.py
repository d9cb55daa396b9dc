"""The compact sparse safetensors form: a bitmask plus the packed non-zero values.

A tensor ``name`` that is cheaper this way is stored as two tensors:

- ``name::mask``: uint8, the non-zero positions (row-major), 8 per byte, least significant
  bit first (``numpy.packbits(..., bitorder="little")``);
- ``name::values``: the non-zero entries in row-major order, in the original dtype.

``__metadata__["prunekit_sparse"]`` is JSON ``{name: {"shape": [...], "dtype": "float32"}}``
naming every tensor so stored; all other tensors are stored as they are. "Non-zero" is
decided on the bit pattern, so -0.0 survives and densifying is bit-exact. Size of an fp32
tensor of sparsity s: (1 - s) + 1/32 of dense.

A quantized weight (``--quantize``) stores its integer codes instead of float values:
``name::mask`` as above, ``name::codes`` (the non-zero codes in order: int8, or for 4 bits
two per byte, low nibble first, as uint8 of code + 8) and ``name::scales`` (float32, one per
output row and group of inputs); the index entry adds ``"bits"`` and ``"group_size"``
(null: one scale per row). Densifying gives codes · scale in float32, the weight exactly as
prunekit held it. Size of a 90 %-sparse INT8 fp32 tensor: 1/32 + 0.1/4 ≈ 0.056 of dense,
plus the scales.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from prunekit.contract.quantization import QuantizedTensor
from prunekit.errors import InputFileError
from prunekit.formats.metadata import CompactEntry, weights_metadata
from prunekit.formats.safetensors_file import read_metadata, write_safetensors
from prunekit.version import __version__

FORMAT_KEY = "prunekit_sparse"
MASK, VALUES, CODES, SCALES = "::mask", "::values", "::codes", "::scales"
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _nonzero_bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_INT_OF_SIZE[t.element_size()]) != 0


def compact_bytes(t: torch.Tensor) -> int:
    """Bytes the tensor would take in compact form."""
    nnz = int(_nonzero_bits(t).sum())
    return nnz * t.element_size() + (t.numel() + 7) // 8


def compact_state(
    state: dict[str, torch.Tensor], quantized: dict[str, QuantizedTensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Split each tensor that gets smaller into mask + values (mask + codes + scales for a
    quantized one); return tensors and the index."""
    out: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if quantized and name in quantized:
            out.update(_quantized_tensors(name, t, quantized[name]))
            index[name] = {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "bits": quantized[name].bits,
                "group_size": quantized[name].group_size,
            }
            continue
        if (
            t.numel() == 0
            or t.element_size() not in _INT_OF_SIZE
            or compact_bytes(t) >= t.numel() * t.element_size()
        ):
            out[name] = t
            continue
        bits = _nonzero_bits(t)
        packed = np.packbits(bits.numpy(), bitorder="little")
        out[name + MASK] = torch.from_numpy(packed)
        out[name + VALUES] = t.reshape(-1)[bits].clone()
        index[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    return out, index


def _quantized_tensors(name: str, t: torch.Tensor, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    codes = q.codes.reshape(-1)
    if not torch.equal(q.dequantized().reshape(t.shape).to(t.dtype), t):
        raise ValueError(f"{name}: the weight is not its codes times its scales")
    bits = codes != 0
    packed = np.packbits(bits.numpy(), bitorder="little")
    kept = codes[bits]
    if q.bits == 4:
        nibbles = (kept.to(torch.int16) + 8).to(torch.uint8)
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, torch.zeros(1, dtype=torch.uint8)])
        kept = nibbles[0::2] | (nibbles[1::2] << 4)
    return {name + MASK: torch.from_numpy(packed), name + CODES: kept.clone(),
            name + SCALES: q.scales.float().contiguous()}  # fmt: skip


def save_compact(
    state: dict[str, torch.Tensor],
    path: Path,
    metadata: dict[str, str],
    quantized: dict[str, QuantizedTensor] | None = None,
) -> None:
    tensors, index = compact_state(state, quantized)
    write_safetensors(tensors, path, {**metadata, FORMAT_KEY: json.dumps(index)})


def load_sparse(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, compact or plain, and return dense tensors (bit-exact)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path} does not exist; check the path")
    index = weights_metadata(path).prunekit_sparse or {}  # checked against its schema
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise InputFileError(
            f"{path} is not a valid safetensors file ({exc}); re-export the weights"
        ) from exc
    try:
        dense = _expand(raw, index)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        detail = f"no tensor {exc}" if isinstance(exc, KeyError) else str(exc)
        raise InputFileError(
            f"{path}: its compact index is inconsistent ({detail}); re-export the weights"
        ) from exc
    return {k: v.to(device) for k, v in dense.items()}


def _expand(
    raw: dict[str, torch.Tensor], index: dict[str, CompactEntry]
) -> dict[str, torch.Tensor]:
    """Dense tensors from the raw ones and the index; ValueError/KeyError where they disagree."""
    dense = {k: v for k, v in raw.items() if not k.endswith((MASK, VALUES, CODES, SCALES))}
    pieces = {k.rsplit("::", 1)[0] for k in raw if k.endswith((MASK, VALUES, CODES, SCALES))}
    orphans = sorted(pieces - set(index))
    if orphans:
        raise ValueError(f"{orphans[0]} is stored compact but {FORMAT_KEY} does not describe it")
    for name, info in index.items():
        numel = int(np.prod(info.shape, dtype=np.int64))
        mask = raw[name + MASK]
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() * 8 < numel:
            raise ValueError(f"{name}{MASK} is too short for shape {info.shape}")
        bits = torch.from_numpy(
            np.unpackbits(mask.numpy(), count=numel, bitorder="little").astype(bool)
        )
        if info.bits is not None:
            dense[name] = _dequantized(name, info, bits, raw)
            continue
        values = raw[name + VALUES]
        if values.dim() != 1 or int(bits.sum()) != values.numel():
            raise ValueError(f"{name}: {values.numel()} values for {int(bits.sum())} mask bits")
        if str(values.dtype).removeprefix("torch.") != info.dtype:
            stored = str(values.dtype).removeprefix("torch.")
            raise ValueError(f"{name}: the values are {stored}, the index says {info.dtype!r}")
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[bits] = values
        dense[name] = flat.reshape(info.shape)
    return dense


def _dequantized(
    name: str, info: CompactEntry, bits: torch.Tensor, raw: dict[str, torch.Tensor]
) -> torch.Tensor:
    """codes · scales of a quantized entry; ValueError where its pieces disagree."""
    width, group, shape = info.bits or 8, info.group_size, info.shape  # (bits is set here)
    if len(shape) < 1 or info.dtype != "float32":
        raise ValueError(f"{name}: a quantized entry must be a float32 weight")
    codes, scales = raw[name + CODES], raw[name + SCALES]
    count = int(bits.sum())
    if width == 4:
        if codes.dtype != torch.uint8 or codes.numel() != (count + 1) // 2:
            raise ValueError(f"{name}: {codes.numel()} packed bytes for {count} codes")
        nibbles = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)[:count]
        codes = (nibbles.to(torch.int16) - 8).to(torch.int8)
    elif codes.dtype != torch.int8 or codes.numel() != count:
        raise ValueError(f"{name}: {codes.numel()} codes for {count} mask bits")
    rows = shape[0]
    columns = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    groups = 1 if group is None else -(-columns // group)
    if scales.dtype != torch.float32 or tuple(scales.shape) != (rows, groups):
        raise ValueError(f"{name}: scales {tuple(scales.shape)}, expected ({rows}, {groups})")
    flat = torch.zeros(rows * columns, dtype=torch.int8)
    flat[bits] = codes
    tensor = QuantizedTensor(flat.reshape(rows, columns), scales, width, group)
    return tensor.dequantized().reshape(shape)


def densify(src: Path, dst: Path) -> None:
    """Write the dense equivalent of ``src`` to ``dst`` (metadata kept, index dropped)."""
    state = load_sparse(src)
    meta = read_metadata(src)
    meta.pop(FORMAT_KEY, None)
    meta["prunekit_version"] = __version__  # what --force may later replace
    write_safetensors(state, dst, meta)


def densify_file(src: Path, dst: Path, force: bool = False) -> list[str]:
    """`prunekit densify`: write ``dst`` atomically; return notes on what killed runs left."""
    from prunekit.runtime.outputs import prepare_output, staged_file

    notes = prepare_output(dst, force, kind="export")
    with staged_file(dst, force, kind="export") as tmp:
        densify(src, tmp)
    return notes
