"""Data-parallel runs under torchrun: which rank this is, its shard of the calibration
samples, and the few collectives the statistics need.

Every function is a no-op (or the identity) in a plain single-process run, so callers never
branch on it. Under ``torchrun`` (WORLD_SIZE in the environment) ``process_group`` joins the
group: gloo for CPU devices, nccl for CUDA (``resolve_device`` puts each rank on
``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from prunekit.errors import UsageError
from prunekit.runtime.batches import loader

TIMEOUT = datetime.timedelta(minutes=30)  # a rank that stops answering ends the others
_sent = {"all_reduce": 0, "gather": 0}  # bytes this rank has put into each


def bytes_sent() -> dict[str, int]:
    """Bytes this process has contributed to all-reduces and to gathers so far."""
    return dict(_sent)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if active():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    if active():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main() -> bool:
    """Rank 0, the only rank that writes outputs and prints progress."""
    return rank() == 0


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the launcher's process group for the duration (nothing outside a launcher)."""
    if not launched() or active():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(count: int) -> range:
    """This rank's contiguous part of ``range(count)``; the parts cover it in rank order."""
    if not active():
        return range(count)
    size, r = world_size(), rank()
    return range(count * r // size, count * (r + 1) // size)


def shard_samples(data: Dataset, gradients: int, per_gradient: int = 1) -> tuple[Dataset, int]:
    """This rank's share of the first ``gradients`` x ``per_gradient`` samples of ``data``:
    (the subset, the number of gradients it makes)."""
    if not active():
        return data, gradients
    if gradients < world_size():
        raise UsageError(
            f"{gradients} calibration gradients cannot be shared by {world_size()} processes; "
            "raise --param num_grads (num_samples) or start fewer processes"
        )
    part = shard(gradients)
    indices = range(part.start * per_gradient, part.stop * per_gradient)
    return Subset(data, indices), len(part)


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place."""
    if active():
        for t in tensors:
            dist.all_reduce(t)
            _sent["all_reduce"] += t.numel() * t.element_size()


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The ranks' row blocks (dim 0, any lengths) concatenated in rank order."""
    if not active():
        return rows
    counts = torch.tensor([len(rows)], device=rows.device)
    sizes = [torch.zeros_like(counts) for _ in range(world_size())]
    dist.all_gather(sizes, counts)
    longest = int(max(int(s) for s in sizes))
    padded = rows.new_zeros(longest, *rows.shape[1:])
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    _sent["gather"] += padded.numel() * padded.element_size()
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


def lost_contact(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away."""
    if not launched() or not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        mark in text for mark in ("Connection closed by peer", "gloo", "NCCL", "Connection reset")
    )


def all_agree(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank."""
    if not active():
        return ok
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    return int(flag) == 0


def broadcast(tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place (bool tensors too)."""
    if active():
        for t in tensors:
            if t.dtype == torch.bool:  # not every backend sends bool
                byte = t.to(torch.uint8)
                dist.broadcast(byte, 0)
                t.copy_(byte.bool())
            else:
                dist.broadcast(t, 0)


def train_loader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled training batches; under a process group each rank gets its share of every
    global batch of ``batch_size`` (so the steps per epoch match a single process)."""
    if not active():
        return loader(dataset, batch_size, shuffle=True, seed=seed)
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, shuffle=True, seed=seed, drop_last=False
    )
    return DataLoader(dataset, batch_size=max(1, batch_size // world_size()), sampler=sampler)


def set_epoch(batches: DataLoader, epoch: int) -> None:
    """A new shuffle per epoch for a DistributedSampler (a plain loader reshuffles itself)."""
    if isinstance(batches.sampler, DistributedSampler):
        batches.sampler.set_epoch(epoch)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """The model to call in training: DistributedDataParallel under a process group (the
    gradients averaged over the ranks), the model itself otherwise."""
    if not active():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
