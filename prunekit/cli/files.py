"""`prunekit export`, `densify` and `validate`: one library call each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunekit.cli.common import (
    console,
    exit_if_failed,
    handle_errors,
    number_list,
    print_json,
    warn,
)
from prunekit.cli.options import (
    FORCE,
    GATES,
    JSON,
    NUM_CLASSES,
    PREPROCESS,
    TRUST,
    VALIDATE_TIMING,
    with_options,
)
from prunekit.cli.prune import MODEL_HELP
from prunekit.cli.summary import print_validation


@handle_errors
@with_options(NUM_CLASSES, TRUST, FORCE, JSON)
def export(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Output file (.onnx or .safetensors).")],
    format: Annotated[str, typer.Option("--format", help="onnx or safetensors.")] = "onnx",
    weights: Annotated[Path | None, typer.Option(help="State dict (plain or compact).")] = None,
    data: Annotated[
        str | None, typer.Option(help="Dataset spec that fixes the input shape.")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="Input shape without batch, e.g. 3,32,32.")
    ] = None,
    dense: Annotated[
        bool, typer.Option("--dense", help="Write dense tensors / initializers only.")
    ] = False,
    options: dict | None = None,
) -> None:
    """Export MODEL (e.g. a pruned model.safetensors) to ONNX or compact safetensors.

    Examples:

        prunekit export sample:digits-cnn --weights run/model.safetensors --out m.onnx

        prunekit export sample:digits-cnn --weights run/model.safetensors
        --format safetensors --out m.compact.safetensors
    """
    from prunekit.run.exports import export_file

    assert options is not None
    shape = number_list(input_shape, "--input-shape") if input_shape else None
    summary, warnings = export_file(
        model, out, format, weights, data, shape, options["num_classes"], dense,
        options["trust_checkpoint"], options["force"],
    )  # fmt: skip
    warn(warnings)
    if options["as_json"]:
        print_json(summary)
    else:
        console.print(f"wrote {out} ({summary['bytes']:,} bytes)")


@handle_errors
@with_options(FORCE)
def densify(
    src: Annotated[Path, typer.Argument(help="Compact (or plain) safetensors file.")],
    dst: Annotated[Path, typer.Argument(help="Dense safetensors file to write.")],
    options: dict | None = None,
) -> None:
    """Write the dense tensors of a compact safetensors file, bit for bit.

    Example: prunekit densify run/model.compact.safetensors dense.safetensors
    """
    from prunekit.formats.compact import densify_file

    assert options is not None
    warn(densify_file(src, dst, options["force"]))
    console.print(f"wrote {dst} ({dst.stat().st_size:,} bytes)")


@handle_errors
@with_options(PREPROCESS, NUM_CLASSES, GATES, VALIDATE_TIMING, JSON)
def validate(
    onnx_file: Annotated[Path, typer.Argument(help="The ONNX model to validate.")],
    baseline: Annotated[Path | None, typer.Option(help="Dense ONNX model timed alongside.")] = None,
    data: Annotated[
        str | None, typer.Option(help="Dataset spec (default: from the file's metadata).")
    ] = None,
    torch_model: Annotated[
        str | None, typer.Option("--torch", help="PyTorch model spec for the parity check.")
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="Weights for the parity check (of --torch, or of the recorded spec)."),
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, e.g. 1,32.")] = "1,32",
    provider: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    options: dict | None = None,
) -> None:
    """Check an ONNX export in ONNX Runtime: accuracy, parity with PyTorch, latency.

    Exits 1 when parity fails, accuracy drops more than --max-accuracy-drop or the cosine
    similarity to the dense outputs is below --min-cosine. Without
    --torch, the parity check uses the model spec and weights file recorded by prunekit
    next to the ONNX file, when there are any.

    Example: prunekit validate run/model.onnx --baseline run/dense.onnx --max-accuracy-drop 0.01
    """
    from prunekit.validate.onnx_runtime import ValidateOptions, validate_file

    assert options is not None
    settings = ValidateOptions(
        batch_sizes=number_list(batch_sizes, "--batch-sizes"),
        threads=options["validate_threads"] or 0,
        provider=provider,
        runs=options["validate_runs"],
        max_accuracy_drop=options["max_accuracy_drop"],
        min_cosine=options["min_cosine"],
    )
    result, warnings = validate_file(
        onnx_file, settings, baseline, data, options["normalize"], options["image_size"],
        torch_model, weights, options["num_classes"],
    )  # fmt: skip
    warn(warnings)
    if options["as_json"]:
        print_json(result)
    else:
        print_validation(result)
    exit_if_failed(result)
