"""The memory plan of the statistics passes, and how memory is measured.

A pass over the calibration data holds, for every target of its group, the gradient sums and
the Fisher blocks (Gram blocks, replaced one target at a time by their inverse) or the
gradient rows themselves (``grad_rows``, for pruners that work on them), plus per
chunk of samples the per-sample gradients and the activations of the forward/backward pass.
The activations are measured with a trial chunk on CUDA and estimated from the outputs of
every module (forward hooks, one sample) on the CPU. Targets are grouped so that each pass
fits the budget (less ``HEADROOM`` for allocator slack); an out-of-memory error at run time
halves the chunk instead (see stats).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from prunekit.calibrate import fisher
from prunekit.contract.statistics import FISHER_INV, GRAD_ROWS
from prunekit.contract.target import StatsSpec, Target
from prunekit.errors import UsageError

FLOAT_BYTES = 4
GRAD_WORKSPACE = 3  # per-sample gradient bytes held by vmap and the Gram update, x their size
ACTIVATION_WORKSPACE = 3  # CPU estimate: saved outputs, their gradients, vmap's batching
MAX_CHUNK = 128
HEADROOM = 0.9  # plan against this share of the budget: allocator slack, framework buffers


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1e9' -> bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    raw = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if raw.endswith(suffix):
            number, scale = raw[: -len(suffix)], units[suffix]
            break
    else:
        number, scale = raw, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise UsageError(f"--memory-budget {text}: give a size such as 512MB or 2GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--memory-budget {text}: must be a positive, finite size")
    return int(value)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def default_budget(device: torch.device) -> int:
    """A safe fraction of the free memory: 80 % of free GPU memory, half of available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    return available_ram() // 2


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's 'can't allocate memory'."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


class PeakMemory:
    """Peak memory of a block of work: CUDA's allocator peak, or the process's peak RSS."""

    _base: int | None  # set by __enter__; always an int on CUDA

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None
        self.source = "cuda allocator" if device.type == "cuda" else "process RSS (VmHWM)"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - cast(int, self._base)
        elif self._base is not None:
            peak = peak_rss()
            self.peak = None if peak is None else max(0, peak - self._base)


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int | None:
    """Bytes of this process's peak resident set (Linux VmHWM), None elsewhere."""
    return _status_kib("VmHWM")


