"""Pruning schedules.

- ``oneshot``: prune to the target in K sub-steps (``--recompute``), recomputing the
  statistics at the updated weights before each (density interpolated geometrically), then
  optionally fine-tune with the masks held. ``--recompute auto`` (the default) gives
  OBS-style pruners enough sub-steps that none removes more than ``AUTO_STEP_FRACTION`` of
  the remaining weights, and every other pruner one step;
- ``gradual``: the cubic schedule of Zhu & Gupta, s_k = s_f + (s_i - s_f)(1 - k/n)³ for
  k = 1..n, with fine-tuning between steps and after the last;
- ``pbt``: pruning before training: re-initialise the architecture (seeded), train
  ``warmup_epochs`` dense, prune once, then train ``epochs`` with the mask held.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit import distributed
from prunekit.errors import UsageError
from prunekit.masks import apply, parse_nm, select, sparsity_of
from prunekit.objectives import LABELS, Objective
from prunekit.pruners.base import Pruner, Target
from prunekit.stats import Collector
from prunekit.structured import ChannelPlan
from prunekit.timing import Timings
from prunekit.train import TrainConfig, train


@dataclass
class StepContext:
    """What every pruning step needs besides the sparsity."""

    model: nn.Module
    targets: Sequence[Target]
    pruner: Pruner
    calibration: Dataset
    device: torch.device
    mask: str = "global"
    memory_budget: int | None = None
    seed: int = 0
    step: int = 0  # pruning steps taken so far (sub-steps of --recompute included)
    sparsity: float = 0.0  # the sparsity the current step prunes to (set before prepare)
    total_steps: int = 1
    say: Callable[[str], None] = lambda _: None  # progress line for long pruner work
    timings: Timings = field(default_factory=Timings)
    objective: Objective = LABELS  # the loss of the gradient statistics (prunekit.objectives)
    structure: ChannelPlan | None = None  # --structure channels: whole channels per group
    statistics: list[dict[str, Any]] = field(default_factory=list)  # one entry per step


AUTO_STEP_FRACTION = 0.25  # --recompute auto: the most one sub-step removes (measured)


def auto_recompute(pruner: Pruner, start: float, final: float, mask: str = "global") -> int:
    """Sub-steps for ``--recompute auto``: 1 unless the pruner compensates (OBS-style),
    else enough that each removes at most AUTO_STEP_FRACTION of the remaining weights."""
    if not pruner.compensates() or final <= start or parse_nm(mask) is not None:
        return 1  # (an N:M pattern has no intermediate sparsity)
    ratio = math.log((1.0 - final) / (1.0 - start)) / math.log(1.0 - AUTO_STEP_FRACTION)
    return max(1, math.ceil(ratio - 1e-9))


def substep_sparsities(start: float, final: float, steps: int) -> list[float]:
    """Sparsities after each of ``steps`` sub-steps, densities interpolated geometrically."""
    d0, d1 = 1.0 - start, 1.0 - final
    between = [1.0 - d0 * (d1 / d0) ** (k / steps) for k in range(1, steps)]
    return [*between, final]


def prune_step(ctx: StepContext, sparsity: float) -> list[str]:
    """Score, select and (for OBS-style pruners) compensate once; return warnings."""
    ctx.step += 1
    where = f"step {ctx.step}/{ctx.total_steps}" if ctx.total_steps > 1 else ""

    def say(text: str) -> None:
        ctx.say(f"{where}: {text}" if where else text)

    ctx.sparsity = sparsity
    ctx.pruner.prepare(ctx, ctx.step, ctx.total_steps)
    collector = Collector(
        ctx.model,
        ctx.targets,
        ctx.calibration,
        ctx.pruner.stats_spec(),
        ctx.pruner.needs,
        ctx.device,
        ctx.memory_budget,
        ctx.seed,
        timings=ctx.timings,
        say=say,
        objective=ctx.objective,
    )
    compensates = ctx.pruner.compensates()
    retain = compensates and collector.retains_for_update()
    scores: dict[str, torch.Tensor] = {}
    kept: list[tuple[list[Target], dict[str, dict[str, torch.Tensor]]]] = []
    for group, stats in collector.collect():
        with ctx.timings.phase("prune"):
            for t in group:
                if ctx.structure is None:
                    scores[t.name] = ctx.pruner.score(t, stats[t.name])
                else:
                    ctx.structure.add_scores(t, ctx.pruner, stats[t.name])
        if retain:
            kept.append((group, stats if collector.passes == 1 else _to_host(stats)))
    with ctx.timings.phase("prune"):
        if ctx.structure is None:
            keep = select(ctx.targets, scores, sparsity, ctx.mask)
        else:  # the channels' masks; the layers outside every group keep theirs
            chosen = ctx.structure.select(sparsity, ctx.mask)
            keep = {t.name: chosen.get(t.name, t.mask) & t.mask for t in ctx.targets}
    if compensates:
        updates = {}  # applied after all passes, so every pass sees the same weights
        for group, stats in kept or collector.collect():  # a second round only if not kept
            with ctx.timings.phase("prune"):
                for t in group:
                    own = {k: v.to(ctx.device) for k, v in stats[t.name].items()}
                    updated = ctx.pruner.update(t, keep[t.name], own)
                    if updated is not None:
                        updates[t.name] = updated
        with torch.no_grad():
            for t in ctx.targets:
                if t.name in updates:
                    t.weight.copy_(updates[t.name])
    apply(ctx.targets, keep)
    with torch.no_grad():  # decided once: rank 0's masks and weights on every rank
        distributed.broadcast([x for t in ctx.targets for x in (t.weight, t.mask)])
    ctx.statistics.append(
        {"step": ctx.step, **collector.report(), "update_passes": 0 if kept else collector.passes}
        if compensates
        else {"step": ctx.step, **collector.report()}
    )
    warnings = list(dict.fromkeys(collector.warnings + ctx.pruner.warnings))  # once each
    ctx.pruner.warnings = []
    return warnings


def _to_host(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Move a pass's statistics to host memory until the update needs them."""
    return {name: {k: v.cpu() for k, v in s.items()} for name, s in stats.items()}


