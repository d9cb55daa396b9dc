"""Pruning schedules, each one plan of pruning and training phases.

- ``oneshot``: prune to the target in K sub-steps (``--recompute``), recomputing the
  statistics at the updated weights before each (density interpolated geometrically), then
  optionally fine-tune with the masks held. ``--recompute auto`` (the default) gives
  OBS-style pruners enough sub-steps that none removes more than ``AUTO_STEP_FRACTION`` of
  the remaining weights, and every other pruner one step;
- ``gradual``: the cubic schedule of Zhu & Gupta, s_k = s_f + (s_i - s_f)(1 - k/n)³ for
  k = 1..n, with fine-tuning between steps and after the last;
- ``pbt``: pruning before training: re-initialise the architecture (seeded), train
  ``warmup_epochs`` dense, prune once, then train ``epochs`` with the mask held.

``ScheduleConfig.plan`` writes the shape of each once; ``run_schedule`` walks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.engine.distill import Distillation
from prunekit.engine.masks import sparsity_of
from prunekit.engine.step import Pruning, auto_recompute, oneshot
from prunekit.engine.train import TrainConfig, train
from prunekit.errors import UsageError

SCHEDULES = ("oneshot", "gradual", "pbt")


@dataclass(frozen=True)
class Prune:
    """Prune from ``start`` to ``level`` in ``recompute`` sub-steps (None: auto)."""

    start: float
    level: float
    recompute: int | None
    step: int  # its number in the schedule (0: the initial step of a gradual schedule)
    steps: int


@dataclass(frozen=True)
class Train:
    """Train ``epochs`` with the masks held (nothing when 0)."""

    epochs: int
    phase: str


@dataclass(frozen=True)
class Reinitialize:
    """Fresh, seeded weights and full masks (pruning before training)."""


Phase = Prune | Train | Reinitialize


MAX_STEPS = 1000  # pruning steps or sub-steps: more can only be a mistake
MAX_EPOCHS = 100_000


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
        if self.recompute is not None and not 1 <= self.recompute <= MAX_STEPS:
            raise UsageError(f"--recompute {self.recompute}: give 1 to {MAX_STEPS} sub-steps")
        if not 1 <= self.steps <= MAX_STEPS:
            raise UsageError(f"--steps {self.steps}: give 1 to {MAX_STEPS} pruning steps")
        if not 0.0 <= self.initial_sparsity <= sparsity:
            raise UsageError(
                f"--initial-sparsity {self.initial_sparsity} must be in [0, --sparsity "
                f"{sparsity}]: the schedule only adds sparsity"
            )
        for name in ("finetune_epochs", "warmup_epochs", "epochs"):
            if not 0 <= getattr(self, name) <= MAX_EPOCHS:
                raise UsageError(f"--{name.replace('_', '-')} must be from 0 to {MAX_EPOCHS}")
        self._check_fits_kind()
        self.train.check()

    def _check_fits_kind(self) -> None:
        """Options another schedule reads, and schedules that would do nothing they name."""
        if self.kind != "gradual" and self.steps != 1:
            raise UsageError(
                f"--steps {self.steps} applies to --schedule gradual; add it, or drop --steps "
                "(oneshot takes --recompute K sub-steps)"
            )
        if self.kind == "gradual" and self.steps < 2:
            raise UsageError(
                "--schedule gradual prunes in --steps N (2 or more) with fine-tuning between: "
                "give --steps, or use --schedule oneshot --finetune-epochs N"
            )
        if self.kind != "pbt" and (self.epochs or self.warmup_epochs):
            flag = "--epochs" if self.epochs else "--warmup-epochs"
            raise UsageError(
                f"{flag} applies to --schedule pbt; fine-tuning after pruning is "
                "--finetune-epochs N"
            )
        if self.kind == "pbt" and not self.epochs:
            raise UsageError(
                "--schedule pbt re-initialises the weights and trains the pruned network for "
                "--epochs N: give --epochs (without it the result is untrained)"
            )
        if self.kind == "pbt" and self.finetune_epochs:
            raise UsageError("--schedule pbt trains for --epochs N: drop --finetune-epochs")

    def trains(self) -> bool:
        return bool(self.finetune_epochs or self.warmup_epochs or self.epochs)

    def plan(self, sparsity: float) -> list[Phase]:
        """The phases of this schedule, in order."""
        if self.kind == "pbt":
            return [
                Reinitialize(),
                Train(self.warmup_epochs, "warm-up"),
                Prune(0.0, sparsity, self.recompute, 1, 1),
                Train(self.epochs, "train"),
            ]
        if self.kind != "gradual":
            return [
                Prune(0.0, sparsity, self.recompute, 1, 1),
                Train(self.finetune_epochs, "fine-tune"),
            ]
        n = self.steps
        phases: list[Phase] = []
        if self.initial_sparsity > 0:
            phases.append(Prune(0.0, self.initial_sparsity, 1, 0, n))
        levels = cubic_sparsities(self.initial_sparsity, sparsity, n)
        starts = [self.initial_sparsity, *levels[:-1]]
        for k, (start, level) in enumerate(zip(starts, levels, strict=True), start=1):
            phases.append(Prune(start, level, self.recompute, k, n))
            phases.append(Train(self.finetune_epochs, f"fine-tune {k}/{n}"))
        return phases

    def pruning_steps(self, sparsity: float) -> list[Prune]:
        """The pruning phases of the plan, in order."""
        return [p for p in self.plan(sparsity) if isinstance(p, Prune)]

    def stepped(self, sparsity: float) -> bool:
        """Whether the sparsity is reached in more than one step (sub-steps included)."""
        steps = self.pruning_steps(sparsity)
        return len(steps) > 1 or any((p.recompute or 1) > 1 for p in steps)


def cubic_sparsities(initial: float, final: float, steps: int) -> list[float]:
    """The sparsity after each gradual step k = 1..n; the last is exactly ``final``."""
    between = [final + (initial - final) * (1 - k / steps) ** 3 for k in range(1, steps)]
    return [*between, final]


def reinitialize(model: nn.Module, seed: int) -> None:
    """Fresh, seeded initialisation of every layer (BatchNorm statistics reset too)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            cast("Callable[[], None]", module.reset_parameters)()


