"""`--quantize` through the CLI: the files it writes, their agreement with each other, the
validation and its gates, static vs dynamic, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from prunekit.formats.compact import load_sparse
from prunekit.formats.safetensors_file import read_metadata
from tests.cli_helpers import CNN_HALF, assert_error, invoke, prune, prune_report


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("q") / "run"
    report = prune_report("sample:digits-cnn", "-p", "magnitude", "-s", "0.9", "--quantize",
                          "int8", "--validate", "--out", str(out))  # fmt: skip
    return out, report


def test_int8_run_writes_the_quantized_onnx_and_compact_codes(int8_run):
    out, report = int8_run
    assert (out / "model.int8.onnx").is_file() and report["sizes"]["model.int8.onnx"] > 0
    info = report["quantize"]
    assert info["kind"] == "int8" and info["onnx"]["mode"] == "static"  # images: static
    assert info["onnx"]["float_ops"] == {}  # every Conv and Gemm runs in INT8
    assert set(info["layers"].values()) == {"int8"}
    held = load_file(out / "model.safetensors")
    compact = load_sparse(out / "model.compact.safetensors")
    for name in info["layers"]:
        assert torch.equal(held[name], compact[name])  # codes · scales, bit for bit
        rows = held[name].reshape(held[name].shape[0], -1)
        scale = rows.abs().amax(1, keepdim=True) / 127
        codes = rows / torch.where(scale == 0, torch.ones_like(scale), scale)
        assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the INT8 grid
    assert report["sparsity"]["achieved"] == pytest.approx(0.9, abs=1e-4)  # zeros kept
    raw = load_file(out / "model.compact.safetensors")
    index = json.loads(read_metadata(out / "model.compact.safetensors")["prunekit_sparse"])
    for name in info["layers"]:  # at the information bound: a bit per weight, a byte per code
        assert index[name]["bits"] == 8 and raw[f"{name}::codes"].dtype == torch.int8
        nonzero = int(torch.count_nonzero(held[name]))
        assert raw[f"{name}::codes"].numel() == nonzero
        assert raw[f"{name}::mask"].numel() == (held[name].numel() + 7) // 8
        assert raw[f"{name}::scales"].numel() == held[name].shape[0]


def test_int8_validation_reports_accuracy_speed_and_parity_with_the_fp32_export(int8_run):
    out, report = int8_run
    quantized = report["validation"]["quantized"]
    assert quantized["model"] == str(out / "model.int8.onnx")
    assert quantized["baseline"] == str(out / "dense.onnx")
    parity = quantized["parity_fp32"]
    assert parity["reference"] == str(out / "model.onnx")  # not the staging folder's name
    assert parity["top1_agreement"] > 0.97 and parity["cosine_mean"] > 0.999
    assert set(quantized["speedup"]) == {"1", "32"} and quantized["passed"]
    assert abs(quantized["accuracy"] - report["accuracy"]["pruned"]) < 0.03
    assert report["validation"]["parity"]["passed"]  # model.onnx is the held weights


def test_a_failing_gate_writes_nothing(tmp_path):
    out = tmp_path / "gated"
    result = prune("sample:digits-cnn", "-p", "magnitude", "-s", "0.97", "--quantize", "int8",
                   "--validate", "--max-accuracy-drop", "0.0", "--out", str(out))  # fmt: skip
    assert_error(result, 1, "validation failed, nothing written", "--max-accuracy-drop")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_int4_on_a_cnn_keeps_convolutions_at_int8_and_lists_them(tmp_path):
    out = tmp_path / "q4"
    report = prune_report(*CNN_HALF, "--quantize", "int4", "--rounding", "rtn", "--out", str(out))
    layers = report["quantize"]["layers"]
    assert layers == {"features.0.weight": "int8", "features.2.weight": "int8",
                      "classifier.1.weight": "int4", "classifier.3.weight": "int4"}  # fmt: skip
    assert report["quantize"]["left_int8"] == ["features.0.weight", "features.2.weight"]
    assert any("2 layer(s) stay INT8" in w for w in report["warnings"])
    ops = [n.op_type for n in onnx.load(str(out / "model.int4.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 and "QLinearConv" not in ops  # QDQ convs, 4-bit Gemms


def test_densify_of_a_quantized_compact_file_gives_the_held_weights(int8_run, tmp_path):
    out, _ = int8_run
    result = invoke("densify", str(out / "model.compact.safetensors"), str(tmp_path / "d.st"))
    assert result.exit_code == 0, result.output
    dense, held = load_file(tmp_path / "d.st"), load_file(out / "model.safetensors")
    assert all(torch.equal(dense[k], held[k]) for k in held)


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (("--quantize", "int3"), 2, ("--quantize int3: use int8 or int4",)),
        (("--quantize", "int4", "--group-size", "20"), 2, ("--group-size 20",)),
        (("--quantize", "int4", "--rounding", "exact"), 2, ("--rounding exact",)),
        (("--max-accuracy-drop", "0.01"), 2, ("add --validate",)),
    ],
)
def test_bad_quantize_options(tmp_path, args, code, fragments):
    assert_error(prune(*CNN_HALF, *args, "--out", str(tmp_path / "x")), code, *fragments)
    assert not (tmp_path / "x").exists()


def test_calibration_too_small_for_activation_ranges_says_how_many(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", x=rng.random((30, 1, 8, 8), dtype=np.float32),
             y=rng.integers(0, 10, 30))  # fmt: skip
    result = prune(*CNN_HALF, "--data", f"tensors:{tmp_path / 'small.npz'}", "--quantize",
                   "int8", "--out", str(tmp_path / "x"))  # fmt: skip
    assert_error(result, 2, "calibration split, which has", "needs at least 32")
    assert not (tmp_path / "x").exists()


def _unquantizable(monkeypatch):
    import onnxruntime.quantization as ortq

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported node type CustomWarp in node 'warp_3'")

    monkeypatch.setattr(ortq, "quantize_static", refuse)


def test_a_model_onnx_runtime_cannot_quantize_fails_naming_it_and_writes_nothing(
    tmp_path, monkeypatch
):
    _unquantizable(monkeypatch)
    out = tmp_path / "x"
    result = prune(*CNN_HALF, "--quantize", "int8", "--out", str(out))
    assert_error(result, 1, "could not quantize", "CustomWarp", "--quantize-fallback")
    assert not out.exists()


def test_quantize_fallback_keeps_the_fp32_export_with_a_warning(tmp_path, monkeypatch):
    _unquantizable(monkeypatch)
    out = tmp_path / "x"
    report = prune_report(*CNN_HALF, "--quantize", "int8", "--quantize-fallback",
                          "--out", str(out))  # fmt: skip
    assert (out / "model.onnx").is_file() and not (out / "model.int8.onnx").exists()
    assert report["quantize"]["onnx"]["file"] is None
    assert any("kept the FP32 export only" in w for w in report["warnings"])