def reset_peak_rss() -> int | None:
    """Reset the peak resident set to the current one; return it (None if unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def estimate_activation_bytes(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of every module's output for one sample, times the backward/vmap workspace,
    plus a margin for the largest Conv2d's per-sample weight-gradient workspace (the hook
    engine forms one layer's at a time): twice its unfolded input patches."""
    total, patches = 0, 0

    def count(module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total, patches
        for t in output if isinstance(output, tuple | list) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            size = module.in_channels // module.groups * kernel * output[0, 0].numel()
            patches = max(patches, 2 * size * output.element_size())

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in handles:
            h.remove()
    return total * ACTIVATION_WORKSPACE + patches


def measure_activation_bytes(
    model: nn.Module,
    sample: torch.Tensor,
    labels: torch.Tensor,
    gradients: Callable[[torch.Tensor, torch.Tensor], Any],
    grad_bytes_per_sample: int,
) -> int:
    """CUDA: the allocator's peak of a trial chunk of per-sample gradients, per sample,
    less the gradients themselves."""
    device = sample.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = gradients(sample, labels)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return max(0, peak // len(sample) - grad_bytes_per_sample)


@dataclass
class MemoryPlan:
    budget: int
    chunk: int  # gradients computed per vmap call
    groups: list[list[Target]]
    group_bytes: list[int] = field(default_factory=list)
    activation_bytes: int = 0  # per sample
    activation_source: str = "none"

    @property
    def planned_peak(self) -> int:
        return max(self.group_bytes, default=0)

    def describe(self) -> str:
        lines = [
            f"memory plan: budget {size_text(self.budget)}, {len(self.groups)} pass(es), "
            f"{self.chunk} gradients per vmap chunk, activations "
            f"{size_text(self.activation_bytes)} per sample ({self.activation_source})"
        ]
        for group, need in zip(self.groups, self.group_bytes, strict=True):
            lines.append(
                f"  pass of {len(group)} target(s), {sum(t.numel for t in group):,} "
                f"weights: about {size_text(need)}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "passes": len(self.groups),
            "chunk": self.chunk,
            "activation_bytes_per_sample": self.activation_bytes,
            "activation_source": self.activation_source,
            "planned_peak_bytes": self.planned_peak,
        }


@dataclass(frozen=True)
class TargetCost:
    kept: int  # bytes held for the whole pass
    transient: int  # extra bytes while this target's inverse is computed
    per_grad: int  # bytes per gradient of a chunk


def target_cost(target: Target, spec: StatsSpec, needs: frozenset[str]) -> TargetCost:
    """What one target costs in a pass (see the module docstring)."""
    d = target.numel
    kept, transient = 2 * d * FLOAT_BYTES, 0  # mean and squared-gradient accumulators
    if FISHER_INV in needs:
        block = spec.block_for(target)
        padded = fisher.num_blocks(d, block) * block
        m = spec.num_grads
        accumulate = padded * min(m, block) * FLOAT_BYTES  # stored rows or Gram blocks
        inverse = padded * block * FLOAT_BYTES
        kept += max(accumulate, inverse)
        factor_workspace = min(fisher.FACTOR_SLICE_BYTES, 3 * inverse * 2)  # float64 slices
        transient = min(accumulate, inverse) + factor_workspace
    if GRAD_ROWS in needs:
        kept += spec.num_grads * d * FLOAT_BYTES
        out = target.weight.shape[0]
        inp = d // out
        # what a pruner working on the rows holds besides them: its per-layer factors, an
        # optimiser's moments and float64 copies (FishLeg: L, R, A and their Adam state)
        transient = max(transient, 8 * (out * out + inp * inp + d) * FLOAT_BYTES)
    return TargetCost(kept, transient, d * FLOAT_BYTES * GRAD_WORKSPACE)


def _group_bytes(costs: Sequence[TargetCost], chunk: int, activations: int) -> int:
    return (
        sum(c.kept for c in costs)
        + max((c.transient for c in costs), default=0)
        + chunk * (sum(c.per_grad for c in costs) + activations)
    )


def _pack(
    targets: Sequence[Target],
    costs: dict[str, TargetCost],
    chunk: int,
    activation_bytes: int,
    budget: int,
) -> tuple[list[list[Target]], list[int]]:
    """Consecutive targets into groups that fit ``budget`` at this chunk size."""
    groups: list[list[Target]] = []
    group_bytes: list[int] = []
    for t in targets:
        if groups:
            need = _group_bytes([costs[u.name] for u in [*groups[-1], t]], chunk, activation_bytes)
            if need <= budget:
                groups[-1].append(t)
                group_bytes[-1] = need
                continue
        groups.append([t])
        group_bytes.append(_group_bytes([costs[t.name]], chunk, activation_bytes))
    return groups, group_bytes


def plan_memory(
    targets: Sequence[Target],
    spec: StatsSpec,
    needs: frozenset[str],
    budget: int,
    activation_bytes: int = 0,
    activation_source: str = "none",
) -> MemoryPlan:
    """Group targets and choose the chunk size so that every pass fits ``budget``."""
    costs = {t.name: target_cost(t, spec, needs) for t in targets}
    chunk = min(MAX_CHUNK, spec.num_grads)
    usable = int(budget * HEADROOM)
    held = "gradient rows" if GRAD_ROWS in needs else "Fisher blocks"
    knobs = "--param num_grads" if GRAD_ROWS in needs else "block_size / num_grads"
    for t in targets:  # a single target with a one-gradient chunk must fit
        cost = costs[t.name]
        alone = _group_bytes([cost], 1, activation_bytes)
        if alone > usable:
            raise UsageError(
                f"the memory budget {size_text(budget)} is too small for {t.name}: it needs "
                f"at least {size_text(alone / HEADROOM)} (its statistics, {held}, "
                f"{size_text(cost.kept + cost.transient)}, one sample's gradient and "
                f"activations {size_text(cost.per_grad + activation_bytes)}); raise "
                f"--memory-budget or lower {knobs}"
            )
        room = usable - cost.kept - cost.transient
        chunk = min(chunk, max(1, room // (cost.per_grad + activation_bytes)))
    # Every pass is a full forward/backward over the calibration data, so the fewest passes
    # come first; among plans with as few, the largest chunk (the most efficient vmap).
    best: tuple[int, list[list[Target]], list[int]] | None = None
    while True:
        groups, group_bytes = _pack(targets, costs, chunk, activation_bytes, usable)
        if best is None or len(groups) < len(best[1]):
            best = (chunk, groups, group_bytes)
        if chunk == 1:
            break
        chunk //= 2
    chunk, groups, group_bytes = best
    return MemoryPlan(budget, int(chunk), groups, group_bytes, activation_bytes, activation_source)
