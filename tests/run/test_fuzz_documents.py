"""Fuzzing what prunekit reads from documents: recipes, the structure record and compact
index of safetensors files, an ONNX export's metadata. Every random or mutated document gives
a result or a one-line prunekit error, never another exception (bounded, derandomised)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.errors import PrunekitError
from prunekit.formats.metadata import export_metadata
from prunekit.load.models import load_model
from prunekit.run.pipeline import check
from prunekit.run.recipe import config_from, load_recipe
from tests.cli_helpers import prune_report

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _clean(call) -> None:
    with contextlib.suppress(PrunekitError):  # any other exception fails the test
        call()


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory) -> tuple[dict, Path]:
    """A structured run of the digits CNN: its recipe and its weights file."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    report = prune_report("sample:digits-cnn", "-p", "woodfisher", "-s", "0.3", "--structure",
                          "channels", "--param", "num_grads=16", "--out", str(out))  # fmt: skip
    return report["recipe"], out / "model.safetensors"


@st.composite
def mutated(draw, original: dict) -> dict:
    """``original`` with a few keys (nested ones too) replaced by random JSON, or added."""
    document = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        table = document
        while True:
            keys = sorted(table)
            key = draw(st.sampled_from([*keys, draw(st.text(max_size=8))]))
            if isinstance(table.get(key), dict) and draw(st.booleans()):
                table = table[key]
                continue
            table[key] = draw(JSON)
            break
    return document


def test_recipes(tmp_path, structured_run):
    recipe, _ = structured_run

    @FUZZ
    @given(document=mutated(recipe) | JSON, as_toml=st.booleans())
    def run(document, as_toml):
        if isinstance(document, dict):
            _clean(lambda: check(config_from(document, "fuzzed")))
        path = tmp_path / ("r.toml" if as_toml else "r.json")
        path.write_text(json.dumps(document) if not as_toml else _tomlish(document))
        _clean(lambda: check(config_from(load_recipe(path), str(path))))

    run()


def _tomlish(document: object) -> str:
    """Text that is often TOML (top-level scalars as key = JSON value) and sometimes not."""
    if not isinstance(document, dict):
        return json.dumps(document)
    return "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in document.items())


def test_structure_records_and_compact_indexes(tmp_path, structured_run):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, weights = structured_run
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = dict(f.metadata())
    record = json.loads(meta["structure"])

    @FUZZ
    @given(
        key=st.sampled_from(["structure", "prunekit_sparse"]),
        value=st.one_of(mutated(record).map(json.dumps), JSON.map(json.dumps), st.text()),
    )
    def run(key, value):
        path = tmp_path / "w.safetensors"
        save_file(tensors, str(path), {**meta, key: value})
        _clean(lambda: load_model("sample:digits-cnn", path))

    run()


ONNX_KEYS = ["model", "data", "normalize", "num_classes", "image_size", "max_length",
             "accuracy_dense", "accuracy_pruned", "weights_file", "weights_sha256"]  # fmt: skip


def test_onnx_export_metadata(tmp_path):
    @FUZZ
    @given(
        meta=st.dictionaries(
            st.sampled_from(ONNX_KEYS) | st.text(max_size=8),
            st.text(max_size=30) | st.integers().map(str) | st.floats().map(repr),
            max_size=6,
        )
    )
    def run(meta):
        _clean(lambda: export_metadata(meta, tmp_path / "m.onnx"))

    run()
