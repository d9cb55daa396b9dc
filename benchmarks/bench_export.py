"""Sizes of the sparse formats and ONNX Runtime latency, pruned vs dense, in one process.

    python benchmarks/bench_export.py [--runs 2000] [--threads 0]

Sizes: magnitude pruning (global) of each sample model at 50 / 90 / 95 %, the files written
by `prunekit prune --export safetensors,onnx`, and the bitmask lower bound
Σ_t ((1 - s_t) + 1/32) · bytes_t over the tensors stored compactly (others at full size).
Latency: dense.onnx vs model.onnx at 90 %, interleaved in one process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from safetensors import safe_open

from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import run
from prunekit.validate.onnx_runtime import ValidateOptions, latency, open_session

MODELS = ("digits-mlp", "digits-cnn", "digits-resnet")


def bitmask_bound(dense_file: Path, compact_file: Path) -> float:
    with safe_open(str(compact_file), framework="pt") as f:
        compact_names = {k.split("::")[0] for k in f.keys() if "::" in k}  # noqa: SIM118
    total = 0.0
    with safe_open(str(dense_file), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            size = t.numel() * t.element_size()
            if name in compact_names:
                total += ((t != 0).sum().item() / t.numel() + 1 / 32) * size
            else:
                total += size
    return total


def header_bytes(path: Path) -> int:
    """The safetensors header (JSON index + metadata), 8 + its declared length."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def large_model_sizes(root: Path) -> None:
    """torchvision resnet18 (11.7 M weights, random init): compact vs bound at scale."""
    import torch
    from torchvision.models import resnet18

    from prunekit.engine.masks import apply, find_targets, select
    from prunekit.formats.compact import save_compact
    from prunekit.run.exports import save_safetensors

    print("\n| torchvision resnet18 | dense | compact | compact / dense | compact / bound |")
    print("|---|---|---|---|---|")
    for s in (0.5, 0.9, 0.95):
        torch.manual_seed(0)
        model = resnet18()
        targets, _ = find_targets(model)
        apply(targets, select(targets, {t.name: t.weight.abs() for t in targets}, s))
        dense, compact = root / f"r18-{s}.safetensors", root / f"r18-{s}.compact.safetensors"
        save_safetensors(model, dense, {})
        save_compact(model.state_dict(), compact, {})
        d, c = dense.stat().st_size, compact.stat().st_size
        print(
            f"| {s:.0%} | {d:,} | {c:,} | {c / d:.4f} | {c / bitmask_bound(dense, compact):.4f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    print(
        "| model | sparsity | dense .safetensors | compact .safetensors | compact / bound | "
        "tensor data / bound | dense .onnx | sparse .onnx |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        for s in (0.5, 0.9, 0.95):
            out = root / f"{name}-{s}"
            report = run(
                PruneConfig(
                    model=f"sample:{name}",
                    pruner="magnitude",
                    sparsity=s,
                    exports=("safetensors", "onnx"),
                    out=out,
                )
            )
            sizes = report["sizes"]
            bound = bitmask_bound(out / "model.safetensors", out / "model.compact.safetensors")
            dense, compact = sizes["model.safetensors"], sizes["model.compact.safetensors"]
            data = compact - header_bytes(out / "model.compact.safetensors")
            print(
                f"| {name} | {s:.0%} | {dense:,} | {compact:,} ({compact / dense:.3f}) | "
                f"{compact / bound:.3f} | {data / bound:.3f} | {sizes['dense.onnx']:,} | "
                f"{sizes['model.onnx']:,} ({sizes['model.onnx'] / sizes['dense.onnx']:.3f}) |"
            )
    large_model_sizes(root)
    options = ValidateOptions(threads=args.threads, runs=args.runs)
    print(
        "\n| model | batch | dense p50 ms | 90 % pruned p50 ms | ratio | dense p99 | pruned p99 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        out = root / f"{name}-0.9"
        sessions = {
            "dense": open_session(out / "dense.onnx", options),
            "pruned": open_session(out / "model.onnx", options),
        }
        timing = latency(sessions, (1, 8, 8), options)
        for batch in ("1", "32"):
            d, p = timing["dense"][batch], timing["pruned"][batch]
            print(
                f"| {name} | {batch} | {d['p50_ms']:.4f} | {p['p50_ms']:.4f} | "
                f"{p['p50_ms'] / d['p50_ms']:.2f} | {d['p99_ms']:.4f} | {p['p99_ms']:.4f} |"
            )


if __name__ == "__main__":
    main()
