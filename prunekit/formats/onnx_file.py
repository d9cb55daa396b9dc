"""ONNX export with ``torch.onnx.export`` (the dynamo exporter; needs onnxscript).

The pruned weights are plain tensors with exact zeros (prunekit never leaves
``weight_orig``/``weight_mask`` pairs), so the file holds them as they are. Initializers keep
the PyTorch dotted names; large pruned ones become ``sparse_initializer``s when that is
smaller (ONNX Runtime densifies them when it loads the model: this saves disk and transfer,
not compute). The dense graph passes ``onnx.checker``'s full check (with shape inference);
the sparse-initializer form passes the structural check, since ONNX shape inference does
not type sparse tensors as inputs of dense operators, and is then loaded by ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError

OPSET = 18
INPUT, OUTPUT = "input", "logits"
SINGLE_FILE_LIMIT = 2**31 - 2**20  # protobuf's 2 GiB limit, with some headroom
INDEX_BYTES = 8  # ONNX sparse indices are int64


def check_input_shape(input_shape: object, option: str) -> tuple[int, ...]:
    """The sizes of one sample: integers of at least 1, at most MAX_INPUT_ELEMENTS in all."""
    from prunekit.errors import UsageError
    from prunekit.formats.metadata import MAX_INPUT_ELEMENTS

    shape = tuple(input_shape) if isinstance(input_shape, tuple | list) else ()
    sizes_ok = all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    if not shape or not sizes_ok or np.prod(shape, dtype=np.float64) > MAX_INPUT_ELEMENTS:
        ints = shape and all(isinstance(d, int) for d in shape)
        given = ",".join(map(str, shape)) if ints else repr(input_shape)
        raise UsageError(
            f"{option} {given}: give the sizes of one sample, each at least 1 and at most "
            f"{MAX_INPUT_ELEMENTS:,} elements in all (e.g. 3,32,32)"
        )
    return cast(tuple[int, ...], shape)


def check_exportable(model: object, input_shape: object, option: str = "input_shape") -> None:
    """What an export needs, before torch.onnx runs: a module with float32/float64 finite
    weights off the meta device, and a sample shape it can take (one forward on zeros)."""
    from prunekit.errors import ModelMismatchError, UsageError

    if not isinstance(model, nn.Module):
        raise UsageError(f"the model is a {type(model).__name__}; give a torch.nn.Module")
    shape = check_input_shape(input_shape, option)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise UsageError(f"{name} is on the meta device (no values); load the weights first")
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            raise UsageError(
                f"{name} is {str(tensor.dtype).removeprefix('torch.')}; export a float32 copy "
                "(model.float())"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(f"{name} holds NaN or Inf; an export would compute nothing useful")
    example = torch.zeros(1, *shape, dtype=getattr(model, "input_dtype", torch.float32))
    try:
        with torch.no_grad():
            model.cpu().eval()(example)
    except Exception as exc:  # shape errors come as RuntimeError, ValueError...
        first = (str(exc).splitlines() or [""])[0][:160]
        raise ModelMismatchError(
            f"the model cannot take one sample of shape {shape} ({type(exc).__name__}: "
            f"{first}); give the shape of one input sample"
        ) from None


def to_proto(model: nn.Module, input_shape: tuple[int, ...]):
    """Export ``model`` (CPU, eval) to an ONNX ModelProto with a dynamic batch dimension."""
    import onnx

    model = copy.deepcopy(model).to("cpu").eval()
    dtype = getattr(model, "input_dtype", torch.float32)
    example = (
        torch.ones(2, *input_shape, dtype=dtype)
        if dtype != torch.float32
        else (torch.zeros(2, *input_shape))
    )
    dynamic = {0: torch.export.Dim("batch")}
    if getattr(model, "sequence_axis", None) is not None:
        example = torch.ones(2, input_shape[0], 8, dtype=dtype)  # a length the export varies
        dynamic[cast(int, model.sequence_axis)] = torch.export.Dim("sequence", min=2, max=4096)
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=(dynamic,),
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; report one line
        raise PrunekitError(
            f"torch.onnx.export failed for this model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); run with --debug for details"
        ) from exc
    assert program is not None  # dynamo=True always returns an ONNXProgram
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto


def sparsify_initializers(proto, min_numel: int = 1024) -> list[str]:
    """Move pruned initializers to ``sparse_initializer`` where that makes them smaller."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    moved = []
    for init in list(graph.initializer):
        array = numpy_helper.to_array(init)
        if array.size < min_numel or array.dtype.kind != "f":
            continue
        flat = array.reshape(-1)
        nonzero = np.flatnonzero(flat.view(f"u{flat.itemsize}"))  # bit pattern: keeps -0.0
        if len(nonzero) * (flat.itemsize + INDEX_BYTES) >= flat.nbytes:
            continue
        values = numpy_helper.from_array(flat[nonzero], name=init.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), name=f"{init.name}.indices")
        graph.sparse_initializer.append(
            helper.make_sparse_tensor(values, indices, list(array.shape))
        )
        graph.initializer.remove(init)
        for info in [v for v in graph.value_info if v.name == init.name]:
            graph.value_info.remove(info)
        moved.append(init.name)
    return moved


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: Path,
    metadata: dict[str, str],
    sparse: bool = True,
    final_name: str | None = None,
) -> dict[str, object]:
    """Write a self-contained ``.onnx`` file; return what was done (sizes, sparse tensors)."""
    import onnx

    proto = to_proto(model, input_shape)
    dense_bytes = proto.ByteSize()
    moved = sparsify_initializers(proto) if sparse else []
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    if proto.ByteSize() > SINGLE_FILE_LIMIT:
        # the sidecar is named after the file's final name, not a staging name
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            location=f"{final_name or path.name}.data",
        )
    else:
        onnx.save_model(proto, str(path))
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "dense_graph_bytes": dense_bytes,
        "sparse_initializers": moved,
    }


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set the metadata properties of the ONNX file at ``path`` (rewritten in place)."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save_model(proto, str(path))
