"""The pruner contract: ``Pruner`` (score-based: statistics in, scores out), ``LayerPruner``
(layer-wise: calibrate, then compress each layer), their hyperparameters (``Param``).

A pruner declares the statistics it needs (``needs``) and its hyperparameters (``params``);
the pipeline collects the statistics once and calls ``score`` for every target tensor.
Scoring is a pure function of the weights and the statistics, so it can be tested with
hand-built inputs. Convention: a larger score means keep. Weights that are already masked
are set to -inf by the pipeline, so a pruner never has to care about them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.contract.context import StepContext
from prunekit.contract.quantization import QuantGrid
from prunekit.contract.target import StatsSpec, Target, multiplies_rows
from prunekit.errors import PluginError, PrunekitError, UnknownNameError, UsageError

CONTRACT_VERSION = 1  # raised when a change would break plugins written for the old one


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _of_kind(value: object, kind: type) -> bool:
    """Whether a typed value (from a recipe) is of a parameter's kind; an integer is a number."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


@dataclass(frozen=True)
class Param:
    """A pruner hyperparameter; its type is the type of ``default``."""

    name: str
    default: float | int | str | bool
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # values must be >= minimum (or > when exclusive)
    exclusive_minimum: bool = False

    def parse(self, raw: str | float | int | bool) -> float | int | str | bool:
        kind = type(self.default)
        if not isinstance(raw, str) and not _of_kind(raw, kind):  # a recipe's typed value:
            raise UsageError(  # never coerced (true is not 1, 10.7 is not 10)
                f"--param {self.name}={raw!r}: expected {KIND_NAMES[kind]} ({self.help})"
            )
        try:
            if kind is bool and isinstance(raw, str):
                if raw.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ValueError(raw)
                value: Any = raw.lower() in {"1", "true", "yes"}
            else:
                value = kind(raw)
        except ValueError:
            raise UsageError(
                f"--param {self.name}={raw}: expected {KIND_NAMES[kind]} ({self.help})"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--param {self.name}={raw}: must be a finite number ({self.help})")
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"--param {self.name}={raw}: choose one of {', '.join(self.choices)}")
        if self.minimum is not None:
            too_small = value <= self.minimum if self.exclusive_minimum else value < self.minimum
            if too_small:
                bound = ">" if self.exclusive_minimum else ">="
                raise UsageError(
                    f"--param {self.name}={raw}: must be {bound} {self.minimum} ({self.help})"
                )
        return value


