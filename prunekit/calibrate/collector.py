"""Statistics for pruners, collected once per pruning step and shared between criteria.

Per-sample (or per-mini-batch) loss gradients of the target tensors come from
``torch.func`` (vmap over grad) in chunks of samples; from them the gradient mean, the
Fisher diagonal and the blockwise damped inverse Fisher are accumulated on the device.
A memory plan (``prunekit.calibrate.memory``) splits the targets into groups (one pass over the
calibration data each) and picks the chunk size so that each pass fits the memory budget;
an out-of-memory error halves the chunk and carries on, with a warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.calibrate import fisher
from prunekit.calibrate.gradients import (
    calibration_batches,
    fallbacks,
    no_hook_rule,
    per_sample_gradients,
)
from prunekit.calibrate.layer_inputs import input_grams, input_square_norms
from prunekit.calibrate.memory import (
    MemoryPlan,
    PeakMemory,
    available_ram,
    default_budget,
    estimate_activation_bytes,
    is_out_of_memory,
    measure_activation_bytes,
    plan_memory,
    size_text,
    target_cost,
)
from prunekit.contract.curvature import BlockInverse
from prunekit.contract.objectives import LABELS, Objective
from prunekit.contract.statistics import (
    FISHER_DIAG,
    FISHER_INV,
    GRAD_MEAN,
    GRAD_ROWS,
    HESSIAN_GRAD,
    INPUT_GRAM,
    INPUT_SQUARES,
    LAYER_INPUTS,
    PER_SAMPLE,
    STATISTICS,
)
from prunekit.contract.target import StatsSpec, Target, multiplies_rows
from prunekit.errors import NumericalError, OutOfMemoryError, UsageError
from prunekit.runtime import distributed
from prunekit.runtime.batches import eval_mode
from prunekit.runtime.timing import Timings

AVAILABLE = frozenset(STATISTICS)
DAMP_ESCALATIONS = 4  # x10 each, when a damped block is still not positive definite


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
        timings: Timings | None = None,
        say: Callable[[str], None] | None = None,
        objective: Objective = LABELS,
        covered: bool = False,
    ) -> None:
        unknown = sorted(needs - AVAILABLE)
        if unknown:
            raise UsageError(
                f"the pruner needs statistics prunekit cannot collect: {', '.join(unknown)} "
                f"(available: {', '.join(sorted(AVAILABLE))}); upgrade prunekit"
            )
        self.budget = budget
        self.model, self.targets, self.calibration = model, list(targets), calibration
        self.spec, self.needs, self.device, self.seed = spec, needs, device, seed
        self.cover_unpruned = covered  # the inverse Fisher covers the unpruned weights only
        self.objective = objective.for_fisher(spec.fisher)
        if HESSIAN_GRAD in needs and self.objective.name not in {"labels", "kl"}:
            raise UsageError(
                f"the Hessian-gradient product (GraSP) needs class logits; --objective "
                f"{objective.name} compares outputs: use --objective labels"
            )
        self.timings = timings or Timings(device)
        self.say = say or (lambda _: None)
        self.warnings: list[str] = []
        self.damping: dict[str, float] = {}  # λ used per target
        self.fisher_scale: float | None = None  # mean diag F over all targets (relative λ)
        self.measured_peak: int | None = None
        self.sent_before = distributed.bytes_sent()  # under torchrun: this step's traffic
        self.plan: MemoryPlan | None = None
        gradients = needs - LAYER_INPUTS
        if gradients:
            check_spec(spec, len(cast(Sized, calibration)))
            activations, source = self._activation_bytes() if needs & PER_SAMPLE else (0, "none")
            self.plan = plan_memory(
                self.targets, spec, gradients, budget or default_budget(device), activations, source
            )
            self.chunk = self.plan.chunk

    @property
    def passes(self) -> int:
        return len(self.plan.groups) if self.plan else 1

    def retains_for_update(self) -> bool:
        """Whether the statistics of every pass can be kept for the OBS update (no second
        round of passes): always with one pass; on CUDA, in host memory when it has room."""
        if self.passes == 1:
            return True
        if self.device.type != "cuda":
            return False  # the budget is the host's own memory
        kept = sum(target_cost(t, self.spec, self.needs).kept for t in self.targets)
        return kept < available_ram() // 2

    def report(self) -> dict[str, Any]:
        """The plan, the measured peak and the damping used, for report.json."""
        out: dict[str, Any] = {}
        if self.plan is not None:
            out["memory"] = {
                **self.plan.to_json(),
                "chunk_used": self.chunk,
                "measured_peak_bytes": self.measured_peak,
            }
        if self.plan is not None and self.needs & PER_SAMPLE:
            out["gradient_engine"] = self.engine_report()
        if distributed.active():
            now = distributed.bytes_sent()
            out["exchanged_bytes"] = {k: now[k] - self.sent_before[k] for k in now}
        if self.damping:
            out["damping"] = {
                "mode": self.spec.damp_mode,
                "alpha" if self.spec.damp_mode == "relative" else "lambda": self.spec.damp,
                "mean_fisher_diag": self.fisher_scale,
                "per_target": dict(self.damping),
            }
        return out

    def engine_report(self) -> dict[str, Any]:
        """Which targets took their per-sample gradients from vmap, and why (the others:
        from hooks, unless grad_engine=vmap)."""
        if self.spec.grad_engine == "vmap":
            return {"engine": "vmap", "vmap": {t.name: "grad_engine=vmap" for t in self.targets}}
        left = {t.name: why for t in self.targets if (why := no_hook_rule(t))}
        return {"engine": "hooks", "vmap": {**left, **fallbacks(self.model)}}

    def _activation_bytes(self) -> tuple[int, str]:
        trial = calibration_batches(
            self.model,
            self.calibration,
            TRIAL_SAMPLES,
            TRIAL_SAMPLES,
            self.objective,
            self.device,
            self.seed,
        )
        x, y = next(trial)
        with eval_mode(self.model):
            if self.device.type != "cuda":
                return estimate_activation_bytes(self.model, x), "estimated from module outputs"
            first = self.targets[:1]
            return (
                measure_activation_bytes(
                    self.model,
                    x,
                    y,
                    lambda xs, ys: per_sample_gradients(
                        self.model, first, xs, ys, 1, self.objective, self.spec.grad_engine
                    ),
                    target_cost(first[0], self.spec, frozenset()).per_grad,
                ),
                f"measured with a trial chunk of {len(x)}",
            )

    def collect(self) -> Iterator[tuple[list[Target], dict[str, dict[str, Any]]]]:
        """Yield each group of targets with its statistics."""
        inputs = self._layer_inputs() if self.needs & LAYER_INPUTS else {}
        if self.plan is None:
            yield self.targets, {t.name: dict(inputs.get(t.name, {})) for t in self.targets}
            return
        relative = self._damps() and self.spec.damp_mode == "relative"
        if relative and self.passes > 1 and self.fisher_scale is None:  # every target's diag F
            self.fisher_scale = self._fisher_scale()
        for index, group in enumerate(self.plan.groups, start=1):
            with PeakMemory(self.device) as peak:
                stats = self._collect_group(group, index)
            if peak.peak is not None:
                self.measured_peak = max(self.measured_peak or 0, peak.peak)
            for name, own in inputs.items():
                if name in stats:
                    stats[name].update(own)
            yield group, stats

    def _layer_inputs(self) -> dict[str, dict[str, torch.Tensor]]:
        """E[x_j²] (or the Gram matrix XᵀX / n) of the inputs of every target layer that
        multiplies rows (Linear, Conv2d with groups 1), from one forward pass of
        ``num_samples`` calibration samples."""
        modules = {t.name: t.module for t in self.targets if multiplies_rows(t.module)}
        found: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
        if INPUT_GRAM in self.needs:
            self._check_gram_memory([t for t in self.targets if t.name in modules])
        with self.timings.phase("statistics"):
            if INPUT_GRAM in self.needs:
                grams = input_grams(
                    self.model, modules, self.calibration, self.spec.num_samples, self.device
                )
                for name, gram in grams.items():
                    found[name][INPUT_GRAM] = gram
                    if INPUT_SQUARES in self.needs:
                        found[name][INPUT_SQUARES] = gram.diagonal().clone()
            elif INPUT_SQUARES in self.needs:
                squares = input_square_norms(
                    self.model, modules, self.calibration, self.spec.num_samples, self.device
                )
                for name, square in squares.items():
                    found[name][INPUT_SQUARES] = square
        return {name: own for name, own in found.items() if own}

    def _check_gram_memory(self, targets: list[Target]) -> None:
        """The input Gram matrices (d × d float64 per layer, all held at once) fit the
        memory budget, or a usage error naming the widest layers."""
        widths = {t.name: t.weight[0].numel() for t in targets}
        needed = sum(8 * d * d for d in widths.values())
        budget = self.budget or default_budget(self.device)
        if needed > budget:
            widest = sorted(widths, key=lambda n: -widths[n])[:3]
            raise UsageError(
                f"the layers' input Gram matrices need {needed / 2**30:.1f} GiB, over the "
                f"memory budget of {budget / 2**30:.1f} GiB (widest: {', '.join(widest)}): "
                "--exclude the widest layers, raise --memory-budget, or use sparsegpt, "
                "which measures one layer at a time"
            )

    def base_damping(self) -> float:
        """λ before any escalation: α times the mean Fisher diagonal over every target
        (relative; known once the first group is yielded), or the absolute value."""
        if self.spec.damp_mode == "relative":
            return self.spec.damp * max(self.fisher_scale or 0.0, fisher.TINY)
        return self.spec.damp

    def _damps(self) -> bool:
        """Whether the statistics come with a damping scale (mean diag F over all targets,
        set before the first group is yielded): for the inverse Fisher and gradient rows."""
        return bool(self.needs & {FISHER_INV, GRAD_ROWS})

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the calibration samples (all of them in a single process)."""
        spec = self.spec
        data, gradients = distributed.shard_samples(
            self.calibration, spec.num_grads, spec.grad_batch
        )
        return calibration_batches(
            self.model,
            data,
            gradients * spec.grad_batch,
            self.chunk * spec.grad_batch,
            self.objective,
            self.device,
            self.seed + distributed.rank(),
        )

    def _fisher_scale(self) -> float:
        """Mean Fisher diagonal over every target: a squares-only round of passes."""
        total = count = 0.0
        assert self.plan is not None  # collect() calls this only with a memory plan
        for index, group in enumerate(self.plan.groups, start=1):
            where = f"damping scale, pass {index}/{self.passes}: "
            acc = self._accumulate_group(group, where, curvature=False)
            total += sum(float(s.double().sum()) for s in acc.squares.values())
            count += sum(t.numel for t in group)
        return total / self.spec.num_grads / max(count, 1)

    def _accumulate_group(self, group: list[Target], where: str, curvature: bool) -> _Accumulators:
        """One pass over the calibration samples for ``group``: sums, squares, curvature."""
        spec, m = self.spec, self.spec.num_grads
        acc = _Accumulators(
            group, spec, self.device, curvature, GRAD_ROWS in self.needs, self.cover_unpruned
        )
        with self.timings.phase("statistics"), eval_mode(self.model):
            done = 0
            for x, y in self._batches() if self.needs & PER_SAMPLE else ():
                self._accumulate_pieces(group, x, y, acc, set())
                done += len(x) // spec.grad_batch
                self.say(f"{where}gradients {done}/{m}")
        with self.timings.phase("all-reduce"):
            acc.combine_ranks()
        return acc

    def _collect_group(self, group: list[Target], index: int) -> dict[str, dict[str, Any]]:
        spec, m = self.spec, self.spec.num_grads
        where = f"pass {index}/{self.passes}: " if self.passes > 1 else ""
        acc = self._accumulate_group(group, where, FISHER_INV in self.needs)
        with self.timings.phase("statistics"):
            hessian = self._hessian_gradient(group) if HESSIAN_GRAD in self.needs else {}
        if self._damps() and self.fisher_scale is None:
            self.fisher_scale = fisher.relative_damping(list(acc.squares.values()), 1.0) / m
        out: dict[str, dict[str, Any]] = {}
        for t in group:
            squares = acc.squares[t.name]
            if not torch.isfinite(squares).all():  # any NaN/Inf gradient shows here
                raise NumericalError(
                    f"the gradients of {t.name} contain NaN or Inf; check the model's weights "
                    "and inputs (or lower the learning rate that produced them)"
                )
            stats: dict[str, Any] = {
                GRAD_MEAN: (acc.sums[t.name] / m).reshape(t.weight.shape),
                # × b: with mini-batch gradients this still estimates the per-sample Fisher
                FISHER_DIAG: (squares / m * spec.grad_batch).reshape(t.weight.shape),
            }
            if GRAD_ROWS in self.needs:
                stats[GRAD_ROWS] = acc.pop_rows(t)
            if FISHER_INV in self.needs:
                self.say(f"{where}inverse Fisher of {t.name}")
                with self.timings.phase("inverse"):
                    blocks = self._inverse(t, acc.pop_curvature(t), acc.block(t))
                    stats[FISHER_INV] = BlockInverse(
                        blocks, t.numel, acc.covered.get(t.name), 1 / self.damping[t.name]
                    )
            if t.name in hessian:
                stats[HESSIAN_GRAD] = hessian[t.name]
            out[t.name] = stats
        return out

    def _accumulate(
        self,
        group: list[Target],
        x: torch.Tensor,
        y: torch.Tensor,
        acc: _Accumulators,
        done: set[str],
    ) -> None:
        """Add the gradients of (x, y) to ``acc`` for the targets not in ``done``; on an
        out-of-memory error, halve the chunk and retry the rest in pieces."""
        b = self.spec.grad_batch
        try:
            grads = per_sample_gradients(
                self.model, group, x, y, b, self.objective, self.spec.grad_engine
            )
            for t in group:
                if t.name not in done:
                    acc.add(t, grads[t.name])
                    done.add(t.name)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            grads = None  # frees the chunk's gradients before retrying
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            size = len(x) // b
            if size <= 1:
                self._out_of_memory(group)
            self.chunk = max(1, size // 2)
            self.warnings.append(
                f"out of memory with {size} gradients per chunk; went on with {self.chunk} "
                "(the memory plan underestimated this model; --memory-budget sets it)"
            )
            self._accumulate_pieces(group, x, y, acc, done)
            done.update(t.name for t in group)

    def _accumulate_pieces(
        self,
        group: list[Target],
        x: torch.Tensor,
        y: torch.Tensor,
        acc: _Accumulators,
        done: set[str],
    ) -> None:
        """Accumulate (x, y) in pieces of the current chunk (which may shrink meanwhile)."""
        start = 0
        while start < len(x):
            step = self.chunk * self.spec.grad_batch
            piece = slice(start, start + step)
            self._accumulate(group, x[piece], y[piece], acc, set(done))
            start += step

    def _out_of_memory(self, group: list[Target]) -> None:
        plan = self.plan
        assert plan is not None
        one = sum(target_cost(t, self.spec, self.needs).per_grad for t in group)
        raise OutOfMemoryError(
            f"out of memory at one sample per chunk: one sample needs about "
            f"{size_text(one + plan.activation_bytes)} (gradients {size_text(one)}, "
            f"activations {size_text(plan.activation_bytes)}) on top of "
            f"{size_text(sum(target_cost(t, self.spec, self.needs).kept for t in group))} of "
            f"statistics, and the budget is {size_text(plan.budget)}; lower --memory-budget "
            "if other programs share the device, or lower block_size / num_grads, or "
            "--exclude the largest layers"
        )

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
        distributed.all_reduce_sum(mean_grad)
        mean_grad = [g * t.mask for g, t in zip(mean_grad, group, strict=True)]
        product = [torch.zeros_like(p) for p in params]
        for loss in chunk_losses():
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = cast(
                torch.Tensor,
                sum((g * fixed).sum() for g, fixed in zip(grads, mean_grad, strict=True)),
            )
            for acc, h in zip(product, torch.autograd.grad(dot, params), strict=True):
                acc += h
        distributed.all_reduce_sum(product)
        return {t.name: (h * t.mask).detach() for t, h in zip(group, product, strict=True)}

    def _inverse(self, t: Target, curvature: torch.Tensor, block: int) -> torch.Tensor:
        """The damped blockwise inverse (blocks of ``block``), its blocks shared out between
        the ranks; λ escalates x10 (with a warning) while a block is not positive definite
        on any rank."""
        m = self.spec.num_grads
        damp = self.base_damping()
        first = damp
        gram = curvature.dim() == 3  # Gram blocks, else gradient rows
        if gram:
            part = distributed.shard(len(curvature))
            mine = curvature[part.start : part.stop]
        else:  # this rank's blocks' columns
            part = distributed.shard(fisher.num_blocks(curvature.shape[1], block))
            mine = curvature[:, part.start * block : part.stop * block]
        for _ in range(DAMP_ESCALATIONS + 1):
            try:
                if gram:
                    inverse, ok = fisher.inverse_from_gram(mine, m, damp), True
                else:
                    inverse, ok = fisher.inverse_from_rows(mine, block, damp), True
            except NumericalError:
                inverse, ok = curvature.new_zeros(0, block, block), False
            if distributed.all_agree(ok, self.device):
                if damp != first:
                    self.warnings.append(
                        f"the damped Fisher of {t.name} was not positive definite with "
                        f"λ={first:g}; used λ={damp:g}"
                    )
                self.damping[t.name] = damp
                return distributed.gather_rows(inverse)
            damp *= 10
        raise NumericalError(
            f"the damped Fisher of {t.name} is not positive definite even with "
            f"λ={damp / 10:g}; raise --param damp"
        )


class _Accumulators:
    """Running sums of one pass: gradient sums and squares, and the curvature (Gram blocks
    when m >= B, else the gradient rows for the Woodbury form), or all rows (``keep_rows``).

    With ``covered`` the curvature covers only a target's unpruned coordinates: a pruned
    weight's gradient rows are zero, so its Fisher is λI, uncoupled, and needs no block.
    A step's later sub-steps thus cost in proportion to the weights left."""

    def __init__(
        self,
        group: list[Target],
        spec: StatsSpec,
        device: torch.device,
        curvature: bool,
        keep_rows: bool = False,
        covered: bool = False,
    ) -> None:
        self.spec, self.curvature, self.keep_rows = spec, curvature, keep_rows
        self.sums = {t.name: torch.zeros(t.numel, device=device) for t in group}
        self.squares = {t.name: torch.zeros(t.numel, device=device) for t in group}
        self.rows: dict[str, list[torch.Tensor]] = {t.name: [] for t in group}
        self.curvature_rows: dict[str, list[torch.Tensor]] = {t.name: [] for t in group}
        self.grams: dict[str, torch.Tensor] = {}
        self.covered = {t.name: unpruned(t) for t in group} if curvature and covered else {}
        self.group, self.device = group, device

    def width(self, t: Target) -> int:
        """How many coordinates the curvature covers."""
        index = self.covered.get(t.name)
        return t.numel if index is None else len(index)

    def block(self, t: Target) -> int:
        return self.spec.block_for(t, self.width(t))

    def uses_rows(self, t: Target) -> bool:
        return self.spec.num_grads < self.block(t)

    def add(self, t: Target, g: torch.Tensor) -> None:
        self.sums[t.name] += g.sum(0)
        self.squares[t.name] += g.square().sum(0)
        if self.keep_rows:
            self.rows[t.name].append(g)
        if not self.curvature:
            return
        index = self.covered.get(t.name)
        covered = g if index is None else g.index_select(1, index)
        if self.uses_rows(t):
            self.curvature_rows[t.name].append(covered)
        else:
            gram = fisher.accumulate_gram(self.grams.get(t.name), covered, self.block(t))
            self.grams[t.name] = gram

    def combine_ranks(self) -> None:
        """Sum the sums, squares and Gram blocks over the ranks; gather the rows in order."""
        if not distributed.active():
            return
        distributed.all_reduce_sum([*self.sums.values(), *self.squares.values()])
        for t in self.group:  # a rank without samples holds no Gram yet
            if self.curvature and not self.uses_rows(t) and t.name not in self.grams:
                b = self.block(t)
                shape = (fisher.num_blocks(self.width(t), b), b, b)
                self.grams[t.name] = torch.zeros(shape, device=self.device)
            if self.keep_rows:
                self.rows[t.name] = [self._gathered(self.rows[t.name], t.numel)]
            if self.curvature and self.uses_rows(t):
                rows = self.curvature_rows[t.name]
                self.curvature_rows[t.name] = [self._gathered(rows, self.width(t))]
        distributed.all_reduce_sum([self.grams[t.name] for t in self.group if t.name in self.grams])

    def _gathered(self, parts: list[torch.Tensor], width: int) -> torch.Tensor:
        """Every rank's rows, in rank order."""
        parts = parts or [torch.zeros(0, width, device=self.device)]
        return distributed.gather_rows(torch.cat(parts))

    def pop_rows(self, t: Target) -> torch.Tensor:
        """The (m, d) gradient rows; released here."""
        return torch.cat(self.rows.pop(t.name))

    def pop_curvature(self, t: Target) -> torch.Tensor:
        """(m, covered) rows or (nb, B, B) Gram blocks; released here so they can be freed."""
        if self.uses_rows(t):
            return torch.cat(self.curvature_rows.pop(t.name))
        return self.grams.pop(t.name)


def unpruned(t: Target) -> torch.Tensor | None:
    """The flat positions of a target's unpruned weights, None when none is pruned."""
    flat = t.mask.reshape(-1)
    return None if bool(flat.all()) else flat.nonzero().squeeze(1)


TRIAL_SAMPLES = 4


def check_spec(spec: StatsSpec, available: int) -> None:
    if spec.damp <= 0 or not math.isfinite(spec.damp):
        raise UsageError(f"--param damp={spec.damp}: damping must be positive, e.g. 1e-2")
    if spec.damp_mode not in {"relative", "absolute"}:
        raise UsageError(f"--param damp_mode={spec.damp_mode}: use relative or absolute")
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
