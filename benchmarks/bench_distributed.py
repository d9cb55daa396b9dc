"""Data-parallel statistics under torchrun: wall time with 1 vs N processes on this machine,
the split between gradients, all-reduce and inverse, and the scaling that split predicts.

    python benchmarks/bench_distributed.py [--dev-dir DIR] [--model resnet56]
        [--pruner woodfisher] [--num-grads 512] [--procs 1,2] [--threads 2]
        [--gpus 8] [--link-gbytes 100]

Each run is ``torchrun --standalone --nproc-per-node N -m prunekit prune`` on the pretrained
dev ResNet (benchmarks/devset.py says where the folder is), with ``--threads`` CPU threads
shared out between the N processes, so that 1 vs N compares the same cores. The projection
for ``--gpus`` devices divides the gradient and inverse time of the 1-process run by the
device count and adds a ring all-reduce of the measured all-reduced bytes (2 (N-1)/N x
bytes over the link) and an all-gather of the inverse blocks ((N-1)/N x bytes) at
``--link-gbytes`` GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from devset import DEFAULT_DEV, checked, test_subset
from safetensors.torch import load_file

PHASES = ("statistics", "all-reduce", "inverse")
KINDS = ("all_reduce", "gather")
MIB = 2**20


def run(procs: int, threads: int, args: argparse.Namespace, work: Path, data: str) -> dict:
    out = work / f"out{procs}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={procs}", "-m", "prunekit", "prune", f"cifar:{args.model}",
        "--weights", str(args.dev_dir / f"{args.model}.safetensors"), "--data", data,
        "-p", args.pruner, "-s", "0.5", "--param", f"num_grads={args.num_grads}",
        "--device", "cpu", "--export", "safetensors", "--out", str(out), "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // procs))}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{procs} process(es) failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    report["wall"] = time.perf_counter() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--pruner", default="woodfisher")
    parser.add_argument("--num-grads", type=int, default=512)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--link-gbytes", type=float, default=100.0)
    args = parser.parse_args()
    dev = checked(args.dev_dir, "calibration.npz", "test.npz", f"{args.model}.safetensors")
    counts = [int(p) for p in args.procs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = f"tensors:{dev / 'calibration.npz'},{test_subset(dev, 500, work)}"
        for procs in counts:
            report = run(procs, args.threads, args, work, data)
            sent = {k: sum(s["exchanged_bytes"][k] for s in report["statistics"]) for k in KINDS}
            rows.append((procs, report, report["phases"], sent))
        base_masks = masks_of(work / f"out{counts[0]}")
        differ = [
            sum(int((base_masks[k] != m[k]).sum()) for k in m)
            for m in (masks_of(work / f"out{procs}") for procs in counts)
        ]
    print(
        f"{args.pruner} on dev {args.model}, {args.num_grads} gradients, {args.threads} CPU "
        "threads shared by the processes; seconds summed over the pruning sub-steps (the "
        "gradients include the wait for the slowest rank); MiB contributed per rank\n"
    )
    print("| processes | gradients | all-reduce | inverse | rest | wall | mask entries unlike "
          "1 process | all-reduced | gathered |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (procs, report, phases, sent), unlike in zip(rows, differ, strict=True):
        grads, reduce_s, inverse = (phases.get(k, 0.0) for k in PHASES)
        rest = report["seconds"] - grads - reduce_s - inverse
        print(f"| {procs} | {grads:.1f} | {reduce_s:.2f} | {inverse:.1f} | {rest:.1f} | "
              f"{report['wall']:.1f} | {unlike} of {sum(m.numel() for m in base_masks.values())} "
              f"| {sent['all_reduce'] / MIB:.0f} | {sent['gather'] / MIB:.0f} |")  # fmt: skip
    base = rows[0]
    for procs, _, phases, _ in rows[1:]:
        ratio = sum(base[2].get(k, 0.0) for k in PHASES) / sum(phases.get(k, 0.0) for k in PHASES)
        print(f"\ngradients + all-reduce + inverse, 1 vs {procs} processes: {ratio:.2f}x faster")
    n, link = args.gpus, args.link_gbytes * 1e9
    grads, inverse = base[2]["statistics"], base[2].get("inverse", 0.0)
    reduced, gathered = base[3]["all_reduce"], base[3]["gather"]  # a single rank: all of it
    ring = (2 * (n - 1) / n * reduced + (n - 1) / n * gathered) / link
    print(
        f"\nprojection for {n} devices from the 1-process split: gradients {grads:.1f}/{n} + "
        f"inverse {inverse:.1f}/{n} + ring all-reduce of {reduced / MIB:.0f} MiB and "
        f"all-gather of {gathered / MIB:.0f} MiB at {args.link_gbytes:g} GB/s "
        f"({ring * 1e3:.0f} ms) -> {(grads + inverse) / (grads / n + inverse / n + ring):.2f}x"
    )


def masks_of(out: Path) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in load_file(out / "model.safetensors").items()}


if __name__ == "__main__":
    main()
