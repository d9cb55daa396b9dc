"""Sensitivity scan on a dev CIFAR ResNet, and one-shot pruning with its per-layer
allocation against uniform global sparsity at the same overall sparsity, same process.

    python benchmarks/bench_sensitivity.py --dev-dir DIR [--model resnet56]
        [--targets 0.8,0.9] [--pruner woodfisher] [--scan-pruner magnitude]

Prints the scan's time, each layer's accuracy drop, and a table: top-1 of uniform global vs
the sensitivity recipe at each target (the difference in points is the recipe's gain). The
chart goes to --chart (default sensitivity-ARCH.png). Dev set: benchmarks/devset.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from devset import DEFAULT_DEV, checked, test_subset

from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import execute
from prunekit.run.sensitivity import LayerScan, allocate, chart, scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--targets", default="0.8,0.9")
    parser.add_argument("--levels", default="0.5,0.7,0.85,0.9,0.95,0.98")
    parser.add_argument("--scan-pruner", default="magnitude")
    parser.add_argument("--pruner", default="woodfisher")
    parser.add_argument("--scan-samples", type=int, default=1000, help="test images per scan eval")
    parser.add_argument("--test-images", type=int, default=3000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chart", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scan-from", type=Path, help="reuse the scan of an earlier --json")
    parser.add_argument("--uniform-mask", default="global", choices=("global", "layer"))
    args = parser.parse_args()
    dev = checked(args.dev_dir, f"{args.model}.safetensors", "calibration.npz", "test.npz")
    targets = [float(t) for t in args.targets.split(",")]
    levels = [float(v) for v in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        subset = test_subset(dev, args.test_images, Path(tmp))
        base = PruneConfig(
            model=f"cifar:{args.model}",
            pruner=args.scan_pruner,
            sparsity=targets[0],
            data=f"tensors:{dev / 'calibration.npz'},{subset}",
            normalize="imagenet",
            weights=dev / f"{args.model}.safetensors",
            device=args.device,
            exports=(),
        )
        started = time.perf_counter()
        if args.scan_from:
            saved = json.loads(args.scan_from.read_text())
            result, scan_seconds = saved["scan"], saved["scan_seconds"]
            levels = result["levels"]
        else:
            result = scan(base, levels, args.scan_samples, lambda t: print(t, file=sys.stderr))
            scan_seconds = time.perf_counter() - started
        chart(result, args.chart or Path(f"sensitivity-{args.model}.png"))
        layers = [LayerScan(lay["name"], lay["weights"],
                            {float(k): v for k, v in lay["accuracy"].items()})
                  for lay in result["layers"]]  # fmt: skip
        dense = result["dense_accuracy"]
        print(f"\n{args.model}: scan by {args.scan_pruner}, {len(layers)} layers x {len(levels)} "
              f"levels on {result['test_samples']} test images: {scan_seconds:.0f} s "
              f"(dense {dense:.2%} on that subset)\n")  # fmt: skip
        print("| layer | weights | " + " | ".join(f"drop at {v:.0%}" for v in levels) + " |")
        print("|---|---|" + "---|" * len(levels))
        for layer in layers:
            drops = [f"{100 * (dense - layer.accuracy[v]):.2f}" for v in levels]
            print(f"| {layer.name} | {layer.weights:,} | " + " | ".join(drops) + " |")
        rows = []
        for target in targets:
            allocation = allocate(layers, dense, target)
            runs = {}
            uniform = f"uniform {args.uniform_mask}"
            for label, overrides in ((uniform, {}), ("sensitivity recipe", allocation)):
                config = dataclasses.replace(
                    base,
                    pruner=args.pruner,
                    sparsity=target,
                    layer_sparsity=overrides,
                    mask=args.uniform_mask,
                )
                report = execute(config).report
                runs[label] = report
                print(f"{target:.0%} {label}: {report['accuracy']['pruned']:.2%} "
                      f"(achieved {report['sparsity']['achieved']:.2%}, "
                      f"{report['seconds']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
            rows.append((target, runs))
        print(f"\n{args.model}, one-shot {args.pruner} (defaults), top-1 on {args.test_images} "
              "test images\n")  # fmt: skip
        print(f"| target | uniform {args.uniform_mask} | sensitivity recipe | gain (points) |")
        print("|---|---|---|---|")
        for target, runs in rows:
            uniform, recipe = (runs[k]["accuracy"]["pruned"] for k in runs)
            first = next(iter(runs.values()))["accuracy"]["dense"]
            print(f"| {target:.0%} (dense {first:.2%}) | {uniform:.2%} | {recipe:.2%} | "
                  f"{100 * (recipe - uniform):+.2f} |")  # fmt: skip
        if args.json:
            saved = {"scan": result, "scan_seconds": scan_seconds, "runs": rows}
            args.json.write_text(json.dumps(saved, default=str))


if __name__ == "__main__":
    main()
