"""One command for the moments a GPU is at hand: the CUDA tests, then real pruning runs on the
device with their time, statistics passes and planned vs measured memory peak, written as one
JSON and one markdown summary. ``--device cpu --small`` runs the same script on tiny models (CI
runs it), so it is known to work before any GPU is seen.

    python benchmarks/gpu_check.py [--device cuda] [--small] [--out gpu-check]
        [--dev-dir DIR] [--minilm DIR --text FILE] [--budget-minutes 8]

Full mode adds: torchvision resnet50 at 224 x 224 (random weights, random images: speed and
memory only) with woodfisher's defaults; the dev ResNet-56 with woodfisher and fishleg (their
time ratio; needs --dev-dir); MiniLM with sparsegpt and woodfisher (needs --minilm and --text).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def cuda_tests(device: str) -> dict[str, Any]:
    """``pytest -m cuda`` over the project's tests (only where there is a CUDA device)."""
    if device != "cuda":
        return {"ran": False, "why": "no CUDA device: the CUDA tests need one"}
    start = time.perf_counter()
    paths = ["tests", "plugins/prunekit-fishleg/tests", "plugins/prunekit-example/tests"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *paths],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    tail = done.stdout.strip().splitlines()[-30:]
    return {"ran": True, "exit_code": done.returncode, "seconds": time.perf_counter() - start,
            "summary": tail[-1] if tail else "", "tail": tail}  # fmt: skip


def random_images(path: Path, count: int, size: int, classes: int) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    np.savez(path, x=x, y=np.arange(count) % classes)
    return path


def prune_run(name: str, args: list[str], out: Path) -> dict[str, Any]:
    """One `prunekit prune ... --json` run: its wall time, phases, passes, peaks, accuracy."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "prunekit", "prune", *args, "--out", str(out), "--json", "--force"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"name": name, "ok": False, "seconds": seconds, "error": lines[-1] if lines else ""}
    report = json.loads(done.stdout)
    steps = [s.get("memory") or {} for s in report.get("statistics") or []]  # one per step
    memory = max(steps, key=lambda m: m.get("measured_peak_bytes") or 0, default={})
    return {
        "name": name,
        "ok": True,
        "seconds": seconds,
        "device": report["device"],
        "phases": report["phases"],
        "passes": memory.get("passes"),
        "planned_peak_bytes": memory.get("planned_peak_bytes"),
        "measured_peak_bytes": memory.get("measured_peak_bytes"),
        "accuracy": report["accuracy"],
        "sparsity": report["sparsity"]["achieved"],
    }


def runs_to_do(args: argparse.Namespace, scratch: Path) -> list[tuple[str, list[str]]]:
    device = ["--device", args.device]
    runs = [
        ("digits-cnn woodfisher", ["sample:digits-cnn", "-p", "woodfisher", "-s", "0.8",
                                   "--param", "num_grads=128", *device]),
        ("digits-cnn fishleg", ["sample:digits-cnn", "-p", "fishleg", "-s", "0.8",
                                "--param", "num_grads=128", *device]),
        ("digits-mlp sparsegpt", ["sample:digits-mlp", "-p", "sparsegpt", "-s", "0.5",
                                  "--mask", "layer", *device]),
        ("digits-cnn woodfisher, 80 MiB budget", ["sample:digits-cnn", "-p", "woodfisher", "-s",
                                             "0.8", "--param", "num_grads=128",
                                             "--memory-budget", "80MiB", *device]),
    ]  # fmt: skip
    if args.small:
        return runs
    images = random_images(scratch / "r224.npz", 256, 224, 1000)
    runs.append(("torchvision resnet50 224 woodfisher (defaults, random weights)",
                 ["torchvision:resnet50", "-p", "woodfisher", "-s", "0.9", "--data",
                  f"tensors:{images}", "--normalize", "imagenet", *device]))  # fmt: skip
    dev = args.dev_dir
    if dev is not None and (dev / "resnet56.safetensors").is_file():
        data = f"tensors:{dev / 'calibration.npz'},{dev / 'test.npz'}"
        for pruner in ("woodfisher", "fishleg"):
            runs.append((f"dev resnet56 {pruner} 0.9, 1000 gradients",
                         ["cifar:resnet56", "--weights", str(dev / "resnet56.safetensors"),
                          "--data", data, "--normalize", "imagenet", "-p", pruner, "-s", "0.9",
                          "--param", "num_grads=1000", *device]))  # fmt: skip
    if args.minilm is not None and args.text is not None:
        for pruner in ("sparsegpt", "woodfisher"):
            runs.append((f"MiniLM {pruner} 0.5",
                         [f"hf:{args.minilm}", "-p", pruner, "-s", "0.5", "--mask", "layer",
                          "--data", f"text:{args.text}", *device]))  # fmt: skip
    return runs


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# prunekit GPU check ({result['device']}, {'small' if result['small'] else 'full'})",
             "", f"- torch {result['torch']}, {result['gpu'] or 'no GPU'}",
             f"- CUDA tests: {result['tests'].get('summary') or result['tests'].get('why')}", "",
             "| run | ok | seconds | statistics s | passes | planned peak MiB | measured peak MiB"
             " | top-1 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def mib(v: int | None) -> str:
        return "" if v is None else f"{v / 2**20:.1f}"

    for r in result["runs"]:
        if not r["ok"]:
            lines.append(f"| {r['name']} | no: {r['error']} | {r['seconds']:.1f} | | | | | |")
            continue
        top1 = r["accuracy"]["pruned"]
        lines.append(f"| {r['name']} | yes | {r['seconds']:.1f} | "
                     f"{r['phases'].get('statistics', 0):.1f} | {r['passes'] or ''} | "
                     f"{mib(r['planned_peak_bytes'])} | {mib(r['measured_peak_bytes'])} | "
                     f"{'' if top1 is None else f'{100 * top1:.2f} %'} |")  # fmt: skip
    ratio = result.get("fishleg_over_woodfisher")
    if ratio:
        lines += ["", f"fishleg / woodfisher time (dev ResNet-56, equal num_grads): {ratio:.2f}x"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny models only (CI, CPU)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--dev-dir", type=Path)
    parser.add_argument("--minilm", type=Path)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--budget-minutes", type=float, default=8.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + 60 * args.budget_minutes
    result: dict[str, Any] = {
        "device": args.device, "small": args.small, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "host": platform.node(), "tests": cuda_tests(args.device), "runs": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, run_args) in enumerate(runs_to_do(args, Path(tmp))):
            if time.perf_counter() > deadline:
                result["runs"].append({"name": name, "ok": False, "seconds": 0.0,
                                       "error": "skipped: over --budget-minutes"})  # fmt: skip
                continue
            print(f"gpu_check: {name}", file=sys.stderr, flush=True)
            result["runs"].append(prune_run(name, run_args, Path(tmp) / f"run{i}"))
    times = {r["name"].split()[2]: r["seconds"] for r in result["runs"]
             if r["ok"] and r["name"].startswith("dev resnet56")}  # fmt: skip
    if {"woodfisher", "fishleg"} <= times.keys():
        result["fishleg_over_woodfisher"] = times["fishleg"] / times["woodfisher"]
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    failed = [r["name"] for r in result["runs"] if not r["ok"]]
    tests_failed = result["tests"].get("ran") and result["tests"]["exit_code"] != 0
    sys.exit(1 if failed or tests_failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