def run_schedule(
    state: Pruning,
    sparsity: float,
    schedule: ScheduleConfig,
    train_data: Dataset,
    evaluate: Callable[[nn.Module], float | None] | None = None,
    on_event: Callable[[str], None] | None = None,
    distillation: Distillation | None = None,
    augment: bool = False,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Apply ``schedule``; return warnings and a history of pruning and training events.
    Training phases distill from ``distillation``'s teacher and augment images when asked."""
    schedule.check(sparsity)
    ctx = state.context
    warnings: list[str] = []
    history: list[dict[str, Any]] = []
    say = on_event or (lambda _: None)
    ctx.say = say
    phases = schedule.plan(sparsity)
    ctx.total_steps = sum(
        p.recompute
        if p.recompute is not None
        else auto_recompute(state.pruner, p.start, state.deepest(p.level), ctx.mask)
        for p in phases
        if isinstance(p, Prune)
    )
    for phase in phases:
        if isinstance(phase, Reinitialize):
            reinitialize(ctx.model, ctx.seed)
            for t in ctx.targets:
                t.mask = torch.ones_like(t.mask)
            if state.structure is not None:
                state.structure.reset()
        elif isinstance(phase, Train):
            if not phase.epochs:
                continue
            say(f"{phase.phase}: training {phase.epochs} epoch(s)")
            with ctx.timings.phase("training"):
                records = train(
                    ctx.model,
                    train_data,
                    epochs=phase.epochs,
                    device=ctx.device,
                    config=schedule.train,
                    seed=ctx.seed,
                    targets=ctx.targets,
                    evaluate=evaluate,
                    distillation=distillation,
                    augment=augment,
                )
            history.extend({"phase": phase.phase, **r} for r in records)
        else:
            say(f"pruning step {phase.step}/{phase.steps} to {phase.level:.2%}")
            warnings.extend(oneshot(state, phase.level, phase.recompute))
            achieved, _ = sparsity_of(ctx.targets)
            entry: dict[str, Any] = {
                "phase": f"prune {phase.step}/{phase.steps}",
                "sparsity": achieved,
            }
            if state.structure is not None:
                entry["channels_removed"] = state.structure.removed_fraction()
            if evaluate is not None and schedule.trains():  # else the final accuracy says it
                with ctx.timings.phase("evaluation"):
                    entry["validation_accuracy"] = evaluate(ctx.model)
            history.append(entry)
    return warnings, history
