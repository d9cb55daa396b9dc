"""prunekit vs Torch-Pruning (DepGraph) on the same pretrained CIFAR-10 ResNet: structured
pruning to about the same MACs, the same fine-tuning budget (epochs, lr, batch, augmentation,
the calibration images), then top-1, parameters, MACs and ONNX Runtime latency (batch 1 and
32, every model timed interleaved in this process).

Torch-Pruning (``pip install torch-pruning``) is a benchmark-only dependency; prunekit never
imports it. Where it cannot prune a model, the row says what failed. Both round kept
channels to ``--channel-multiple`` (Torch-Pruning's ``round_to``): ONNX Runtime's CPU
convolutions are only faster at multiples of 8. ``--model torchvision:resnet18`` compares
MACs, parameters and latency at 32 x 32 with random weights (nothing is downloaded; no
accuracy, no fine-tuning).

    python benchmarks/bench_torch_pruning.py --dev-dir DIR [--model resnet56] [--fraction 0.5]
        [--pruner layer_obs] [--channel-multiple 8] [--finetune-epochs 5] [--lr 0.01]
        [--test-images 3000] [--runs 30]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from devset import DEFAULT_DEV, checked

import prunekit
from prunekit.engine.schedule import ScheduleConfig
from prunekit.engine.train import TrainConfig, train
from prunekit.load.models import load_model
from prunekit.validate.metrics import accuracy
from prunekit.validate.onnx_runtime import ValidateOptions, latency, open_session

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tensors(path: Path, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(path)
    x = torch.from_numpy(data["x"][:count]).float() / 255
    return (x - MEAN) / STD, torch.from_numpy(data["y"][:count]).long()


def macs_params(model: torch.nn.Module) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    return int(counter.get_total_flops()) // 2, sum(p.numel() for p in model.parameters())


def torch_pruning(model: torch.nn.Module, fraction: float, multiple: int) -> str | None:
    """Group-L1 channel pruning by Torch-Pruning in place; None, or what failed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return "torch-pruning is not installed (pip install torch-pruning)"
    try:
        pruner = tp.pruner.MetaPruner(
            model, torch.zeros(1, 3, 32, 32),
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=fraction, ignored_layers=[_head(model)], round_to=multiple,
        )  # fmt: skip
        pruner.step()
        model(torch.zeros(2, 3, 32, 32))  # the pruned model still runs
    except Exception as exc:  # report whatever it raised
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    return None


def _head(model: torch.nn.Module) -> torch.nn.Module:
    return model.fc if hasattr(model, "fc") else model.linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--fraction", type=float, default=0.5, help="of the channels")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--test-images", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--pruner", default="layer_obs", help="prunekit's criterion")
    parser.add_argument("--channel-multiple", type=int, default=8)
    args = parser.parse_args()
    pretrained = not args.model.startswith("torchvision:")
    needed = (f"{args.model}.safetensors",) if pretrained else ()
    dev = checked(args.dev_dir, *needed, "calibration.npz", "test.npz")
    x, y = tensors(dev / "calibration.npz")
    test = torch.utils.data.TensorDataset(*tensors(dev / "test.npz", args.test_images))
    if pretrained:
        dense = load_model(f"cifar:{args.model}", dev / f"{args.model}.safetensors", 10, False)
    else:  # random weights: speed, MACs and parameters only
        dense = load_model(args.model, num_classes=10)
        args.finetune_epochs = 0
    dense = dense.model
    cpu = torch.device("cpu")
    config = TrainConfig(lr=args.lr)
    rows: dict[str, tuple[torch.nn.Module | None, str]] = {"dense": (dense, "")}

    started = time.perf_counter()
    reference = copy.deepcopy(dense)  # the dense model fine-tuned with the same budget
    train(reference, torch.utils.data.TensorDataset(x, y), epochs=args.finetune_epochs,
          device=cpu, config=config, augment=True)  # fmt: skip
    if args.finetune_epochs:
        rows["dense, fine-tuned the same way"] = (
            reference, f"{time.perf_counter() - started:.0f} s"
        )  # fmt: skip

    started = time.perf_counter()
    tp_model = copy.deepcopy(dense)
    failure = torch_pruning(tp_model, args.fraction, args.channel_multiple)
    if failure is None:
        train(tp_model, torch.utils.data.TensorDataset(x, y), epochs=args.finetune_epochs,
              device=cpu, config=config, augment=True)  # fmt: skip
    rows[f"Torch-Pruning group L1{' + fine-tuning' if args.finetune_epochs else ''}"] = (
        None if failure else tp_model,
        failure or f"{time.perf_counter() - started:.0f} s",
    )
    runs = [("magnitude", False), (args.pruner, False)]
    if args.finetune_epochs:
        runs.append((args.pruner, True))
    for pruner, distill in dict.fromkeys(runs):
        started = time.perf_counter()
        ours = copy.deepcopy(dense)
        prunekit.prune(
            ours, pruner, args.fraction, (x, y), test_data=test, mask="layer",
            structure="channels", distill=distill, channel_multiple=args.channel_multiple,
            schedule=ScheduleConfig(finetune_epochs=args.finetune_epochs, train=config),
        )  # fmt: skip
        tuned = " + fine-tuning" if args.finetune_epochs else ""
        label = f"prunekit {pruner}{tuned}{' with distillation' if distill else ''}"
        rows[label] = (ours, f"{time.perf_counter() - started:.0f} s")

    options = ValidateOptions(batch_sizes=(1, 32), runs=args.runs, warmup=5)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for label, (model, _) in rows.items():
            if model is not None:
                path = Path(tmp) / f"{len(sessions)}.onnx"
                prunekit.export_onnx(model, path, (3, 32, 32), sparse=False)
                sessions[label] = open_session(path, options)
        timed = latency(sessions, (3, 32, 32), options)
    base = timed["dense"]
    print(f"\n{args.model}: {args.fraction:.0%} of the channels, {args.finetune_epochs} epochs of "
          f"fine-tuning (lr {args.lr}, SGD, cosine, batch 64, crop + flip) on the 5,000 "
          f"calibration images; top-1 on {args.test_images} test images; ONNX Runtime CPU "
          f"p50, {args.runs} runs\n")  # fmt: skip
    print("| model | top-1 | MACs | params | speed-up b1 | b32 | time / note |")
    print("|---|---|---|---|---|---|---|")
    for label, (model, note) in rows.items():
        if model is None:
            print(f"| {label} | | | | | | failed: {note} |")
            continue
        macs, params = macs_params(model)
        top1 = f"{100 * accuracy(model, test, cpu):.2f} %" if pretrained else "n/a"
        s1 = base["1"]["p50_ms"] / timed[label]["1"]["p50_ms"]
        s32 = base["32"]["p50_ms"] / timed[label]["32"]["p50_ms"]
        print(f"| {label} | {top1} | {macs / 1e6:.1f} M | {params:,} | {s1:.2f} "
              f"| {s32:.2f} | {note} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
