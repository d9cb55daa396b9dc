"""The schemas of what prunekit records in the files it writes, read back through
``prunekit.runtime.schema``: a file may have been edited, so every value is typed and bounded
before it sizes an allocation, names a file or feeds a gate."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, Json, field_validator

from prunekit.formats.safetensors_file import read_metadata
from prunekit.runtime.schema import Lenient, Strict, parsed

# what a model and its inputs can be given as (options, recipes, file metadata): outside these
# bounds a value can only be a mistake
LOAD_BOUNDS = {
    "num_classes": (1, 1_000_000),
    "image_size": (1, 16384),
    "max_length": (1, 1_000_000),
}
# the example a structured record is re-applied with: 3 x 1182 x 1182 at most (a batch of
# one traced through the model; an edited file must not make that allocate gigabytes)
MAX_INPUT_ELEMENTS = 1 << 22
MAX_CHANNELS = 1 << 20  # channels of one group
MAX_DIMS = 8


def _bounded(key: str) -> object:
    low, high = LOAD_BOUNDS[key]
    return Field(default=None, ge=low, le=high, strict=False)  # metadata values are text


Size = Annotated[int, Field(ge=1, le=1 << 20)]
Channel = Annotated[int, Field(ge=0, lt=MAX_CHANNELS)]


class StructureRecord(Strict):
    """``structure`` in a structured run's safetensors metadata: the channels each group kept
    and the input shape (one sample) the groups are traced with."""

    kept: dict[str, Annotated[list[Channel], Field(min_length=1, max_length=MAX_CHANNELS)]]
    input_shape: Annotated[list[Size], Field(min_length=1, max_length=MAX_DIMS)]

    @field_validator("input_shape")
    @classmethod
    def _small_enough(cls, shape: list[int]) -> list[int]:
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"an input of {math.prod(shape):,} elements; at most {MAX_INPUT_ELEMENTS:,}"
            )
        return shape

    @field_validator("kept")
    @classmethod
    def _sorted(cls, kept: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, channels in kept.items():
            if any(a >= b for a, b in itertools.pairwise(channels)):
                raise ValueError(f"the channels kept by {name} are not strictly increasing")
        return kept


class CompactEntry(Strict):
    """One tensor of the compact index (``prunekit_sparse``)."""

    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_DIMS)]
    dtype: str
    bits: Literal[8, 4] | None = None  # a quantized entry: codes times scales
    group_size: Annotated[int, Field(ge=1)] | None = None


class WeightsMetadata(Lenient):
    """What prunekit reads back from a safetensors file's metadata."""

    structure: Json[StructureRecord] | None = None
    prunekit_sparse: Json[dict[str, CompactEntry]] | None = None


Fraction = Annotated[float, Field(ge=0.0, le=1.0, strict=False)]


class ExportMetadata(Lenient):
    """What prunekit reads back from an ONNX export's metadata (all stored as text)."""

    model: str | None = None
    data: str | None = None
    normalize: str | None = None
    num_classes: int | None = _bounded("num_classes")  # type: ignore[assignment]
    image_size: int | None = _bounded("image_size")  # type: ignore[assignment]
    max_length: int | None = _bounded("max_length")  # type: ignore[assignment]
    accuracy_dense: Fraction | None = None
    accuracy_pruned: Fraction | None = None
    weights_file: str | None = None  # beside the export (checked where it is used)
    weights_sha256: str | None = None
    structure: str | None = None  # present on a channel-pruned export


def weights_metadata(path: Path) -> WeightsMetadata:
    """The structure record and compact index of a safetensors file, checked."""
    return parsed(
        WeightsMetadata, read_metadata(path), f"{path}: its metadata", "re-export the weights"
    )


def export_metadata(meta: dict[str, str], path: Path) -> ExportMetadata:
    """The metadata prunekit reads from an ONNX export, checked."""
    return parsed(
        ExportMetadata, meta, f"{path}: its metadata",
        "re-export it with prunekit, or pass the value on the command line",
    )  # fmt: skip
