"""One pruning step: score -> select -> (OBS update) for score-based pruners, or a
layer-by-layer calibrate -> compress pass for layer-wise ones; sub-steps of ``--recompute``.

``Pruning`` is the engine's state over a run's steps: the plugin's view (``StepContext``) plus
what only the engine sees (the pruner object, the channel plan, the statistics reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from prunekit.calibrate.blocks import BlockInputs, on_device, repeated_blocks
from prunekit.calibrate.collector import Collector
from prunekit.calibrate.layer_inputs import input_gram, ordered_targets
from prunekit.contract.context import StepContext
from prunekit.contract.objectives import LABELS, Objective
from prunekit.contract.pruner import Compressed, LayerPruner, LayerRequest, Pruner, guarded
from prunekit.contract.quantization import QuantGrid, QuantizedTensor
from prunekit.contract.target import Target, nm_columns, nm_groups
from prunekit.engine.masks import apply, nm_layout, parse_nm, select, sparsity_of
from prunekit.errors import NumericalError, PluginError, UsageError
from prunekit.runtime import distributed
from prunekit.runtime.timing import Timings
from prunekit.structured.plan import ChannelPlan

AUTO_STEP_FRACTION = 0.25  # --recompute auto: the most one sub-step removes (measured)


@dataclass
class Pruning:
    """The engine's state over the pruning steps of one run."""

    context: StepContext  # what the pruner sees
    pruner: Pruner
    structure: ChannelPlan | None = None  # --structure channels: whole channels per group
    statistics: list[dict[str, Any]] = field(default_factory=list)  # one entry per step
    # --quantize with a layer-wise pruner: the 4-bit grids its last step rounds to, by target,
    # and what it rounded (target name -> codes and scales)
    grids: dict[str, QuantGrid] = field(default_factory=dict)
    rounded: dict[str, QuantizedTensor] = field(default_factory=dict)
    # --layer-sparsity: target name -> its own final sparsity; ``final`` is the run's -s,
    # the others' final sparsity, with which the overrides scale over the steps
    overrides: dict[str, float] = field(default_factory=dict)
    final: float = 0.0
    reached: float = 0.0  # the others' sparsity after the last step

    def own_sparsities(self, sparsity: float, step_progress: float = 1.0) -> dict[str, float]:
        """The overridden targets' sparsities while the others are pruned to ``sparsity``:
        each target's density follows the others' geometrically, (1 - S_t)^f with f the
        others' progress log(1 - s) / log(1 - final), so a sub-step sized for the deepest
        layer removes no more of its weights than of theirs; with final 0, f is the step's
        place in the run (``step_progress``)."""
        if self.final > 0:
            progress = math.log(1.0 - sparsity) / math.log(1.0 - self.final)
        else:
            progress = step_progress
        progress = min(max(progress, 0.0), 1.0)
        return {name: 1.0 - (1.0 - level) ** progress for name, level in self.overrides.items()}

    def deepest(self, sparsity: float) -> float:
        """The highest sparsity any target is pruned to when the others reach ``sparsity``."""
        return max([sparsity, *self.own_sparsities(sparsity).values()])

    def step_progress(self) -> float:
        """The current step's place in the run, in (0, 1]."""
        return self.context.step / max(self.context.total_steps, 1)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        targets: list[Target],
        pruner: Pruner,
        calibration: Dataset,
        device: torch.device,
        mask: str = "global",
        memory_budget: int | None = None,
        seed: int = 0,
        *,
        timings: Timings | None = None,
        objective: Objective = LABELS,
        structure: ChannelPlan | None = None,
    ) -> Pruning:
        context = StepContext(
            model,
            targets,
            calibration,
            device,
            mask,
            memory_budget,
            seed,
            timings=timings or Timings(device),
            objective=objective,
        )
        return cls(context, pruner, structure)

    def collector(self) -> Collector:
        """The statistics collector of the next step: the pruner's needs, on the context."""
        ctx = self.context
        return Collector(
            ctx.model,
            ctx.targets,
            ctx.calibration,
            self.pruner.stats_spec(),
            self.pruner.needs,
            ctx.device,
            ctx.memory_budget,
            ctx.seed,
            timings=ctx.timings,
            say=ctx.say,
            objective=ctx.objective,
            covered=self.pruner.covered_curvature,
        )

    def removed(self) -> float:
        """The fraction pruned so far: of the channels with --structure, else of the weights."""
        if self.structure is not None:
            return self.structure.removed_fraction()
        if self.overrides:  # --layer-sparsity: the level the others were last pruned to
            return self.reached
        return sparsity_of(self.context.targets)[0]


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


