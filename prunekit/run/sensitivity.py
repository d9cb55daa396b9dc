"""``prunekit sensitivity``: prune each layer alone over a few sparsities, measure the test
accuracy, and allocate per-layer sparsities that meet an overall target at the least summed
accuracy drop (a recipe of ``layer_sparsity`` for ``prunekit prune``).

Each layer is ranked by the pruner's scores at the dense weights (one statistics pass for
all layers, no weight update), its lowest fraction masked, the model evaluated, the layer
restored. The allocation reads each layer's drop as a curve through (0, 0) and the measured
points (linear between them, never falling) and raises, 0.01 at a time, the layer whose next
step costs the least drop per removed weight, until the removed weights reach the target.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from prunekit.contract.objectives import resolve_objective, returns_embeddings
from prunekit.contract.pruner import LayerPruner
from prunekit.engine.masks import check_sparsity
from prunekit.engine.step import Pruning, scores_at_start
from prunekit.errors import UsageError
from prunekit.pruners import registry
from prunekit.run.config import PruneConfig
from prunekit.run.pipeline import check, checked_model, load_inputs
from prunekit.runtime.device import resolve_device
from prunekit.runtime.outputs import staged_dir
from prunekit.validate.metrics import accuracy

STEP = 0.01  # the allocation's sparsity step per layer


@dataclass
class LayerScan:
    """One layer's accuracy with the lowest-scored fraction of its weights masked."""

    name: str
    weights: int
    accuracy: dict[float, float]  # sparsity -> test accuracy with only this layer pruned

    def drop_curve(self, dense: float) -> tuple[list[float], list[float]]:
        """(sparsities, accuracy drops) through (0, 0), never falling."""
        levels = sorted(self.accuracy)
        drops, worst = [0.0], 0.0
        for level in levels:
            worst = max(worst, dense - self.accuracy[level])
            drops.append(worst)
        return [0.0, *levels], drops


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    for i in range(1, len(xs)):
        if x <= xs[i] + 1e-12:
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[-1]


def allocate(layers: Sequence[LayerScan], dense: float, target: float) -> dict[str, float]:
    """Per-layer sparsities whose removed weights reach ``target`` of all, raised greedily by
    the least accuracy drop per removed weight (ties: the larger layer first)."""
    total = sum(layer.weights for layer in layers)
    ceiling = {layer.name: max(layer.accuracy) for layer in layers}
    reachable = sum(layer.weights * ceiling[layer.name] for layer in layers)
    if reachable < target * total - 1e-9:
        raise UsageError(
            f"target {target:g} is above what the scanned sparsities reach "
            f"({reachable / total:.3f} with every layer at its highest): add a higher level "
            "to --sparsities"
        )
    curves = {layer.name: layer.drop_curve(dense) for layer in layers}
    level = {layer.name: 0.0 for layer in layers}
    size = {layer.name: layer.weights for layer in layers}

    def step_cost(name: str) -> tuple[float, float]:
        here = level[name]
        there = min(here + STEP, ceiling[name])
        xs, ys = curves[name]
        rise = _interpolate(xs, ys, there) - _interpolate(xs, ys, here)
        return rise / ((there - here) * size[name]), there

    heap = [(step_cost(n)[0], -size[n], i, n) for i, n in enumerate(level) if ceiling[n] > 0]
    heapq.heapify(heap)
    removed = 0.0
    while removed < target * total - 1e-9 and heap:
        _, _, index, name = heapq.heappop(heap)
        there = step_cost(name)[1]
        removed += (there - level[name]) * size[name]
        level[name] = there
        if level[name] < ceiling[name] - 1e-12:
            heapq.heappush(heap, (step_cost(name)[0], -size[name], index, name))
    return {name: round(value, 4) for name, value in level.items()}