def oneshot(ctx: StepContext, sparsity: float, recompute: int | None = 1) -> list[str]:
    """Prune to ``sparsity`` in ``recompute`` sub-steps (None: auto); return the warnings."""
    start = ctx.structure.removed_fraction() if ctx.structure else sparsity_of(ctx.targets)[0]
    if recompute is None:
        recompute = auto_recompute(ctx.pruner, start, sparsity, ctx.mask)
    if recompute < 1:
        raise UsageError(f"--recompute {recompute}: give at least 1 sub-step")
    warnings: list[str] = []
    for step_sparsity in substep_sparsities(start, sparsity, recompute):
        warnings += prune_step(ctx, step_sparsity)
    return warnings


SCHEDULES = ("oneshot", "gradual", "pbt")


def recompute_of(text: str) -> int | None:
    """``--recompute``: auto (None) or a number of sub-steps."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--recompute {text}: give auto or a number of sub-steps") from None


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "oneshot"
    recompute: int | None = None  # sub-steps per pruning step; None: auto
    steps: int = 1
    initial_sparsity: float = 0.0
    finetune_epochs: int = 0
    warmup_epochs: int = 0
    epochs: int = 0  # pbt: training epochs after the mask is chosen
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, sparsity: float) -> None:
        if self.kind not in SCHEDULES:
            raise UsageError(f"--schedule {self.kind}: use one of {', '.join(SCHEDULES)}")
        if self.recompute is not None and self.recompute < 1:
            raise UsageError(f"--recompute {self.recompute}: give at least 1 sub-step")
        if self.steps < 1:
            raise UsageError(f"--steps {self.steps}: give at least 1 pruning step")
        if not 0.0 <= self.initial_sparsity <= sparsity:
            raise UsageError(
                f"--initial-sparsity {self.initial_sparsity} must be in [0, --sparsity "
                f"{sparsity}]: the schedule only adds sparsity"
            )
        for name in ("finetune_epochs", "warmup_epochs", "epochs"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
        self.train.check()

    def trains(self) -> bool:
        return bool(self.finetune_epochs or self.warmup_epochs or self.epochs)

    def pruning_steps(self, sparsity: float) -> list[tuple[float, float, int | None]]:
        """(from, to, sub-steps) of every pruning step, in order."""
        if self.kind != "gradual":
            return [(0.0, sparsity, self.recompute)]
        steps = [(0.0, self.initial_sparsity, 1)] if self.initial_sparsity > 0 else []
        levels = cubic_sparsities(self.initial_sparsity, sparsity, self.steps)
        starts = [self.initial_sparsity, *levels[:-1]]
        return steps + [(a, b, self.recompute) for a, b in zip(starts, levels, strict=True)]


def cubic_sparsities(initial: float, final: float, steps: int) -> list[float]:
    """The sparsity after each gradual step k = 1..n; the last is exactly ``final``."""
    between = [final + (initial - final) * (1 - k / steps) ** 3 for k in range(1, steps)]
    return [*between, final]


def reinitialize(model: nn.Module, seed: int) -> None:
    """Fresh, seeded initialisation of every layer (BatchNorm statistics reset too)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()