class Pruner:
    """Base class of every pruning criterion (the first docstring line is its summary)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # names from prunekit.api (GRAD_MEAN, ...)
    params: ClassVar[tuple[Param, ...]] = ()
    # the hyperparameters that set how statistics are gathered, each a StatsSpec field
    stats_params: ClassVar[tuple[str, ...]] = ()
    # the plugin contract a class is written for: every pruner declares it (an integer, not
    # CONTRACT_VERSION, in a plugin), so one written before contracts existed is recognised
    contract: ClassVar[int | None] = None
    # whether per-weight scores may be summed over a channel's weights (--structure); false
    # for a pruner that picks weights inside each layer itself (sparsegpt)
    structured: ClassVar[bool] = True
    # with --structure: the sides of a channel whose weights ``set_scores`` scores, the rows
    # that make it ("out") and the columns that read it ("in"); a pruner that measures what
    # removing a channel does to the layers reading it scores the "in" side only
    channel_sides: ClassVar[frozenset[str]] = frozenset({"out", "in"})
    # whether FISHER_INV may come covering only the unpruned weights (``BlockInverse.index``;
    # cheaper in later sub-steps); false keeps the blocks positional along the whole weight
    covered_curvature: ClassVar[bool] = False

    def __init__(self, **values: Any) -> None:
        self.hparams = self.resolve_params(values)
        self.warnings: list[str] = []  # drained into the run's report after every step

    @classmethod
    def resolve_params(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Validate user values against ``params``; fill in defaults."""
        known = {p.name: p for p in cls.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            accepted = ", ".join(known) or "none"
            raise UnknownNameError(
                f"pruner '{cls.name}' has no parameter {', '.join(unknown)}; "
                f"it accepts: {accepted} (see `prunekit pruners show {cls.name}`)"
            )
        return {
            name: p.parse(values[name]) if name in values else p.default
            for name, p in known.items()
        }

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def stats_spec(self) -> StatsSpec:
        """How statistics are gathered: StatsSpec defaults, set by the hyperparameters named
        in ``stats_params`` (declared, never matched by name)."""
        return StatsSpec(**{k: self.hparams[k] for k in self.stats_params})

    def diagnostics(self) -> dict[str, Any]:
        """Anything worth recording in the run's report (e.g. a convergence trace)."""
        return {}

    def prepare(self, context: StepContext, step: int, steps: int) -> None:
        """Called before each pruning step (``step`` of ``steps``, from 1; every sub-step of
        ``--recompute`` counts).

        The pruner object lives for the whole run, so whatever it keeps on ``self`` carries
        over from one step to the next: a gradual schedule lets a learned statistic be refined
        between steps instead of re-estimated from scratch. ``context`` is a
        ``prunekit.api.StepContext`` (model, targets, calibration data, device, seed, memory
        budget, and ``say(text)`` for a progress line).
        """

    @classmethod
    def declared_contract(cls) -> int | None:
        """The contract declared by the class or an ancestor below Pruner (None: none)."""
        for klass in cls.__mro__:
            if klass is not Pruner and "contract" in vars(klass):
                return vars(klass)["contract"]
        return None

    @classmethod
    def compensates(cls) -> bool:
        """Whether ``update`` is overridden (OBS-style weight compensation)."""
        return cls.update is not Pruner.update

    def score(self, target: Target, stats: Mapping[str, Any]) -> torch.Tensor | None:
        """Return one score per weight, shaped like ``target.weight``; larger = keep.

        None declines the tensor: its mask stays as it is in this step.
        """
        raise NotImplementedError

    def set_scores(
        self, target: Target, stats: Mapping[str, Any], sets: torch.Tensor
    ) -> torch.Tensor | None:
        """One score per set of weights removed together (``--structure``): ``sets`` is
        (n, k) flat indices into the weight; larger = keep. The default sums ``score``;
        OBS-style pruners override it with the loss increase of removing the set jointly.
        """
        score = self.score(target, stats)
        if score is None:
            return None
        return score.detach().reshape(-1).double()[sets].sum(1)

    def update(
        self, target: Target, keep: torch.Tensor, stats: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """Optionally return compensated weights for ``target`` given the new mask ``keep``.

        OBS-style pruners override this; the pipeline zeroes the pruned entries afterwards.
        """
        return None


@dataclass(frozen=True)
class LayerRequest:
    """What one layer is compressed to: the fraction of its weights pruned after this step
    (already pruned ones included), or an N:M pattern (``pattern`` = (n, m): n kept of every m
    consecutive inputs of an output, taken in the order ``columns``); with ``grid`` (the last
    step of a ``--quantize`` run) the kept weights are also rounded to it in the same pass,
    and ``Compressed.scales`` holds its scales. A pruner that cannot round returns no
    scales; prunekit rounds afterwards."""

    sparsity: float
    pattern: tuple[int, int] | None = None
    grid: QuantGrid | None = None  # --quantize: also round the kept weights to this grid
    # with a pattern: the order of a row's columns in which each m consecutive ones are a
    # group (contract.target.nm_columns: input channels at each kernel position of a
    # convolution); None: the columns as stored
    columns: torch.Tensor | None = None


@dataclass
class Compressed:
    """A layer's result: the keep-mask (bool, the weight's shape, True = kept) and, for a
    method that compensates, the new weights (prunekit zeroes the pruned entries)."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None
    scales: torch.Tensor | None = None  # with a request's grid: (rows, groups), float32


class LayerPruner(Pruner):
    """Layer-wise pruning in calibrate-then-compress form (SparseGPT-style).

    prunekit visits the supported layers (``supports``) in forward order; for each it
    *calibrates*, measuring H = XᵀX / n of the rows the layer multiplies by its (out, d) weight
    matrix on ``StatsSpec.num_samples`` calibration samples, through the layers already
    compressed, then calls ``compress(target, gram, request)``, writes the result and moves
    on. ``compress`` is a pure function of the weight, its mask and H: it returns the new mask
    (and weights) and never writes them itself. ``score`` is not used; such a pruner cannot
    score channels (``structured`` is False).
    """

    structured = False

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Linear, and Conv2d with groups 1 and numeric padding (as unfolded patches)."""
        return multiplies_rows(module)

    def compress(self, target: Target, gram: torch.Tensor, request: LayerRequest) -> Compressed:
        """The layer's new mask (and weights) for ``request``, given its input Gram matrix
        ``gram`` (float64, (d, d), d = the weight's elements per output row)."""
        raise NotImplementedError

    def score(self, target: Target, stats: Mapping[str, Any]) -> torch.Tensor | None:
        raise UsageError(f"{self.name} compresses layer by layer and has no per-weight score")


SAMPLING_NAMES = ("num_grads", "grad_batch", "fisher", "grad_engine")
SAMPLING_PARAMS = (
    Param("num_grads", 1000, "number m of gradients averaged into the statistics", minimum=1),
    Param("grad_batch", 1, "samples per gradient (1: per-sample gradients)", minimum=1),
    Param(
        "fisher",
        "empirical",
        "labels: empirical (true labels) or true (sampled)",
        choices=("empirical", "true"),
    ),
    Param(
        "grad_engine",
        "hooks",
        "per-sample gradients: hooks (one batched backward; vmap for layers without a rule) "
        "or vmap",
        choices=("hooks", "vmap"),
    ),
)
NUM_SAMPLES = Param(
    "num_samples", 128, "calibration samples whose layer inputs are measured", minimum=1
)
"""The hyperparameter that sets ``StatsSpec.num_samples`` (layer-input statistics)."""


@contextmanager
def guarded(pruner: Pruner, call: str, watched: torch.Tensor | None = None) -> Iterator[None]:
    """Run one call into a pruner's code: whatever it raises (an exception, ``sys.exit``)
    becomes a one-line PluginError naming the pruner and the call, what it prints goes to
    stderr (stdout carries --json), and ``watched`` weights must come back unchanged."""
    before = watched.detach().clone() if watched is not None else None
    try:
        with redirect_stdout(sys.stderr):
            yield
    except PrunekitError:
        raise
    except (Exception, SystemExit) as exc:  # the plugin's own failure, whatever its type
        first = (str(exc).splitlines() or [""])[0][:160]
        raise PluginError(
            f"pruner '{pruner.name}' failed in {call}() ({type(exc).__name__}: {first}); fix "
            "the plugin or use another pruner"
        ) from exc
    if before is not None and watched is not None and not torch.equal(before, watched.detach()):
        raise PluginError(
            f"pruner '{pruner.name}' changed a weight in {call}(); a pruner returns scores "
            "or new weights and never writes them: fix the plugin"
        )