def prune_step(state: Pruning, sparsity: float) -> list[str]:
    """Prune once to ``sparsity``; return the warnings of the step."""
    ctx, pruner = state.context, state.pruner
    ctx.step += 1
    where = f"step {ctx.step}/{ctx.total_steps}" if ctx.total_steps > 1 else ""
    outer_say = ctx.say

    def say(text: str) -> None:
        outer_say(f"{where}: {text}" if where else text)

    ctx.sparsity = sparsity
    ctx.say = say
    warnings: list[str]
    try:
        with guarded(pruner, "prepare"), ctx.timings.phase("prepare"):
            pruner.prepare(ctx, ctx.step, ctx.total_steps)
        if isinstance(pruner, LayerPruner):
            keep, warnings = compress_layers(state, sparsity), []
            state.statistics.append({"step": ctx.step})
        else:
            keep, warnings = _score_and_select(state, sparsity)
    finally:
        ctx.say = outer_say
    apply(ctx.targets, keep)
    state.reached = sparsity
    with torch.no_grad():  # decided once: rank 0's masks and weights on every rank
        distributed.broadcast([x for t in ctx.targets for x in (t.weight, t.mask)])
    warnings = list(dict.fromkeys(warnings + pruner.warnings))  # once each
    pruner.warnings = []
    return warnings


def scores_at_start(state: Pruning) -> dict[str, torch.Tensor | None]:
    """Every target's score at the current weights (the pruner prepared for one step), with
    no mask chosen and no weight moved: what a sensitivity scan ranks each layer by."""
    ctx, pruner = state.context, state.pruner
    ctx.step, ctx.total_steps = 1, 1
    with guarded(pruner, "prepare"), ctx.timings.phase("prepare"):
        pruner.prepare(ctx, 1, 1)
    scores: dict[str, torch.Tensor | None] = {}
    for group, stats in state.collector().collect():
        with ctx.timings.phase("prune"):
            for t in group:
                with guarded(pruner, "score", t.weight):
                    score = pruner.score(t, stats[t.name])
                scores[t.name] = None if score is None else score.detach().float().cpu()
    return scores


