"""Layer-wise pruning of a decoder block by block vs through the whole model: peak memory and
time of the same sparsegpt step, one process (random GPT-2-shaped weights: memory and speed
only; the masks of both paths are equal, tests/load/test_decoders.py checks it).

    python benchmarks/bench_decoder_blocks.py [--layers 8] [--width 512] [--vocab 32000]
        [--samples 128] [--length 256] [--device auto]

Peak memory is the CUDA allocator's peak on a GPU, else the process's peak resident set
(Linux VmHWM, reset before each run).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

from prunekit.calibrate.memory import PeakMemory
from prunekit.engine import step
from prunekit.engine.masks import find_targets
from prunekit.engine.step import Pruning, prune_step
from prunekit.load.hf import PackedInputs, as_linear
from prunekit.pruners import registry
from prunekit.runtime.device import resolve_device


def decoder(layers: int, width: int, vocab: int, length: int) -> PackedInputs:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers,
                                     n_head=max(1, width // 64), n_positions=length)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    as_linear(model)
    return PackedInputs(model, "decoder").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.samples, args.length), generator=gen)
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)
    data = TensorDataset(x, torch.full((args.samples,), -1))
    print(f"GPT-2-shaped decoder, {args.layers} layers of width {args.width}, vocabulary "
          f"{args.vocab}; one sparsegpt 50 % step on {args.samples} x {args.length} tokens, "
          f"{device}")  # fmt: skip
    print("| path | peak memory MiB | seconds |")
    print("|---|---|---|")
    real = step.repeated_blocks
    results = {}
    for path in ("whole model", "block by block", "whole model", "block by block"):
        step.repeated_blocks = real if path == "block by block" else (lambda model: None)
        model = decoder(args.layers, args.width, args.vocab, args.length).to(device)
        targets, _ = find_targets(model)
        state = Pruning.of(model, targets, registry.create("sparsegpt"), data, device,
                           mask="layer")  # fmt: skip
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            prune_step(state, 0.5)
            seconds = time.perf_counter() - start
        results[path] = (peak.peak or 0, seconds)
        print(f"| {path} | {(peak.peak or 0) / 2**20:.0f} | {seconds:.1f} |", flush=True)
    step.repeated_blocks = real
    (whole, whole_s), (blocks, blocks_s) = results["whole model"], results["block by block"]
    print(f"\nblock by block / whole model: peak memory {blocks / max(whole, 1):.2f}x, "
          f"time {blocks_s / whole_s:.2f}x (second round of each)")  # fmt: skip


if __name__ == "__main__":
    main()