def run_schedule(
    ctx: StepContext,
    sparsity: float,
    schedule: ScheduleConfig,
    train_data: Dataset,
    evaluate: Callable[[nn.Module], float] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Apply ``schedule``; return warnings and a history of pruning and training events."""
    schedule.check(sparsity)
    warnings: list[str] = []
    history: list[dict[str, Any]] = []
    say = on_event or (lambda _: None)
    ctx.say = say
    plan = schedule.pruning_steps(sparsity)
    ctx.total_steps = sum(
        k if k is not None else auto_recompute(ctx.pruner, start, level, ctx.mask)
        for start, level, k in plan
    )

    def fit(epochs: int, phase: str) -> None:
        if not epochs:
            return
        say(f"{phase}: training {epochs} epoch(s)")
        with ctx.timings.phase("training"):
            records = train(
                ctx.model,
                train_data,
                epochs=epochs,
                device=ctx.device,
                config=schedule.train,
                seed=ctx.seed,
                targets=ctx.targets,
                evaluate=evaluate,
            )
        history.extend({"phase": phase, **r} for r in records)

    def prune_to(target: float, step: int, steps: int, recompute: int | None) -> None:
        say(f"pruning step {step}/{steps} to {target:.2%}")
        warnings.extend(oneshot(ctx, target, recompute))
        achieved, _ = sparsity_of(ctx.targets)
        entry: dict[str, Any] = {"phase": f"prune {step}/{steps}", "sparsity": achieved}
        if ctx.structure is not None:
            entry["channels_removed"] = ctx.structure.removed_fraction()
        if evaluate is not None and schedule.trains():  # else the run's final accuracy says it
            with ctx.timings.phase("evaluation"):
                entry["accuracy"] = evaluate(ctx.model)
        history.append(entry)

    if schedule.kind == "oneshot":
        prune_to(sparsity, 1, 1, schedule.recompute)
        fit(schedule.finetune_epochs, "fine-tune")
    elif schedule.kind == "gradual":
        if schedule.initial_sparsity > 0:
            prune_to(schedule.initial_sparsity, 0, schedule.steps, 1)
        levels = cubic_sparsities(schedule.initial_sparsity, sparsity, schedule.steps)
        for step, level in enumerate(levels, start=1):
            prune_to(level, step, schedule.steps, schedule.recompute)
            fit(schedule.finetune_epochs, f"fine-tune {step}/{schedule.steps}")
    else:  # pbt
        reinitialize(ctx.model, ctx.seed)
        for t in ctx.targets:
            t.mask = torch.ones_like(t.mask)
        if ctx.structure is not None:
            ctx.structure.reset()
        fit(schedule.warmup_epochs, "warm-up")
        prune_to(sparsity, 1, 1, schedule.recompute)
        fit(schedule.epochs, "train")
    return warnings, history
