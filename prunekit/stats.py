"""Statistics for pruners, collected once per pruning step and shared between criteria.

Per-sample (or per-mini-batch) loss gradients of the target tensors come from
``torch.func`` (vmap over grad) in chunks of samples; from them the gradient mean, the
Fisher diagonal and the blockwise damped inverse Fisher are accumulated on the device.
A memory plan splits the targets into groups (one pass over the calibration data each) and
picks the chunk size so that each pass fits the memory budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from prunekit import fisher
from prunekit.data import loader
from prunekit.errors import NumericalError, UsageError
from prunekit.pruners.base import StatsSpec, Target

AVAILABLE = frozenset({"grad_mean", "fisher_diag", "fisher_inv", "hessian_grad"})
PER_SAMPLE = frozenset({"grad_mean", "fisher_diag", "fisher_inv"})
FLOAT_BYTES = 4
GRAD_WORKSPACE = 3  # per-sample gradient bytes held by vmap, as a multiple of their size
MAX_CHUNK = 128


@dataclass
class MemoryPlan:
    budget: int
    chunk: int  # gradients computed per vmap call
    groups: list[list[Target]]
    group_bytes: list[int] = field(default_factory=list)

    def describe(self) -> str:
        lines = [
            f"memory plan: budget {_size(self.budget)}, {len(self.groups)} pass(es), "
            f"{self.chunk} gradients per vmap chunk"
        ]
        for group, need in zip(self.groups, self.group_bytes, strict=True):
            lines.append(
                f"  pass of {len(group)} target(s), {sum(t.numel for t in group):,} "
                f"weights: about {_size(need)}"
            )
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def default_budget(device: torch.device) -> int:
    """A safe fraction of the free memory: 80 % of free GPU memory, half of available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


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


def target_bytes(target: Target, spec: StatsSpec, needs: frozenset[str]) -> tuple[int, int]:
    """(bytes kept for the whole pass, bytes per gradient in a chunk) for one target."""
    d = target.numel
    kept = 2 * d  # mean and squared-gradient accumulators
    if "fisher_inv" in needs:
        block = spec.block_for(target)
        padded = fisher.num_blocks(d, block) * block
        m = spec.num_grads
        accumulate = padded * min(m, block)  # stored rows (Woodbury) or Gram blocks
        inverse = padded * block
        workspace = padded * min(m, block) + fisher.num_blocks(d, block) * min(m, block) ** 2
        kept += accumulate + inverse + workspace
    return kept * FLOAT_BYTES, d * FLOAT_BYTES * GRAD_WORKSPACE


def plan_memory(
    targets: Sequence[Target], spec: StatsSpec, needs: frozenset[str], budget: int
) -> MemoryPlan:
    """Group targets and choose the chunk size so that every pass fits ``budget``."""
    costs = {t.name: target_bytes(t, spec, needs) for t in targets}
    chunk = min(MAX_CHUNK, spec.num_grads)
    for t in targets:  # a single target with a one-gradient chunk must fit
        kept, per_grad = costs[t.name]
        if kept + per_grad > budget:
            raise UsageError(
                f"the memory budget {_size(budget)} is too small for {t.name}: it needs at "
                f"least {_size(kept + per_grad)}; raise --memory-budget or lower "
                "block_size / num_grads"
            )
        chunk = min(chunk, max(1, (budget - kept) // per_grad))
    groups: list[list[Target]] = []
    group_bytes: list[int] = []
    for t in targets:
        kept, per_grad = costs[t.name]
        need = kept + chunk * per_grad
        if groups and group_bytes[-1] + need <= budget:
            groups[-1].append(t)
            group_bytes[-1] += need
        else:
            groups.append([t])
            group_bytes.append(need)
    return MemoryPlan(budget, int(chunk), groups, group_bytes)


def _loss_of_batch(model: nn.Module, frozen: dict[str, torch.Tensor]):
    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**frozen, **params}, (x,))
        return nn.functional.cross_entropy(logits, y)

    return loss


