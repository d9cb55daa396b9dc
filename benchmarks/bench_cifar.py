"""Accuracy and time of one-shot pruning on the pretrained CIFAR-10 ResNets (no fine-tuning).

Needs the development set: a folder with resnet32/44/56.safetensors, calibration.npz and
test.npz (uint8 images, ImageNet normalisation), built by benchmarks/get_data.py; pass
--dev-dir.

    python benchmarks/bench_cifar.py [--dev-dir DIR] [--device cuda] [--models resnet32,resnet56]
        [--sparsities 0.5,0.7,0.8,0.9] [--test-images 3000]
        [--variant magnitude=magnitude --variant wf-r8=woodfisher,recompute=8 ...]
        [--schedule gradual --steps 4 --finetune-epochs 1 --lr 0.01 --seeds 0,1,2]

A variant is LABEL=PRUNER[,recompute=K|auto][,recalibrate_bn=1][,mask=layer|N:M]
[,KEY=VALUE...] (KEY=VALUE are pruner hyperparameters). Prints one Markdown table of test
accuracy per model (dense in the header), each cell with its seconds; with several seeds,
the mean ± standard deviation. With ``--schedule gradual`` every step is followed by
``--finetune-epochs`` of SGD on the calibration images (the 5,000 training images of the set).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from devset import DEFAULT_DEV, checked, test_subset

from prunekit.engine.schedule import ScheduleConfig
from prunekit.engine.train import TrainConfig
from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import execute

DEFAULT_VARIANTS = [
    "magnitude=magnitude",
    "woodfisher=woodfisher",
    "woodfisher r8=woodfisher,recompute=8",
]


def parse_variant(text: str) -> tuple[str, str, dict[str, str], dict[str, str]]:
    label, _, rest = text.partition("=")
    pruner, *items = rest.split(",")
    params, run = {}, {}
    for item in items:
        key, _, value = item.partition("=")
        (run if key in {"recompute", "recalibrate_bn", "mask"} else params)[key] = value
    return label, pruner, params, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="resnet32,resnet56")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--test-images", type=int, default=3000)
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--json", type=Path, help="also write every run's result here")
    parser.add_argument("--schedule", default="oneshot", choices=("oneshot", "gradual"))
    parser.add_argument("--steps", type=int, default=1, help="pruning steps (gradual)")
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    args = parser.parse_args()
    dev = checked(args.dev_dir)
    variants = [parse_variant(v) for v in args.variant or DEFAULT_VARIANTS]
    seeds = [int(s) for s in args.seeds.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        subset = test_subset(dev, args.test_images, Path(tmp))
        data = f"tensors:{dev / 'calibration.npz'},{subset}"
        for arch in args.models.split(","):
            rows: dict[str, dict[float, list[dict]]] = {}
            dense = None
            runs = [(v, s, seed) for v in variants for s in sparsities for seed in seeds]
            for (label, pruner, params, run), s, seed in runs:
                recompute = run.get("recompute", "auto")
                config = PruneConfig(
                    model=f"cifar:{arch}",
                    pruner=pruner,
                    sparsity=s,
                    mask=run.get("mask", "global"),
                    data=data,
                    normalize="imagenet",
                    weights=dev / f"{arch}.safetensors",
                    params=params,
                    schedule=ScheduleConfig(
                        kind=args.schedule,
                        steps=args.steps,
                        finetune_epochs=args.finetune_epochs,
                        recompute=None if recompute == "auto" else int(recompute),
                        train=TrainConfig(lr=args.lr),
                    ),
                    seed=seed,
                    recalibrate_bn=run.get("recalibrate_bn", "0") in {"1", "true"},
                    device=args.device,
                    exports=(),
                )
                report = execute(config).report
                dense = report["accuracy"]["dense"]
                rows.setdefault(label, {}).setdefault(s, []).append(report)
                results.append({"model": arch, "variant": label, "seed": seed, "report": report})
                print(
                    f"{arch} {label} {s:.0%} seed {seed}: "
                    f"{report['accuracy']['pruned']:.2%} in "
                    f"{report['seconds']:.1f} s {report.get('phases', {})}",
                    file=sys.stderr,
                    flush=True,
                )
            print_tables(arch, dense, sparsities, rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


def print_tables(arch: str, dense: float | None, sparsities, rows) -> None:
    labels = list(rows)
    print(f"\n{arch} (dense {dense:.2%}): top-1 % (seconds per run)\n")
    print("| sparsity | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for s in sparsities:
        cells = []
        for label in labels:
            reports = rows[label][s]
            acc = [100 * r["accuracy"]["pruned"] for r in reports]
            seconds = statistics.mean(r["seconds"] for r in reports)
            spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
            cells.append(f"{statistics.mean(acc):.2f}{spread} ({seconds:.0f} s)")
        print(f"| {s:.0%} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