def _score_and_select(state: Pruning, sparsity: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Statistics -> scores -> masks, then the OBS update for pruners that compensate."""
    ctx, pruner = state.context, state.pruner
    collector = state.collector()
    compensates = pruner.compensates()
    retain = compensates and collector.retains_for_update()
    scores: dict[str, torch.Tensor | None] = {}
    kept: list[tuple[list[Target], dict[str, dict[str, Any]]]] = []
    for group, stats in collector.collect():
        with ctx.timings.phase("prune"):
            for t in group:
                if state.structure is None:
                    with guarded(pruner, "score", t.weight):
                        scores[t.name] = pruner.score(t, stats[t.name])
                else:
                    state.structure.add_scores(t, pruner, stats[t.name])
        if retain:
            kept.append((group, stats if collector.passes == 1 else _to_host(stats)))
    if state.structure is None and scores and all(v is None for v in scores.values()):
        raise PluginError(
            f"pruner '{pruner.name}' declined every tensor (score returned None for all "
            f"{len(scores)}): nothing would be pruned; fix the plugin or use another pruner"
        )
    with ctx.timings.phase("prune"):
        if state.structure is None:
            own = state.own_sparsities(sparsity, state.step_progress())
            keep = select(ctx.targets, scores, sparsity, ctx.mask, own)
        else:  # the channels' masks; the layers outside every group keep theirs
            chosen = state.structure.select(sparsity, ctx.mask)
            keep = {t.name: chosen.get(t.name, t.mask) & t.mask for t in ctx.targets}
    if compensates:
        updates = {}  # applied after all passes, so every pass sees the same weights
        for group, stats in kept or collector.collect():  # a second round only if not kept
            with ctx.timings.phase("prune"):
                for t in group:
                    own = {k: v.to(ctx.device) for k, v in stats[t.name].items()}
                    with guarded(pruner, "update", t.weight):
                        updated = pruner.update(t, keep[t.name], own)
                    if updated is not None:
                        _check_update(pruner, t, updated)
                        updates[t.name] = updated
        with torch.no_grad():
            for t in ctx.targets:
                if t.name in updates:
                    t.weight.copy_(updates[t.name])
    report = {"step": ctx.step, **collector.report()}
    if compensates:
        report["update_passes"] = 0 if kept else collector.passes
    state.statistics.append(report)
    return keep, collector.warnings


def _to_host(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Move a pass's statistics to host memory until the update needs them."""
    return {name: {k: v.cpu() for k, v in s.items()} for name, s in stats.items()}


def compress_layers(state: Pruning, sparsity: float) -> dict[str, torch.Tensor]:
    """A layer-wise pruner's step: every supported layer in forward order, its input Gram
    matrix measured through the layers compressed before it, then ``compress``; the new
    weights are written (pruned entries zero) before the next layer is measured."""
    ctx = state.context
    pruner = state.pruner
    assert isinstance(pruner, LayerPruner)
    last = ctx.step == ctx.total_steps
    supported = {t.name: t for t in ctx.targets if pruner.supports(t.module)}
    skipped = [t.name for t in ctx.targets if t.name not in supported]
    if skipped and ctx.step == 1:
        pruner.warnings.append(
            f"{pruner.name} handles Linear and Conv2d (groups 1): left {', '.join(skipped)}"
        )
    keep = {t.name: t.mask.clone() for t in ctx.targets}
    samples = pruner.stats_spec().num_samples
    own = state.own_sparsities(sparsity, state.step_progress())
    pattern = parse_nm(ctx.mask)

    def compress(name: str, gram: torch.Tensor) -> None:
        t = supported[name]
        grid = state.grids.get(name) if last else None
        columns = nm_columns(t.weight.shape, nm_layout(ctx.mask)) if pattern else None
        request = LayerRequest(own.get(name, sparsity), pattern, grid, columns)
        with ctx.timings.phase("prune"):
            with guarded(pruner, "compress", t.weight):
                compressed = pruner.compress(t, gram, request)
            result = _checked_compression(pruner, t, compressed, request)
            if grid is not None and result.scales is not None and result.weight is not None:
                state.rounded[name] = grid.on_grid(result.weight, result.scales)
            with torch.no_grad():
                if result.weight is not None:
                    t.weight.copy_(result.weight)
                keep[name] = result.keep.to(t.mask.device) & t.mask
                t.weight.masked_fill_(~keep[name], 0.0)

    order = ordered_targets(ctx.model, list(supported))
    done: set[str] = set()
    stack = repeated_blocks(ctx.model) if getattr(ctx.model, "kind", None) == "decoder" else None
    if stack is not None:  # a decoder: one block at a time, measured through that block only
        prefix, blocks = stack
        with ctx.timings.phase("statistics"):
            inputs = BlockInputs(ctx.model, blocks[0], ctx.calibration, samples, ctx.device)
        for index, block in enumerate(blocks):
            inside = [n for n in order if n.startswith(f"{prefix}.{index}.")]
            with on_device(block, ctx.device):
                for name in inside:
                    ctx.say(f"{pruner.name}: {name}")
                    with ctx.timings.phase("statistics"):
                        gram = inputs.gram(block, supported[name].module)
                    compress(name, gram)
                    done.add(name)
                with ctx.timings.phase("statistics"):
                    inputs.advance(block)
    home = next((p.device for p in ctx.model.parameters()), ctx.device)  # (host: offloaded)
    for name in (n for n in order if n not in done):
        ctx.say(f"{pruner.name}: {name}")
        with ctx.timings.phase("statistics"):
            gram = input_gram(ctx.model, supported[name].module, ctx.calibration, samples, home)
        compress(name, gram)
    return keep


def _check_update(pruner: Pruner, target: Target, updated: object) -> None:
    """An update is a finite tensor of the weight's shape, or the pruner is broken."""
    if not isinstance(updated, torch.Tensor) or updated.shape != target.weight.shape:
        shape = tuple(updated.shape) if isinstance(updated, torch.Tensor) else type(updated)
        raise PluginError(
            f"pruner '{pruner.name}': update() for {target.name} returned {shape}, not a "
            f"tensor of shape {tuple(target.weight.shape)}; fix the plugin"
        )
    if not torch.isfinite(updated).all():
        raise NumericalError(
            f"pruner '{pruner.name}': update() for {target.name} returned NaN or Inf; raise "
            "--param damp, or fix the plugin"
        )


def _checked_compression(
    pruner: Pruner, target: Target, result: Compressed, request: LayerRequest | None = None
) -> Compressed:
    shape = tuple(target.weight.shape)
    if not isinstance(result, Compressed) or result.keep.dtype != torch.bool:
        raise NumericalError(
            f"{pruner.name}.compress must return Compressed with a bool keep-mask; the pruner "
            "is broken"
        )
    for what, tensor in (("keep-mask", result.keep), ("weight", result.weight)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise NumericalError(
                f"{pruner.name}: the {what} for {target.name} has shape {tuple(tensor.shape)}, "
                f"expected {shape}; the pruner is broken"
            )
    if result.weight is not None and not torch.isfinite(result.weight).all():
        raise NumericalError(
            f"{pruner.name}: the new weights of {target.name} hold NaN or Inf; raise --param damp"
        )
    if request is not None and request.pattern is not None:  # the pattern, in its layout
        n, m = request.pattern
        groups = nm_groups(result.keep.reshape(shape[0], -1), m, request.columns)
        if bool((groups.sum(-1) > n).any()):
            raise PluginError(
                f"{pruner.name}: the keep-mask of {target.name} keeps more than {n} of some "
                f"group of {m} inputs taken in the order LayerRequest.columns (a convolution's "
                "input channels at each kernel position); fix the plugin"
            )
    return result


def oneshot(state: Pruning, sparsity: float, recompute: int | None = 1) -> list[str]:
    """Prune to ``sparsity`` in ``recompute`` sub-steps (None: auto); return the warnings."""
    start = state.removed()
    if recompute is None:
        recompute = auto_recompute(state.pruner, start, state.deepest(sparsity), state.context.mask)
    if recompute < 1:
        raise UsageError(f"--recompute {recompute}: give at least 1 sub-step")
    warnings: list[str] = []
    for step_sparsity in substep_sparsities(start, sparsity, recompute):
        warnings += prune_step(state, step_sparsity)
    return warnings
