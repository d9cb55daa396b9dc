"""Exports that run faster: dense FP32, pruned FP32 and INT8 (and channels + INT8) of a
pretrained CIFAR-10 ResNet, side by side in one process: top-1 of every ONNX file in ONNX
Runtime on the same test images, p50 latency at batch 1 and 32 (all files timed interleaved,
run by run), speed-up over the dense FP32 export, and file sizes (ONNX and compact
safetensors).

    python benchmarks/bench_quantize.py --dev-dir DIR [--model resnet56] [--sparsity 0.7]
        [--channels 0.5] [--test-images 1000] [--runs 30] [--device auto]

DIR is the CIFAR-10 development folder (resnet*.safetensors, calibration.npz, test.npz;
see benchmarks/devset.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from devset import DEFAULT_DEV, checked, test_subset

from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import run
from prunekit.validate.onnx_runtime import ValidateOptions, latency, open_session


def prune_run(out: Path, dev: Path, data: str, arch: str, pruner: str, sparsity: float,
              **extra) -> dict:  # fmt: skip
    config = PruneConfig(
        model=f"cifar:{arch}", pruner=pruner, sparsity=sparsity, data=data,
        normalize="imagenet", weights=dev / f"{arch}.safetensors",
        exports=("safetensors", "onnx"), quantize="int8", out=out, **extra,
    )  # fmt: skip
    report = run(config)
    print(f"{out.name}: {report['seconds']:.0f} s, PyTorch top-1 before / after rounding "
          f"{report['quantize']['accuracy_before_rounding']:.4f} / "
          f"{report['accuracy']['pruned']:.4f}", file=sys.stderr, flush=True)  # fmt: skip
    return report


def onnx_top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = open_session(path, ValidateOptions())
    logits = np.concatenate(
        [session.run(None, {"input": x[i : i + 256]})[0] for i in range(0, len(x), 256)]
    )
    return float((logits.argmax(1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--sparsity", type=float, default=0.7, help="woodfisher, unstructured")
    parser.add_argument("--channels", type=float, default=0.5, help="--structure channels")
    parser.add_argument("--sparse90", action="store_true", help="also 90 %% magnitude + INT8")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per file and batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dev = checked(args.dev_dir, f"{args.model}.safetensors", "calibration.npz", "test.npz")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subset = test_subset(dev, args.test_images, root)
        data = f"tensors:{dev / 'calibration.npz'},{subset}"
        common = {"dev": dev, "data": data, "arch": args.model, "device": args.device}
        runs = {
            "dense": prune_run(root / "dense", pruner="magnitude", sparsity=0.0, **common),
            "woodfisher": prune_run(root / "wf", pruner="woodfisher", sparsity=args.sparsity,
                                    **common),
            "channels": prune_run(root / "ch", pruner="magnitude", sparsity=args.channels,
                                  structure="channels", mask="layer", **common),
        }  # fmt: skip
        if args.sparse90:
            runs["sparse90"] = prune_run(root / "s90", pruner="magnitude", sparsity=0.9, **common)
        pct = f"{args.sparsity:.0%}"
        files = {
            "dense FP32": root / "dense" / "dense.onnx",
            f"woodfisher {pct} FP32": root / "wf" / "model.onnx",
            "dense INT8": root / "dense" / "model.int8.onnx",
            f"woodfisher {pct} + INT8": root / "wf" / "model.int8.onnx",
            f"{args.channels:.0%} of channels + INT8": root / "ch" / "model.int8.onnx",
        }
        test = np.load(subset)
        mean = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
        x = ((test["x"].astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
        y = test["y"]
        top1 = {label: onnx_top1(path, x, y) for label, path in files.items()}
        options = ValidateOptions(batch_sizes=(1, 32), runs=args.runs, warmup=5)
        sessions = {label: open_session(path, options) for label, path in files.items()}
        timed = latency(sessions, (3, 32, 32), options)
        compact = {
            "dense FP32": root / "dense" / "model.safetensors",
            f"woodfisher {pct} FP32": None,
            "dense INT8": root / "dense" / "model.compact.safetensors",
            f"woodfisher {pct} + INT8": root / "wf" / "model.compact.safetensors",
            f"{args.channels:.0%} of channels + INT8": root / "ch" / "model.compact.safetensors",
        }
        base = timed["dense FP32"]
        print(f"\n{args.model}, {args.test_images} test images, ONNX Runtime CPU "
              f"({args.runs} timed runs per batch size, interleaved)\n")  # fmt: skip
        print("| export | top-1 | p50 b1 (ms) | p50 b32 (ms) | speed-up b1 | b32 | ONNX (MB) "
              "| compact safetensors (MB) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        rows = []
        for label, path in files.items():
            b1, b32 = timed[label]["1"]["p50_ms"], timed[label]["32"]["p50_ms"]
            s1, s32 = base["1"]["p50_ms"] / b1, base["32"]["p50_ms"] / b32
            size = compact[label]
            mb = f"{size.stat().st_size / 1e6:.3f}" if size is not None else ""
            print(f"| {label} | {100 * top1[label]:.2f} % | {b1:.2f} | {b32:.1f} | {s1:.2f}x "
                  f"| {s32:.2f}x | {path.stat().st_size / 1e6:.3f} | {mb} |")  # fmt: skip
            rows.append({"export": label, "top1": top1[label], "p50_ms": {"1": b1, "32": b32},
                         "speedup": {"1": s1, "32": s32},
                         "onnx_bytes": path.stat().st_size})  # fmt: skip
        if args.sparse90:
            ratio = (root / "s90" / "model.compact.safetensors").stat().st_size / (
                root / "dense" / "model.safetensors"
            ).stat().st_size
            print(f"\n90 % sparse INT8 compact safetensors / dense FP32 safetensors: {ratio:.4f}")
        for name, report in runs.items():
            print(f"{name}: PyTorch top-1 FP32 {report['quantize']['accuracy_before_rounding']:.4f}"
                  f" -> INT8 weights {report['accuracy']['pruned']:.4f}; "
                  f"ONNX float ops left {report['quantize']['onnx']['float_ops']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
