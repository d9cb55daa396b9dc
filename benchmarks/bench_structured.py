"""Structured (channel) pruning: ONNX Runtime speed-up, parameters and FLOPs removed, and
accuracy one-shot and after fine-tuning, per pruner and fraction of channels.

Needs the CIFAR-10 development set (resnet56.safetensors, calibration.npz, test.npz; built
by benchmarks/get_data.py; pass --dev-dir). ``--model torchvision:resnet18`` measures speed
at 224 x 224 on the calibration images upsampled, with randomly initialised weights (no
pretrained weights are downloaded): its accuracy means nothing there, its speed-up,
parameters and FLOPs do.

    python benchmarks/bench_structured.py [--dev-dir DIR] [--model cifar:resnet56]
        [--pruners magnitude,woodfisher] [--fractions 0.3,0.5] [--mask layer]
        [--finetune-epochs 5] [--lr 0.01] [--no-recalibrate-bn] [--test-images 3000]
        [--param KEY=VALUE ...] [--distill | --no-distill] [--no-augment]
        [--channel-multiple 8] [--exclude conv1.weight] [--no-dense-reference]
        [--recompute auto|K] [--quantize int8] [--adapt-epochs N]

BatchNorm statistics are re-estimated after the schedule (prunekit's default for structured
runs; --no-recalibrate-bn: not): the one-shot column includes it only when there is no
fine-tuning. ``--quantize int8`` also exports each model as static INT8 (ONNX Runtime's
quantizer; the dense reference too) and prints its top-1 and speed-up against the FP32 dense
model.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch
from devset import DEFAULT_DEV, checked, test_subset

from prunekit.engine.schedule import ScheduleConfig
from prunekit.engine.train import TrainConfig
from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import run


def upsampled(source: Path, target: Path, count: int, size: int) -> None:
    """The first ``count`` images of ``source`` resized to size x size (uint8)."""
    data = np.load(source)
    x = torch.from_numpy(data["x"][:count]).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    np.savez(target, x=x.round().clamp(0, 255).to(torch.uint8).numpy(), y=data["y"][:count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--model", default="cifar:resnet56")
    parser.add_argument("--pruners", default="magnitude,woodfisher")
    parser.add_argument("--fractions", default="0.3,0.5")
    parser.add_argument("--mask", default="layer", choices=("layer", "global"))
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction)
    parser.add_argument("--test-images", type=int, default=3000)
    parser.add_argument("--param", action="append", default=[], help="pruner KEY=VALUE")
    parser.add_argument("--runs", type=int, default=200, help="timed ONNX runs per batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--channel-multiple", type=int, default=1)
    parser.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        help="default: prunekit's (off with labels)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="weights left whole (e.g. conv1.weight: "
        "the stem, and so the whole residual stream, of a CIFAR ResNet)",
    )
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, help="default: on")
    parser.add_argument("--recompute", default="auto", help="sub-steps: auto or K")
    parser.add_argument(
        "--dense-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fine-tune the dense model the same way (the reference row)",
    )
    parser.add_argument("--quantize", choices=("int8",), help="also an INT8 export per run")
    parser.add_argument(
        "--adapt-epochs",
        type=int,
        default=0,
        help="first fine-tune the dense model this many epochs (labels) and start every row, "
        "and the distillation teacher, from it: the rows then show what pruning loses, not "
        "what the dense model gains by adapting to these images",
    )
    args = parser.parse_args()
    dev = checked(args.dev_dir)
    cifar = args.model.startswith("cifar:")
    params = dict(p.split("=", 1) for p in args.param)
    with tempfile.TemporaryDirectory() as tmp:
        if cifar:
            calibration = dev / "calibration.npz"
            held_out = test_subset(dev, args.test_images, Path(tmp))
        else:  # latency at 224: a few upsampled images are enough
            calibration, held_out = Path(tmp) / "cal.npz", Path(tmp) / "test.npz"
            upsampled(dev / "calibration.npz", calibration, 256, 224)
            upsampled(dev / "test.npz", held_out, 64, 224)
        arch = args.model.split(":", 1)[1]
        epochs = args.finetune_epochs if cifar else 0  # random weights: nothing to recover
        weights = dev / f"{arch}.safetensors" if cifar else None

        def row_config(fraction: float, pruner: str, epochs: int, out: Path) -> PruneConfig:
            """A row's run from ``weights``; fraction 0 is the dense model, which learns
            from the labels alone: distilling a model into itself would only hold it back."""
            return PruneConfig(
                model=args.model,
                pruner=pruner,
                sparsity=fraction,
                mask=args.mask,
                structure="channels",
                channel_multiple=args.channel_multiple,
                exclude=tuple(args.exclude),
                data=f"tensors:{calibration},{held_out}",
                normalize="imagenet",
                weights=weights,
                num_classes=None if cifar else 10,
                params={k: v for k, v in params.items() if pruner != "magnitude"},
                schedule=ScheduleConfig(
                    finetune_epochs=epochs,
                    recompute=None if args.recompute == "auto" else int(args.recompute),
                    train=TrainConfig(
                        lr=args.lr,
                        distill=args.distill if fraction else False,
                        augment=args.augment,
                    ),
                ),
                recalibrate_bn=args.recalibrate_bn,
                device=args.device,
                out=out,
            )

        if cifar and args.adapt_epochs:  # the dense reference row's run, longer
            adapted = run(row_config(0.0, "magnitude", args.adapt_epochs, Path(tmp) / "adapted"))
            weights = Path(tmp) / "adapted" / "model.safetensors"
            print(f"adapted dense model: {pct(adapted['accuracy']['dense'])} -> "
                  f"{pct(adapted['accuracy']['pruned'])} after {args.adapt_epochs} epoch(s), "
                  f"{adapted['seconds']:.0f} s; every row starts from it\n")  # fmt: skip
        print(f"{args.model}, --structure channels --mask {args.mask}, fine-tuning "
              f"{epochs} epoch(s) on the calibration images, lr {args.lr}, BatchNorm "
              f"{'as trained' if args.recalibrate_bn is False else 're-estimated'}, "
              f"distillation {({None: 'default', True: 'on', False: 'off'})[args.distill]}, "
              f"excluded {', '.join(args.exclude) or 'none'}, augmentation "
              f"{'off' if args.augment is False else 'on'}\n")  # fmt: skip
        int8 = " INT8 top-1 | INT8 speed-up b1 | b32 |" if args.quantize else ""
        print("| pruner | channels removed | params | FLOPs | one-shot top-1 (validation "
              "split when fine-tuned) | fine-tuned top-1 | ORT speed-up b1 | b32 | seconds |"
              f"{int8}")  # fmt: skip
        print("|---" * (12 if args.quantize else 9) + "|")
        dense_row = False
        runs = [(float(f), p) for f in args.fractions.split(",") for p in args.pruners.split(",")]
        if epochs and args.dense_reference:  # the same fine-tuning of the dense model: the
            runs.insert(0, (0.0, "magnitude"))  # fair reference for the fine-tuned columns
        for fraction, pruner in runs:
            config = dataclasses.replace(
                row_config(fraction, pruner, epochs, Path(tmp) / f"{pruner}-{fraction}"),
                exports=("safetensors", "onnx"),
                validate=True,
                validate_runs=args.runs,
                quantize=args.quantize,
            )
            report = run(config)
            s, v = report["structure"], report["validation"]
            if not dense_row:
                dense_row = True
                print(f"| dense | 0 % | {s['parameters']['before']:,} | "
                      f"{s['flops_per_sample']['before'] / 1e6:.1f} M | "
                      f"{pct(report['accuracy']['dense'] if cifar else None)} | | 1.00 | "
                      f"1.00 | |{' | | |' if args.quantize else ''}")  # fmt: skip
            one_shot = report["accuracy"]["pruned"] if not epochs else next(
                (h["validation_accuracy"] for h in report["history"]
                 if "validation_accuracy" in h
                 and h["phase"].startswith("prune")), report["accuracy"]["pruned"],
            )  # fmt: skip
            tuned = report["accuracy"]["pruned"] if config.schedule.finetune_epochs else None
            if not cifar:  # random weights: no accuracy worth printing
                one_shot = tuned = report["accuracy"]["dense"] = None
            label = pruner if fraction else "dense, fine-tuned"
            print(f"| {label} | {s['removed']:.0%} | {s['parameters']['after']:,} | "
                  f"{s['flops_per_sample']['after'] / 1e6:.1f} M | {pct(one_shot)} | "
                  f"{pct(tuned)} | {v['speedup']['1']:.2f} | {v['speedup']['32']:.2f} | "
                  f"{report['seconds']:.0f} |{quantized_cells(v)}", flush=True)  # fmt: skip
            if not v["parity"]["passed"]:
                print(f"  parity FAILED: {v['parity']}", flush=True)


def quantized_cells(validation: dict) -> str:
    """INT8 top-1 and speed-ups (against the FP32 dense model), when there is an INT8 export."""
    q = validation.get("quantized")
    if q is None:
        return ""
    return f" {pct(q['accuracy'])} | {q['speedup']['1']:.2f} | {q['speedup']['32']:.2f} |"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


if __name__ == "__main__":
    main()