def scan(
    config: PruneConfig,
    levels: Sequence[float],
    max_samples: int | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The scan of ``config.model`` (``config.sparsity`` is the allocation's target)."""
    check(config)
    if not levels:
        raise UsageError("--sparsities is empty: give levels such as 0.5,0.7,0.9")
    for value in levels:
        check_sparsity(value)
        if value == 0:
            raise UsageError("--sparsities 0 measures nothing: give levels above 0")
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"--max-samples {max_samples}: give at least 1")
    pruner = registry.create(config.pruner, config.params)
    if isinstance(pruner, LayerPruner):
        raise UsageError(
            f"{pruner.name} compresses layer by layer and ranks nothing up front; scan with "
            "a scoring pruner (magnitude, wanda, woodfisher...) and prune with the recipe"
        )
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    inputs = load_inputs(config)
    model, data, warnings = inputs.model, inputs.data, list(inputs.notes)
    if not data.labeled:
        raise UsageError(
            f"the scan measures accuracy and {data.spec} has no labels: give labelled --data"
        )
    model, _, targets = checked_model(config, model, data, device, warnings)
    objective = resolve_objective(config.objective, True, returns_embeddings(model), data.spec)
    state = Pruning.of(model, targets, pruner, data.calibration, device, "layer",
                       config.memory_budget, config.seed, objective=objective)  # fmt: skip
    say(f"scores of {len(targets)} layers by {pruner.name}")
    scores = scores_at_start(state)
    test = data.test
    if max_samples is not None and max_samples < len(test):  # type: ignore[arg-type]
        test = Subset(test, range(max_samples))
    dense = accuracy(model, test, device)
    layers: list[LayerScan] = []
    skipped = [t.name for t in targets if scores.get(t.name) is None]
    for index, t in enumerate(t for t in targets if scores.get(t.name) is not None):
        score = scores[t.name]
        assert score is not None
        order = torch.argsort(score.reshape(-1), stable=True).to(t.weight.device)
        original = t.weight.detach().clone()
        measured = {}
        for level in sorted(levels):
            say(f"layer {index + 1}/{len(targets) - len(skipped)} {t.name} at {level:g}")
            with torch.no_grad():
                flat = t.weight.view(-1)
                flat[order[: round(level * t.numel)]] = 0.0
            measured[float(level)] = accuracy(model, test, device)
            with torch.no_grad():
                t.weight.copy_(original)
        layers.append(LayerScan(t.name, t.numel, measured))
    if not layers:
        raise UsageError(
            f"{pruner.name} declined every layer ({', '.join(skipped)}): nothing to scan; "
            "use another pruner"
        )
    if skipped:
        warnings.append(f"{pruner.name} declined {', '.join(skipped)}: left out of the scan")
    allocation = allocate(layers, dense, config.sparsity)
    total = sum(layer.weights for layer in layers)
    achieved = sum(allocation[layer.name] * layer.weights for layer in layers) / total
    return {
        "model": config.model,
        "pruner": pruner.name,
        "data": inputs.source["data"],
        "test_samples": len(test),  # type: ignore[arg-type]
        "dense_accuracy": dense,
        "levels": sorted(float(v) for v in levels),
        "layers": [
            {
                "name": layer.name,
                "weights": layer.weights,
                "accuracy": {f"{k:g}": v for k, v in layer.accuracy.items()},
            }
            for layer in layers
        ],
        "target": config.sparsity,
        "allocation": allocation,
        "achieved": achieved,
        "warnings": warnings,
    }


def recipe_of(config: PruneConfig, result: dict[str, Any]) -> dict[str, Any]:
    """The recipe that prunes with the allocation: ``prunekit prune --config recipe.json``
    (``-p`` picks another pruner; the per-layer sparsities stay)."""
    recipe: dict[str, Any] = {
        "model": config.model,
        "pruner": config.pruner,
        "sparsity": config.sparsity,
        "mask": "layer",  # every scanned layer has its own level; layer-wise pruners need it
        "layer_sparsity": {_literal_glob(n): s for n, s in result["allocation"].items()},
    }
    if config.params:
        recipe["params"] = dict(config.params)
    for key in ("data", "normalize", "image_size", "max_length", "num_classes"):
        if getattr(config, key) is not None:
            recipe[key] = getattr(config, key)
    if config.weights is not None:
        recipe["weights"] = str(config.weights)
    if config.exclude:
        recipe["exclude"] = list(config.exclude)
    return recipe


def _literal_glob(name: str) -> str:
    """A glob that matches ``name`` only (fnmatch's special characters bracketed)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def chart(result: dict[str, Any], path: Path) -> None:
    """Accuracy drop per layer at each scanned sparsity, and the allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    index = list(range(len(layers)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, len(layers) * 0.18), 7), sharex=True)
    for level in result["levels"]:
        drops = [100 * (result["dense_accuracy"] - lay["accuracy"][f"{level:g}"]) for lay in layers]
        top.plot(index, drops, marker="o", markersize=3, label=f"{level:.0%} of the layer")
    top.set_ylabel("accuracy drop (points), layer alone")
    top.set_title(f"{result['model']}: sensitivity by {result['pruner']} "
                  f"(dense {result['dense_accuracy']:.2%})")  # fmt: skip
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(index, [result["allocation"][lay["name"]] for lay in layers], color="tab:green")
    bottom.axhline(result["target"], color="black", linestyle="--", linewidth=1,
                   label=f"target {result['target']:.0%} overall")  # fmt: skip
    bottom.set_ylabel("allocated sparsity")
    bottom.set_xlabel("layer (forward order)")
    bottom.set_xticks(index)
    bottom.set_xticklabels([lay["name"] for lay in layers], rotation=90, fontsize=6)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_scan(config: PruneConfig, result: dict[str, Any]) -> list[str]:
    """sensitivity.json, sensitivity.png and recipe.json in ``config.out``, all or nothing."""
    with staged_dir(config.out, config.force) as stage:
        (stage / "sensitivity.json").write_text(json.dumps(result, indent=1) + "\n")
        (stage / "recipe.json").write_text(json.dumps(recipe_of(config, result), indent=1) + "\n")
        chart(result, stage / "sensitivity.png")
    return [str(config.out / n) for n in ("sensitivity.json", "sensitivity.png", "recipe.json")]