def per_sample_gradients(
    model: nn.Module,
    targets: Sequence[Target],
    x: torch.Tensor,
    y: torch.Tensor,
    grad_batch: int = 1,
) -> dict[str, torch.Tensor]:
    """Gradients of the mean loss of each mini-batch of ``grad_batch`` samples.

    Returns, per target, a (len(x) // grad_batch, numel) matrix with pruned entries zeroed.
    """
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    frozen.update(dict(model.named_buffers()))
    params = {t.name: frozen[t.name] for t in targets}
    n = len(x) // grad_batch
    xs = x[: n * grad_batch].reshape(n, grad_batch, *x.shape[1:])
    ys = y[: n * grad_batch].reshape(n, grad_batch)
    grads = vmap(grad(_loss_of_batch(model, frozen)), in_dims=(None, 0, 0))(params, xs, ys)
    return {t.name: grads[t.name].reshape(n, -1) * t.mask.reshape(1, -1) for t in targets}


def calibration_batches(
    model: nn.Module,
    calibration: Dataset,
    wanted: int,
    batch_size: int,
    sample_labels: bool,
    device: torch.device,
    seed: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``wanted`` calibration samples on ``device``, in batches.

    With ``sample_labels`` the labels are drawn from the model's predictive distribution
    (seeded): the true Fisher instead of the empirical one.
    """
    generator = torch.Generator(device).manual_seed(seed)
    taken = 0
    for x, y in loader(calibration, batch_size):
        x, y = x[: wanted - taken].to(device), y[: wanted - taken].to(device)
        if sample_labels:
            with torch.no_grad():
                probs = torch.softmax(model(x), dim=1)
            y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        yield x, y
        taken += len(x)
        if taken >= wanted:
            return


class Collector:
    """Collects the statistics a pruner needs, in the passes of a memory plan."""

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[Target],
        calibration: Dataset,
        spec: StatsSpec,
        needs: frozenset[str],
        device: torch.device,
        budget: int | None = None,
        seed: int = 0,
    ) -> None:
        unknown = sorted(needs - AVAILABLE)
        if unknown:
            raise UsageError(
                f"the pruner needs statistics prunekit cannot collect: {', '.join(unknown)} "
                f"(available: {', '.join(sorted(AVAILABLE))}); upgrade prunekit"
            )
        self.model, self.targets, self.calibration = model, list(targets), calibration
        self.spec, self.needs, self.device, self.seed = spec, needs, device, seed
        self.warnings: list[str] = []
        self.plan = None
        if needs:
            check_spec(spec, len(calibration))  # type: ignore[arg-type]
            self.plan = plan_memory(self.targets, spec, needs, budget or default_budget(device))

    @property
    def passes(self) -> int:
        return len(self.plan.groups) if self.plan else 1

    def collect(self) -> Iterator[tuple[list[Target], dict[str, dict[str, torch.Tensor]]]]:
        """Yield each group of targets with its statistics."""
        if self.plan is None:
            yield self.targets, {t.name: {} for t in self.targets}
            return
        for group in self.plan.groups:
            yield group, self._collect_group(group)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spec, chunk = self.spec, self.plan.chunk  # type: ignore[union-attr]
        return calibration_batches(
            self.model,
            self.calibration,
            spec.num_grads * spec.grad_batch,
            chunk * spec.grad_batch,
            spec.fisher == "true",
            self.device,
            self.seed,
        )

    def _collect_group(self, group: list[Target]) -> dict[str, dict[str, torch.Tensor]]:
        spec, m = self.spec, self.spec.num_grads
        was_training = self.model.training
        self.model.eval()
        sums = {t.name: torch.zeros(t.numel, device=self.device) for t in group}
        squares = {t.name: torch.zeros(t.numel, device=self.device) for t in group}
        rows: dict[str, list[torch.Tensor]] = {t.name: [] for t in group}
        grams: dict[str, torch.Tensor] = {}
        use_rows = {t.name: m < spec.block_for(t) for t in group}
        for x, y in self._batches() if self.needs & PER_SAMPLE else ():
            chunk = per_sample_gradients(self.model, group, x, y, spec.grad_batch)
            for t in group:
                g = chunk[t.name]
                sums[t.name] += g.sum(0)
                squares[t.name] += g.square().sum(0)
                if "fisher_inv" not in self.needs:
                    continue
                if use_rows[t.name]:
                    rows[t.name].append(g)
                else:
                    gram = fisher.gram_blocks(g, spec.block_for(t))
                    grams[t.name] = grams[t.name] + gram if t.name in grams else gram
        hessian = self._hessian_gradient(group) if "hessian_grad" in self.needs else {}
        self.model.train(was_training)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for t in group:
            if not torch.isfinite(squares[t.name]).all():  # any NaN/Inf gradient shows here
                raise NumericalError(
                    f"the gradients of {t.name} contain NaN or Inf; check the model's weights "
                    "and inputs (or lower the learning rate that produced them)"
                )
            stats = {
                "grad_mean": (sums[t.name] / m).reshape(t.weight.shape),
                # × b: with mini-batch gradients this still estimates the per-sample Fisher
                "fisher_diag": (squares[t.name] / m * spec.grad_batch).reshape(t.weight.shape),
            }
            if "fisher_inv" in self.needs:
                stats["fisher_inv"] = self._inverse(t, rows[t.name], grams.get(t.name))
            if t.name in hessian:
                stats["hessian_grad"] = hessian[t.name]
            out[t.name] = stats
        return out

    def _hessian_gradient(self, group: list[Target]) -> dict[str, torch.Tensor]:
        """H ḡ by double backprop, logits divided by the temperature (the GraSP statistic).

        ḡ is the mean gradient over the calibration samples, held fixed; then
        H ḡ = ∇(∇L · ḡ), accumulated over the same chunks.
        """
        params = [t.weight for t in group]
        temperature = self.spec.temperature

        def chunk_losses() -> Iterator[torch.Tensor]:
            total = self.spec.num_grads * self.spec.grad_batch
            for x, y in self._batches():
                logits = self.model(x) / temperature
                yield nn.functional.cross_entropy(logits, y, reduction="sum") / total

        mean_grad = [torch.zeros_like(p) for p in params]
        for loss in chunk_losses():
            for acc, g in zip(mean_grad, torch.autograd.grad(loss, params), strict=True):
                acc += g
        mean_grad = [g * t.mask for g, t in zip(mean_grad, group, strict=True)]
        product = [torch.zeros_like(p) for p in params]
        for loss in chunk_losses():
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * fixed).sum() for g, fixed in zip(grads, mean_grad, strict=True))
            for acc, h in zip(product, torch.autograd.grad(dot, params), strict=True):
                acc += h
        return {t.name: (h * t.mask).detach() for t, h in zip(group, product, strict=True)}

    def _inverse(self, t: Target, rows: list[torch.Tensor], gram: torch.Tensor | None):
        block, damp = self.spec.block_for(t), self.spec.damp
        for attempt in range(2):
            try:
                if gram is None:
                    return fisher.inverse_from_rows(torch.cat(rows), block, damp)
                return fisher.inverse_from_gram(gram, self.spec.num_grads, damp)
            except NumericalError:
                if attempt:
                    raise NumericalError(
                        f"the damped Fisher of {t.name} is not positive definite even with "
                        f"damp={damp:g}; raise --param damp"
                    ) from None
                self.warnings.append(
                    f"the damped Fisher of {t.name} was not positive definite with "
                    f"damp={damp:g}; used damp={damp * 10:g}"
                )
                damp *= 10
        raise AssertionError


def check_spec(spec: StatsSpec, available: int) -> None:
    if spec.damp <= 0 or not math.isfinite(spec.damp):
        raise UsageError(f"--param damp={spec.damp}: damping must be positive, e.g. 1e-5")
    if spec.block_size is not None and spec.block_size < 1:
        raise UsageError(f"--param block_size={spec.block_size}: must be at least 1, e.g. 128")
    if spec.num_grads < 1 or spec.grad_batch < 1:
        raise UsageError("--param num_grads and grad_batch must be at least 1")
    needed = spec.num_grads * spec.grad_batch
    if needed > available:
        raise UsageError(
            f"num_grads={spec.num_grads} x grad_batch={spec.grad_batch} needs {needed} "
            f"samples but the calibration split has {available}; lower --param num_grads"
        )
    if spec.fisher not in {"empirical", "true"}:
        raise UsageError(f"--param fisher={spec.fisher}: use empirical or true")
