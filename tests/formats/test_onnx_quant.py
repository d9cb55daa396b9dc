"""Quantized ONNX: ONNX Runtime reads prunekit's codes unchanged, and its outputs match the
dequantized PyTorch model within the quantization step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import prunekit
from prunekit.errors import UsageError
from prunekit.formats.onnx_quant import float_compute_ops


def _mlp(din: int = 32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(din, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(256, din)
    return model, x, model(x).argmax(1).detach()


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]


def test_int4_matmulnbits_computes_the_dequantized_linear_layers(tmp_path):
    model, x, y = _mlp()
    result = prunekit.prune(model, "magnitude", 0.5, (x, y), quantize="int4", group_size=16)
    info = prunekit.export_onnx(model, tmp_path / "m.onnx", (32,), quantized=result.quantized)
    assert info["int4_layers"] == ["0.weight", "2.weight"] and info["float_ops"] == {}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops == ["MatMulNBits", "Relu", "MatMulNBits"]  # weight-only, biases inside
    expected = model(x).detach().numpy()
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), expected, rtol=0, atol=1e-5)


def test_static_int8_reads_prunekits_codes_and_stays_within_the_quantization_step(tmp_path):
    """One Linear layer: with input step s_x and output step s_y (the graph's QuantizeLinear
    scales), each output may differ from the dequantized PyTorch layer by at most
    s_x/2 · Σ|w| (input rounding) + s_y/2 (output rounding) + the int32 bias rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    x = torch.randn(128, 16)
    result = prunekit.prune(model, "magnitude", 0.5, (x, model(x).argmax(1).detach()),
                            quantize="int8")  # fmt: skip
    assert result.quantized is not None
    path = tmp_path / "m.onnx"
    info = prunekit.export_onnx(model, path, (16,), quantized=result.quantized, calibration=x)
    assert info["mode"] == "static" and float_compute_ops(path) == {}
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    codes = result.quantized["0.weight"].codes.numpy()
    assert np.array_equal(inits["0.weight_quantized"], codes)  # ORT took the codes as they are
    scales = [inits[n.input[1]] for n in graph.node if n.op_type == "QuantizeLinear"]
    s_x, s_y = float(scales[0]), float(scales[-1])
    weight = model[0].weight.detach().numpy()
    bias_step = s_x * result.quantized["0.weight"].scales.numpy()[:, 0]  # int32 bias scale
    bound = s_x / 2 * np.abs(weight).sum(1) + s_y / 2 + bias_step / 2
    diff = np.abs(_run(path, x) - model(x).detach().numpy())
    assert (diff <= bound * 1.001 + 1e-6).all(), (diff.max(), bound)
    assert (_run(path, x).argmax(1) == model(x).argmax(1).numpy()).mean() > 0.95


def test_dynamic_int8_without_calibration_data(tmp_path):
    model, x, y = _mlp()
    result = prunekit.prune(model, "magnitude", 0.5, (x, y), quantize="int8")
    info = prunekit.export_onnx(model, tmp_path / "m.onnx", (32,), quantized=result.quantized)
    assert info["mode"] == "dynamic" and info["float_ops"] == {}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    out, expected = _run(tmp_path / "m.onnx", x), model(x).detach().numpy()
    cosine = (
        (out * expected).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() > 0.999


def test_too_little_calibration_data_names_the_count(tmp_path):
    model, x, y = _mlp()
    result = prunekit.prune(model, "magnitude", 0.5, (x, y), quantize="int8")
    with pytest.raises(UsageError, match="has 8 samples; it needs at least 32"):
        prunekit.export_onnx(model, tmp_path / "m.onnx", (32,), quantized=result.quantized,
                             calibration=x[:8])  # fmt: skip
    assert not (tmp_path / "m.onnx").exists()
