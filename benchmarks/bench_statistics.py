"""Statistics at the speed limit: milliseconds per per-sample gradient, hook engine vs vmap vs
a plain batched forward + backward over the same samples, in one process; then the statistics
phase and the masks of a real woodfisher run with either engine.

Needs the CIFAR-10 development set for cifar: models (resnet32/44/56.safetensors,
calibration.npz, test.npz; pass --dev-dir). ``torchvision:resnet50`` runs at 224 x 224 on the
calibration images upsampled, with random weights (speed only; meant for a GPU). ``hf:DIR``
(all-MiniLM-L6-v2, say) runs on the sentences of ``--text FILE``, label-free (cosine).

    python benchmarks/bench_statistics.py [--dev-dir DIR] [--models cifar:resnet56]
        [--samples 256] [--chunk 64] [--repeats 3] [--device auto]
        [--woodfisher-grads 256] [--woodfisher-default] [--sparsity 0.9]
        [--text FILE --max-length 64]
    python benchmarks/bench_statistics.py --sub-steps auto,5,4,3 [--models cifar:resnet56]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from devset import DEFAULT_DEV, checked

import prunekit
from prunekit.calibrate.gradients import has_hook_rule, per_sample_gradients
from prunekit.contract.objectives import COSINE, LABELS
from prunekit.engine.masks import find_targets
from prunekit.load.models import load_model
from prunekit.runtime.device import resolve_device

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(
    dev, count: int | None, size: int = 32, split: str = "calibration"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of a split (None: all), normalised, at ``size``."""
    data = np.load(dev / f"{split}.npz")
    x = torch.from_numpy(data["x"][:count]).float() / 255.0
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    return (x - MEAN) / STD, torch.from_numpy(data["y"][:count]).long()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_backward(model, targets, x, y, objective=LABELS) -> None:
    """The floor: one batched forward + backward, weight gradients of the targets only."""
    loss = objective.loss(model(x), y)
    torch.autograd.grad(loss, [t.weight for t in targets])


def problem(spec: str, dev, args, device: torch.device):
    """(model, x, y, objective) of a benchmark row: CIFAR images with labels, resnet50 at 224
    on upsampled images, or an ``hf:`` encoder on ``--text`` sentences (label-free cosine to
    the dense model's embeddings, as woodfisher prunes encoders)."""
    if spec.startswith("hf:"):
        from prunekit.load.data import load_data

        model = load_model(spec).model.to(device).eval()
        data = load_data(f"text:{args.text}", model_spec=spec, max_length=args.max_length)
        x = torch.stack([data.calibration[i][0] for i in range(args.samples)]).to(device)
        with torch.no_grad():
            y = COSINE.targets(
                model(x), torch.zeros(len(x)), torch.Generator(device).manual_seed(0)
            )
        return model, x, y, COSINE
    cifar = spec.startswith("cifar:")
    weights = dev / f"{spec.split(':', 1)[1]}.safetensors" if cifar else None
    model = load_model(spec, weights, None if cifar else 10).model.to(device).eval()
    x, y = images(dev, args.samples, 32 if cifar else 224)
    return model, x.to(device), y.to(device), LABELS


