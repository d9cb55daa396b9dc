"""ONNX export and ONNX Runtime validation: outputs, sparsity, sparse initializers, gates."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from prunekit.cli import app
from prunekit.engine.masks import find_targets, sparsity_of
from prunekit.engine.step import Pruning, oneshot
from prunekit.formats.onnx_file import export_onnx
from prunekit.load.data import load_data
from prunekit.load.models import load_model
from prunekit.pruners import registry
from prunekit.validate.onnx_runtime import ValidateOptions, open_session, run_logits, torch_logits
from tests.cli_helpers import assert_error, runner

pytestmark = pytest.mark.slow


def onnx_sparsity(path: Path) -> dict[str, float]:
    """Fraction of exact zeros of every float initializer, dense or sparse, by name."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    out = {}
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.size:
            out[init.name] = float((array == 0).sum()) / array.size
    for sparse in proto.graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        numel = int(np.prod(sparse.dims))
        out[sparse.values.name] = 1.0 - float((values != 0).sum()) / numel
    return out


SAMPLES = ["digits-mlp", "digits-cnn", "digits-resnet"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each sample model, dense and pruned to 90 % by magnitude, exported to ONNX."""
    folder = tmp_path_factory.mktemp("onnx")
    data = load_data("digits")
    out = {}
    for name in SAMPLES:
        for state in ("dense", "pruned"):
            model = load_model(f"sample:{name}").model
            targets, _ = find_targets(model)
            if state == "pruned":
                oneshot(
                    Pruning.of(
                        model,
                        targets,
                        registry.create("magnitude"),
                        data.calibration,
                        torch.device("cpu"),
                    ),
                    0.9,
                )
            path = folder / f"{name}-{state}.onnx"
            info = export_onnx(model, data.input_shape, path, {"pruner": "magnitude"})
            out[name, state] = (model, targets, path, info)
    return out, data


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("state", ["dense", "pruned"])
def test_onnx_runtime_matches_pytorch(exported, name, state):
    models, data = exported
    model, _, path, info = models[name, state]
    session = open_session(path, ValidateOptions())
    logits, _ = run_logits(session, data.test)
    reference = torch_logits(model, data.test)
    assert np.abs(logits - reference).max() <= 1e-4
    assert (logits.argmax(1) == reference.argmax(1)).all()
    if state == "pruned":  # large pruned initializers went sparse and ORT still agrees
        assert info["sparse_initializers"]


@pytest.mark.parametrize("name", SAMPLES)
def test_sparsity_read_back_from_onnx_equals_pytorch(exported, name):
    models, _ = exported
    _, targets, path, _ = models[name, "pruned"]
    _, per_tensor = sparsity_of(targets)
    from_onnx = onnx_sparsity(path)
    for tensor, fraction in per_tensor.items():
        assert from_onnx[tensor] == pytest.approx(fraction, abs=1e-12), tensor


def test_onnx_file_is_single_checked_and_carries_metadata(exported):
    models, _ = exported
    _, _, path, _info = models["digits-cnn", "pruned"]
    assert not list(path.parent.glob("*.data"))  # no external-data sidecar
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {p.key: p.value for p in proto.metadata_props}["pruner"] == "magnitude"
    assert proto.opset_import[0].version >= 18
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param  # dynamic batch dimension
    names = {i.name for i in proto.graph.initializer} | {
        s.values.name for s in proto.graph.sparse_initializer
    }
    assert "classifier.1.weight" in names and not any("weight_orig" in n for n in names)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = runner.invoke(
        app,
        [
            "prune",
            "sample:digits-cnn",
            "-p",
            "magnitude",
            "-s",
            "0.95",
            "--validate",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_prune_validate_adds_validation_to_report(pruned_run):
    out, report = pruned_run
    v = report["validation"]
    assert v["passed"] and v["parity"]["top1_agreement"] == 1.0
    assert v["parity"]["max_abs_diff"] <= 1e-4
    assert v["accuracy"] == pytest.approx(report["accuracy"]["pruned"])
    assert v["baseline_accuracy"] == pytest.approx(report["accuracy"]["dense"])
    assert set(v["latency"]["model"]) == {"1", "32"}
    assert {"p50_ms", "p90_ms", "p99_ms", "throughput_per_s"} <= set(v["latency"]["model"]["1"])
    assert json.loads((out / "report.json").read_text())["validation"]["passed"]
    sizes = report["sizes"]
    assert sizes["model.onnx"] < sizes["dense.onnx"] / 2
    assert sizes["model.compact.safetensors"] < sizes["model.safetensors"] / 5


def test_accuracy_gate_fails_with_exit_1(pruned_run):
    out, report = pruned_run
    drop = report["accuracy"]["dense"] - report["accuracy"]["pruned"]
    assert drop > 0.01  # 95 % magnitude on the CNN loses accuracy
    base = [
        "validate",
        str(out / "model.onnx"),
        "--baseline",
        str(out / "dense.onnx"),
        "--runs",
        "5",
        "--json",
    ]
    failing = runner.invoke(app, [*base, "--max-accuracy-drop", "0.005"])
    assert failing.exit_code == 1
    assert "accuracy dropped by" in failing.stderr
    assert json.loads(failing.stdout)["passed"] is False
    passing = runner.invoke(app, [*base, "--max-accuracy-drop", "0.5"])
    assert passing.exit_code == 0, passing.output
    assert json.loads(passing.stdout)["parity"]["passed"]  # found model.safetensors beside it


def test_export_and_densify_commands(pruned_run, tmp_path):
    from safetensors.torch import load_file

    out, _ = pruned_run
    compact = tmp_path / "m.compact.safetensors"
    result = runner.invoke(
        app,
        [
            "export",
            "sample:digits-cnn",
            "--weights",
            str(out / "model.safetensors"),
            "--format",
            "safetensors",
            "--out",
            str(compact),
        ],
    )
    assert result.exit_code == 0, result.output
    dense = tmp_path / "dense.safetensors"
    assert runner.invoke(app, ["densify", str(compact), str(dense)]).exit_code == 0
    original, back = load_file(out / "model.safetensors"), load_file(dense)
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    onnx_path = tmp_path / "again.onnx"
    result = runner.invoke(
        app, ["export", "sample:digits-cnn", "--weights", str(compact), "--out", str(onnx_path)]
    )
    assert result.exit_code == 0, result.output
    assert onnx_sparsity(onnx_path)["classifier.1.weight"] == pytest.approx(
        json.loads((out / "report.json").read_text())["sparsity"]["per_tensor"][
            "classifier.1.weight"
        ]
    )
    again = runner.invoke(app, ["densify", str(compact), str(dense)])
    assert_error(again, 2, "already exists", "--force")


def test_validate_bad_inputs(pruned_run, tmp_path):
    out, _ = pruned_run
    model = str(out / "model.onnx")
    corrupt = tmp_path / "bad.onnx"
    corrupt.write_bytes(b"not a model at all")
    assert_error(runner.invoke(app, ["validate", str(corrupt)]), 2, "is not an ONNX model")
    assert_error(runner.invoke(app, ["validate", str(tmp_path / "none.onnx")]), 2, "does not exist")
    x = torch.zeros(10, 3, 4, 4)
    torch.save({"x": x, "y": torch.zeros(10, dtype=torch.long)}, tmp_path / "d.pt")
    assert_error(
        runner.invoke(app, ["validate", model, "--data", f"tensors:{tmp_path}/d.pt"]),
        1,
        "expects inputs of shape ['batch', 1, 8, 8]",
        "samples of shape [3, 4, 4]",
    )
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert_error(
            runner.invoke(app, ["validate", model, "--provider", "cuda"]),
            2,
            "CUDAExecutionProvider is not available here (available:",
            "CPUExecutionProvider",
        )
    assert_error(
        runner.invoke(app, ["validate", model, "--torch", "sample:digits-mlp"]),
        1,
        "does not match the PyTorch model",
    )
    assert_error(
        runner.invoke(app, ["validate", model, "--batch-sizes", "0,32"]), 2, "must be from 1 to"
    )


def test_the_accuracy_gate_never_trusts_recorded_numbers(pruned_run, tmp_path):
    """The dense accuracy a gate compares with is measured now (dense.onnx beside the export),
    so an edited accuracy_dense in the metadata changes nothing; without a dense model the
    gate asks for --baseline."""
    import shutil

    import onnx

    out, report = pruned_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    proto = onnx.load(str(copy / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**meta, "accuracy_dense": "0.0"})  # "no drop possible"
    onnx.save_model(proto, str(copy / "model.onnx"))
    args = ["validate", str(copy / "model.onnx"), "--runs", "2", "--json"]
    failing = runner.invoke(app, [*args, "--max-accuracy-drop", "0.005"])
    assert failing.exit_code == 1 and "accuracy dropped by" in failing.stderr
    result = json.loads(failing.stdout)
    assert result["baseline"] == str(copy / "dense.onnx")
    assert result["baseline_accuracy"] == pytest.approx(report["accuracy"]["dense"])
    (copy / "dense.onnx").unlink()
    missing = runner.invoke(app, [*args, "--max-accuracy-drop", "0.005"])
    assert missing.exit_code == 2 and "pass --baseline DENSE.onnx" in missing.stderr
