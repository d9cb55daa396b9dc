"""Quantized ONNX from an FP32 export, with ONNX Runtime's own quantization tooling.

- ``static``: QDQ INT8 (``quantize_static``): weights per output channel, symmetric (so pruned
  zeros stay exactly zero), activations calibrated (min/max) on calibration batches; for
  CNNs, where ONNX Runtime then runs integer convolutions.
- ``dynamic``: INT8 weights per channel, activation ranges computed per batch at run time
  (``quantize_dynamic``); for transformer encoders, whose activation ranges vary too much for
  fixed ones.
- ``int4``: given Linear weights are written as ONNX Runtime's weight-only 4-bit
  ``MatMulNBits`` (com.microsoft) with prunekit's own codes and scales (its quantizer cannot
  take given codes, so the node is built here); the rest as above (static), or left FP32
  (dynamic: weight-only).

The FP32 model is first pre-processed as ONNX Runtime recommends (shape inference and
graph optimisation: Conv + BatchNorm folded, so the integer kernels see the folded weights).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from prunekit.contract.quantization import QuantizedTensor
from prunekit.errors import PrunekitError, UsageError

MODES = ("static", "dynamic")
CALIBRATION_MIN = 32  # samples for activation ranges, at the least
CALIBRATION_SAMPLES = 256  # samples used for activation ranges
QUANTIZABLE = ("Conv", "Gemm", "MatMul")  # what the exports' compute runs through


class QuantizationError(PrunekitError):
    """ONNX Runtime could not quantize the model."""

    exit_code = 1


def check_calibration(count: int) -> None:
    if count < CALIBRATION_MIN:
        raise UsageError(
            f"--quantize int8 calibrates activation ranges on the calibration split, which has "
            f"{count} samples; it needs at least {CALIBRATION_MIN} (prunekit uses up to "
            f"{CALIBRATION_SAMPLES}): give more data"
        )


class _Batches:
    """An ONNX Runtime CalibrationDataReader over numpy batches."""

    def __init__(self, name: str, batches: Iterable[np.ndarray]) -> None:
        self.name = name
        self.batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}

    def rewind(self) -> None:  # read once
        return None


def quantize_onnx(
    fp32: Path,
    out: Path,
    mode: str,
    calibration: Iterable[np.ndarray] | None = None,
    int4: dict[str, QuantizedTensor] | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write the quantized form of ``fp32`` to ``out``; return what was done.

    ``int4``: target name -> its 4-bit codes; ``weights``: target name -> its (out, in)
    FP32 weight, to find the MatMul that multiplies by it (by value: the exporter may rename
    a transposed weight). Static mode needs ``calibration`` batches.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, out = fp32.absolute(), out.absolute()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, _working_folder(Path(tmp)):
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre))
        except Exception:  # symbolic shape inference fails on some graphs: ORT's own fallback
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        written_int4 = _matmul_nbits(model, int4 or {}, weights or {})
        source = Path(tmp) / "int4.onnx"
        onnx.save(model, str(source))
        try:
            if mode == "static":
                assert calibration is not None
                quantize_static(
                    str(source),
                    str(out),
                    _Batches(model.graph.input[0].name, calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                )
            elif int4:  # weight-only
                onnx.save(model, str(out))
            else:
                quantize_dynamic(
                    str(source), str(out), per_channel=True, weight_type=QuantType.QInt8
                )
        except Exception as exc:  # ORT raises many kinds on graphs it cannot handle
            raise QuantizationError(
                f"ONNX Runtime could not quantize the model ({type(exc).__name__}: "
                f"{(str(exc).splitlines() or [''])[0][:200]}); drop --quantize, or add "
                "--quantize-fallback to keep the FP32 export"
            ) from exc
    left = float_compute_ops(out)
    return {"mode": mode, "int4_layers": written_int4, "float_ops": left}


def input_batches(inputs: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    """The first CALIBRATION_SAMPLES inputs, in batches, for activation ranges."""
    inputs = inputs[:CALIBRATION_SAMPLES]
    return [inputs[i : i + batch] for i in range(0, len(inputs), batch)]


def export_quantized(
    model: Any,
    input_shape: tuple[int, ...],
    path: Path,
    metadata: dict[str, str],
    mode: str,
    quantized: Mapping[str, QuantizedTensor],
    calibration: list[np.ndarray] | None,
) -> dict[str, Any]:
    """``model`` (an nn.Module whose weights are on their grids) exported in FP32 to a
    temporary file beside ``path`` and quantized into ``path`` (``quantize_onnx``: the 4-bit
    layers of ``quantized`` as MatMulNBits), with ``metadata``; what was done."""
    from prunekit.formats.onnx_file import export_onnx, write_metadata

    int4 = {n: q for n, q in quantized.items() if q.bits == 4}
    state = model.state_dict()
    weights = {n: state[n].detach().cpu().reshape(state[n].shape[0], -1).numpy() for n in int4}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, input_shape, fp32, {}, sparse=False)
        info = quantize_onnx(fp32, path, mode, calibration, int4, weights)
    write_metadata(path, metadata)
    return info


@contextlib.contextmanager
def _working_folder(folder: Path) -> Iterator[None]:
    """Run in ``folder``: ONNX Runtime's symbolic shape inference, when it gives up, saves
    ``sym_shape_infer_temp.onnx`` and its external data into the current folder; there they
    go into the temporary folder, removed with it, not into the user's."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def float_compute_ops(path: Path) -> dict[str, int]:
    """Conv / Gemm / MatMul nodes of ``path`` still computing in float: those whose weight
    comes straight from a float initializer (not through DequantizeLinear, not 4-bit)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    left: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZABLE and len(node.input) > 1 and node.input[1] in floats:
            left[node.op_type] = left.get(node.op_type, 0) + 1
    return left


def _matmul_nbits(
    model: Any, int4: dict[str, QuantizedTensor], weights: dict[str, Any]
) -> list[str]:
    """Replace each MatMul by a 4-bit weight of ``int4`` with MatMulNBits carrying its codes."""
    import onnx
    from onnx import helper, numpy_helper

    if not int4:
        return []
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    transposed = {np.ascontiguousarray(weights[n].T).tobytes(): n for n in int4 if n in weights}
    plain = {np.ascontiguousarray(weights[n]).tobytes(): n for n in int4 if n in weights}
    written: list[str] = []
    nodes = []
    for node in graph.node:
        name, bias = _nbits_candidate(node, inits, transposed, plain)
        if name is None:
            nodes.append(node)
            continue
        q = int4[name]
        n, k = q.codes.shape
        block = q.group_size or k
        packed, scales = _pack_nbits(q, block)
        base = f"{name}.q4"
        graph.initializer.extend(
            [
                numpy_helper.from_array(packed, f"{base}.B"),
                numpy_helper.from_array(scales, f"{base}.scales"),
            ]
        )
        inputs = [node.input[0], f"{base}.B", f"{base}.scales"]
        if bias:
            inputs += ["", "", bias]  # (no zero points, no group index), bias
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                list(node.output),
                name=f"{name}.MatMulNBits",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
            )
        )
        written.append(name)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return written


def _nbits_candidate(
    node: Any, inits: dict[str, Any], transposed: dict[bytes, str], plain: dict[bytes, str]
) -> tuple[str | None, str | None]:
    """(target name, bias input) when ``node`` multiplies by a 4-bit target's weight: a MatMul
    by its transpose, or a Gemm A · Wᵀ + bias (no scaling); (None, None) otherwise."""
    from onnx import helper, numpy_helper

    def value(index: int) -> bytes | None:
        init = inits.get(node.input[index]) if len(node.input) > index else None
        return None if init is None else numpy_helper.to_array(init).tobytes()

    if node.op_type == "MatMul" and len(node.input) == 2:
        return transposed.get(value(1) or b""), None
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain_gemm = attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1
        if plain_gemm and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
            name = plain.get(value(1) or b"")
            return name, (node.input[2] if name and len(node.input) > 2 else None)
    return None, None


def _pack_nbits(q: QuantizedTensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B (uint8 [N, blocks, block / 2]: two codes + 8 per byte, low nibble
    first) and scales (float32 [N · blocks])."""
    codes = q.codes.numpy().astype(np.int16) + 8
    n, k = codes.shape
    blocks = -(-k // block)
    padded = np.full((n, blocks * block), 8, dtype=np.int16)
    padded[:, :k] = codes
    pairs = padded.reshape(n, blocks, block // 2, 2).astype(np.uint8)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return np.ascontiguousarray(packed), q.scales.numpy().astype(np.float32).reshape(-1)