def timed(call, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def per_gradient_ms(spec: str, dev, args, device: torch.device) -> None:
    model, x, y, objective = problem(spec, dev, args, device)
    targets, _ = find_targets(model)
    for t in targets:
        t.mask = t.mask.to(device)
    ruled = sum(has_hook_rule(t) for t in targets)
    runs: dict[str, list[float]] = {"plain": [], "hooks": [], "vmap": []}
    calls = {
        "plain": lambda xs, ys: plain_backward(model, targets, xs, ys, objective),
        "hooks": lambda xs, ys: per_sample_gradients(
            model, targets, xs, ys, objective=objective, engine="hooks"
        ),
        "vmap": lambda xs, ys: per_sample_gradients(
            model, targets, xs, ys, objective=objective, engine="vmap"
        ),
    }
    for repeat in range(args.repeats + 1):  # the first round warms up
        order = list(calls) if repeat % 2 else list(reversed(calls))
        for name in order:
            call, seconds = calls[name], 0.0
            for s in range(0, len(x), args.chunk):
                xs, ys = x[s : s + args.chunk], y[s : s + args.chunk]
                seconds += timed(lambda: call(xs, ys), device)  # noqa: B023 (called at once)
            if repeat:
                runs[name].append(seconds)
    ms = {k: 1000 * statistics.median(v) / len(x) for k, v in runs.items()}
    plain, hooks, vmap = ms["plain"], ms["hooks"], ms["vmap"]
    where = Path(spec[3:])
    label = f"hf:{where.parent.name}/{where.name}" if spec.startswith("hf:") else spec
    print(f"| {label} | {len(targets)} ({ruled} by hooks) | {plain:.2f} | {hooks:.2f} | "
          f"{vmap:.2f} | {hooks / plain:.2f}x | {vmap / plain:.2f}x | {vmap / hooks:.2f}x |",
          flush=True)  # fmt: skip


def woodfisher_runs(spec: str, dev, args, device: torch.device, default: bool) -> None:
    """A real woodfisher run per engine: statistics phase, whole run, masks, accuracy. One
    step of ``--woodfisher-grads`` gradients, or (``default``) woodfisher's defaults: 1,000
    gradients per sub-step, the automatic sub-steps, on the whole test split."""
    from prunekit.engine.schedule import ScheduleConfig

    arch = spec.split(":", 1)[1]
    x, y = images(dev, 1000)
    tx, ty = images(dev, None if default else 1000, split="test")
    count = len(ty)
    params = {} if default else {"num_grads": args.woodfisher_grads}
    schedule = None if default else ScheduleConfig(recompute=1)
    what = "defaults" if default else f"{args.woodfisher_grads} gradients, one step"
    results = {}
    for engine in ("vmap", "hooks"):
        model = load_model(spec, dev / f"{arch}.safetensors").model
        start = time.perf_counter()
        result = prunekit.prune(
            model, "woodfisher", args.sparsity, (x, y), test_data=(tx, ty),
            params={**params, "grad_engine": engine}, schedule=schedule, device=str(device),
        )  # fmt: skip
        results[engine] = (result, time.perf_counter() - start)
    (vm, vm_s), (hk, hk_s) = results["vmap"], results["hooks"]
    same = sum(int((vm.masks[k] == hk.masks[k]).sum()) for k in vm.masks)
    total = sum(m.numel() for m in vm.masks.values())
    for engine, (result, seconds) in results.items():
        phases = result.report["phases"]
        top1 = 100 * result.report["accuracy"]["pruned"]
        print(f"| {spec} woodfisher {args.sparsity:g}, {what} | {engine} | "
              f"{phases.get('statistics', 0):.1f} | {seconds:.1f} | "
              f"{top1:.2f} % ({count:,} images) |")  # fmt: skip
    ratio = vm.report["phases"]["statistics"] / hk.report["phases"]["statistics"]
    print(f"\nstatistics phase, vmap / hooks: {ratio:.2f}x; whole run {vm_s / hk_s:.2f}x; "
          f"masks agree on {same / total:.4%} of {total:,} weights\n")  # fmt: skip


def substep_runs(spec: str, dev, args, device: torch.device) -> None:
    """The default woodfisher run (hooks) at each ``--sub-steps`` count (auto: the default,
    each sub-step removing at most a quarter of the remaining weights), on the whole test
    split: the time and accuracy that fewer recomputations trade, as ratios to the first."""
    from prunekit.engine.schedule import ScheduleConfig

    arch = spec.split(":", 1)[1]
    x, y = images(dev, 1000)
    tx, ty = images(dev, None, split="test")
    base = None
    for count in args.sub_steps.split(","):
        model = load_model(spec, dev / f"{arch}.safetensors").model
        schedule = None if count == "auto" else ScheduleConfig(recompute=int(count))
        start = time.perf_counter()
        result = prunekit.prune(
            model, "woodfisher", args.sparsity, (x, y), test_data=(tx, ty),
            schedule=schedule, device=str(device),
        )  # fmt: skip
        seconds = time.perf_counter() - start
        base = base or seconds
        phases = result.report["phases"]
        top1 = 100 * result.report["accuracy"]["pruned"]
        print(f"| {spec} woodfisher {args.sparsity:g} | {count} | "
              f"{phases.get('statistics', 0):.1f} | {phases.get('inverse', 0):.1f} | "
              f"{phases.get('evaluation', 0):.1f} | {seconds:.1f} | {base / seconds:.2f}x | "
              f"{top1:.2f} % |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev-dir", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--models", default="cifar:resnet56")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--woodfisher-grads", type=int, default=256, help="0: skip that run")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument(
        "--woodfisher-default", action="store_true", help="also the default run, per engine"
    )
    parser.add_argument(
        "--sub-steps", help="the default run at these sub-step counts, e.g. auto,5,4,3"
    )
    parser.add_argument("--text", type=Path, help="one sentence per line, for hf: models")
    parser.add_argument("--max-length", type=int, default=64, help="tokens, for hf: models")
    args = parser.parse_args()
    specs = [m.strip() for m in args.models.split(",") if m.strip()]
    images_needed = any(not spec.startswith("hf:") for spec in specs)
    dev = checked(args.dev_dir) if images_needed else args.dev_dir  # hf: rows read --text
    device = resolve_device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.sub_steps:
        print("| run | sub-steps | statistics s | inverse s | evaluation s | whole run s | "
              "speed-up | top-1 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for spec in specs:
            if spec.startswith("cifar:"):
                substep_runs(spec, dev, args, device)
        return
    print(f"device {device}, {args.samples} samples in chunks of {args.chunk}, median of "
          f"{args.repeats} interleaved rounds\n")  # fmt: skip
    print("| model | targets | plain backward ms/sample | hooks ms/grad | vmap ms/grad | "
          "hooks / plain | vmap / plain | vmap / hooks |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for spec in specs:
        per_gradient_ms(spec, dev, args, device)
    runs = ([False] if args.woodfisher_grads else []) + ([True] if args.woodfisher_default else [])
    for default in runs:
        print("\n| run | engine | statistics s | whole run s | top-1 |")
        print("|---|---|---|---|---|")
        for spec in specs:
            if spec.startswith("cifar:"):
                woodfisher_runs(spec, dev, args, device, default)


if __name__ == "__main__":
    main()
