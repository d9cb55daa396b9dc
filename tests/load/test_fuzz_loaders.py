"""Fuzzing the loaders: random, truncated and bit-flipped files, and odd arrays, give a result
or a clean prunekit error, never another exception. Bounded (a fixed number of examples per
loader, derandomised) so CI time stays small and repeatable."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from prunekit.errors import PrunekitError
from prunekit.formats.compact import load_sparse, save_compact
from prunekit.load.data import load_data
from prunekit.load.models import load_model, read_state_dict
from prunekit.validate.onnx_runtime import ValidateOptions, open_session, read_onnx_metadata

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one good file per loader, to be truncated and flipped."""
    from safetensors.torch import save_file

    from prunekit.formats.onnx_file import export_onnx

    folder = tmp_path_factory.mktemp("valid")
    model = load_model("sample:digits-mlp").model
    state = model.state_dict()
    files: dict[str, Path] = {
        "pt": folder / "w.pt",
        "safetensors": folder / "w.safetensors",
        "compact": folder / "w.compact.safetensors",
        "npz": folder / "d.npz",
        "onnx": folder / "m.onnx",
    }
    torch.save(state, files["pt"])
    save_file(state, files["safetensors"])
    pruned = {k: v * (torch.rand_like(v) > 0.7) for k, v in state.items()}
    save_compact(pruned, files["compact"], {})
    rng = np.random.default_rng(0)
    np.savez(files["npz"], x=rng.random((12, 1, 8, 8), np.float32), y=np.arange(12) % 10)
    export_onnx(model, (1, 8, 8), files["onnx"], {"model": "sample:digits-mlp"})
    return {kind: path.read_bytes() for kind, path in files.items()}


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """Random bytes, a truncation, or a few flipped bytes of ``original``."""
    how = draw(st.sampled_from(["random", "truncated", "flipped"]))
    if how == "random":
        return draw(st.binary(max_size=4096))
    if how == "truncated":
        return original[: draw(st.integers(0, len(original) - 1))]
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def _loads_or_fails_cleanly(load, path: Path) -> None:
    with contextlib.suppress(PrunekitError):  # any other exception fails the test
        load(path)


SUFFIX = {"pt": ".pt", "safetensors": ".safetensors", "compact": ".safetensors"}


@pytest.mark.parametrize("kind", ["pt", "safetensors", "compact"])
def test_checkpoint_loaders(tmp_path, valid_files, kind):
    @FUZZ
    @given(blob=damaged(valid_files[kind]))
    def run(blob):
        path = tmp_path / f"w{SUFFIX[kind]}"
        path.write_bytes(blob)
        _loads_or_fails_cleanly(read_state_dict, path)
        if kind != "pt":
            _loads_or_fails_cleanly(load_sparse, path)
        _loads_or_fails_cleanly(lambda p: load_model("sample:digits-mlp", p), path)

    run()


def test_data_loader_on_damaged_files(tmp_path, valid_files):
    @FUZZ
    @given(blob=damaged(valid_files["npz"]), suffix=st.sampled_from([".npz", ".pt"]))
    def run(blob, suffix):
        path = tmp_path / f"d{suffix}"
        path.write_bytes(blob)
        _loads_or_fails_cleanly(lambda p: load_data(f"tensors:{p}"), path)

    run()


ARRAYS = hnp.arrays(
    dtype=st.one_of(
        hnp.floating_dtypes(),
        hnp.integer_dtypes(),
        hnp.unsigned_integer_dtypes(),
        hnp.boolean_dtypes(),
        hnp.unicode_string_dtypes(),
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
)


LABELS = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes())


def test_data_loader_on_odd_arrays(tmp_path):
    @FUZZ
    @given(x=ARRAYS, y=st.one_of(st.none(), ARRAYS), label_dtype=LABELS, data=st.data())
    def run(x, y, label_dtype, data):
        if y is None and x.ndim and data.draw(st.booleans()):  # labels that fit x's length
            y = data.draw(hnp.arrays(label_dtype, (len(x),)))
        arrays = {"x": x} if y is None else {"x": x, "y": y}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = tmp_path / "d.npz"
        path.write_bytes(buffer.getvalue())
        _loads_or_fails_cleanly(lambda p: load_data(f"tensors:{p}"), path)

    run()


def test_onnx_loaders(tmp_path, valid_files):
    @FUZZ
    @given(blob=damaged(valid_files["onnx"]))
    def run(blob):
        path = tmp_path / "m.onnx"
        path.write_bytes(blob)
        _loads_or_fails_cleanly(read_onnx_metadata, path)
        _loads_or_fails_cleanly(lambda p: open_session(p, ValidateOptions()), path)

    run()
