"""The `fishleg` pruner: OBS with a learned inverse Fisher Q instead of an inverted estimate.

Score θ²/(2 diag Q); update δθ = −Q[:, P] Q[P,P]⁻¹ θ_P (conjugate gradients), pruned weights
set to zero. Q starts at a damped Kronecker estimate of each layer's inverse Fisher, is
trained by a few auxiliary iterations, and before every later step or sub-step is started
again from the current Fisher (default) or, with assimilate=warm, kept on the pruner object
and only refined at the pruned weights (the paper's "progressive assimilation"). The
gradient rows it is trained on come in the passes of prunekit's memory plan. Linear and
Conv2d weights are parameterised; biases and BatchNorm are not pruned and have no Q; other
layer types are skipped with a warning (never pruned). Defaults measured on the pretrained
CIFAR-10 ResNets (benchmarks/bench_cifar.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunekit.api import (
    GRAD_ROWS,
    Collector,
    Param,
    Pruner,
    StatsSpec,
    StepContext,
    Target,
    UsageError,
)
from prunekit_fishleg.qmatrix import (
    FitOracle,
    KroneckerQ,
    fit_qs,
    gaussian_probes,
    restricted_quadratic,
    solve_restricted,
)

FIT_SLACK = 0.05  # probe noise: a fit that loses more than this share of the optimum warns

SUPPORTED = (nn.Linear, nn.Conv2d)


class FishLegPruner(Pruner):
    """FishLeg surgeon: OBS with a learned Kronecker-factored inverse Fisher, refined per step."""

    name = "fishleg"
    contract = 1  # the prunekit.api contract this class is written for
    params = (
        Param(
            "damping",
            0.1,
            "γ in Q ≈ (F + γI)⁻¹: relative α, γ = α · mean diagonal of the Fisher over every "
            "layer, or absolute γ (damping_mode)",
            minimum=0.0,
            exclusive_minimum=True,
        ),
        Param(
            "damping_mode",
            "relative",
            "relative: damping scales with the model's Fisher; absolute: damping is γ itself",
            choices=("relative", "absolute"),
        ),
        Param(
            "init",
            "kronecker",
            "start of Q: kronecker (damped inverse of the nearest Kronecker estimate of F), "
            "diagonal ((diag F + γ)⁻¹) or identity (I/γ, the paper's)",
            choices=("kronecker", "diagonal", "identity"),
        ),
        Param(
            "aux_lr",
            1e-3,
            "Adam learning rate of the auxiliary loss",
            minimum=0.0,
            exclusive_minimum=True,
        ),
        Param(
            "assimilate",
            "restart",
            "Q at every later step or sub-step: restart (from the start estimate of the "
            "current Fisher, then refine_iters; measured best at 90 %) or warm (the previous Q, "
            "refined: the paper's progressive assimilation; best at 80 %, stale at 90 %)",
            choices=("restart", "warm"),
        ),
        Param("aux_iters", 30, "auxiliary iterations before the first pruning step", minimum=0),
        Param("refine_iters", 30, "auxiliary iterations before every later step", minimum=0),
        Param(
            "probe",
            "gradient",
            "auxiliary probes u: gradient rows or gaussian",
            choices=("gradient", "gaussian"),
        ),
        # 4, not 16: dev ResNet-32 at 90 % one-shot 48.0 % vs 47.2 %, one step 2.1x vs 2.8x
        # woodfisher's time at 1,000 gradients (benchmarks/bench_fishleg.py --dev-dir)
        Param("probes", 4, "probe directions u per auxiliary iteration", minimum=1),
        Param("num_grads", 1000, "gradients (sampled labels) in the Fisher pool", minimum=1),
        Param("aux_batch", 64, "gradient rows per Fisher-vector product", minimum=1),
        Param(
            "exact",
            True,
            "joint OBS update of the weights pruned together, Q[P,P] solved by conjugate "
            "gradients (false: sum of single-weight updates)",
        ),
        Param("log_every", 50, "auxiliary loss readout every N iterations", minimum=1),
    )

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.q: dict[str, KroneckerQ] = {}
        self.trace: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.gamma: float | None = None
        self.memory: dict[str, Any] | None = None
        self.unconverged: set[str] = set()  # layers already warned about (once per run)

    def _parameterised(self, targets: list[Target]) -> list[Target]:
        kept = [t for t in targets if isinstance(t.module, SUPPORTED)]
        skipped = [f"{t.name} ({type(t.module).__name__})" for t in targets if t not in kept]
        if not kept:
            raise UsageError(
                f"fishleg can parameterise Linear and Conv2d weights only; none among "
                f"{', '.join(skipped)}: use woodfisher"
            )
        if skipped and not self.q:
            self.warnings.append(f"fishleg skips {', '.join(skipped)}: not pruned")
        return kept

    def _q(self, target: Target, rows: torch.Tensor | None = None) -> KroneckerQ:
        restart = rows is not None and self.hparams["assimilate"] == "restart"
        if target.name not in self.q or restart:
            w = target.weight
            diagonal = self.hparams["init"] == "diagonal" and rows is not None
            q = KroneckerQ(
                w.shape[0],
                w[0].numel(),
                self.gamma or self.hparams["damping"],
                device=w.device,
                fisher_diag=rows.square().mean(0) if diagonal else None,
            )
            if self.hparams["init"] == "kronecker" and rows is not None:
                q.start_kronecker(rows)
            self.q[target.name] = q
        return self.q[target.name]

    def _collector(self, context: StepContext, targets: list[Target]) -> Collector:
        """Gradient rows in the passes of the memory plan (only one group's rows are held at
        a time), with targets drawn from the model: the true Fisher of the run's objective
        (``kl`` for ``--objective labels``)."""
        spec = StatsSpec(
            num_grads=self.hparams["num_grads"],
            fisher="true",
            damp=self.hparams["damping"],
            damp_mode=self.hparams["damping_mode"],
        )
        return Collector(
            context.model,
            targets,
            context.calibration,
            spec,
            frozenset({GRAD_ROWS}),
            context.device,
            context.memory_budget,
            context.seed,
            timings=context.timings,
            say=context.say,
            objective=context.objective,
        )

    def prepare(self, context: StepContext, step: int, steps: int) -> None:
        """Fit Q (first step) or refine it (later steps) at the current weights, one group of
        layers at a time."""
        started = time.perf_counter()
        targets = self._parameterised(list(context.targets))
        iterations = self.hparams["aux_iters"] if not self.q else self.hparams["refine_iters"]
        collector = self._collector(context, targets)
        if self.hparams["assimilate"] == "restart":
            self.gamma = None  # measured at the current weights, as Q is started anew
        generator = torch.Generator(context.device).manual_seed(context.seed + step)
        poor: list[tuple[str, str]] = []
        for group, stats in collector.collect():
            if self.gamma is None:  # known from the first pass (or a squares-only round)
                self.gamma = collector.base_damping()
            shapes: dict[tuple[int, ...], list[Target]] = {}
            for t in group:  # layers of one shape are fitted together
                shapes.setdefault((t.weight.shape[0], t.weight[0].numel()), []).append(t)
            for same in shapes.values():
                rows = [stats[t.name].pop(GRAD_ROWS) for t in same]
                poor += self._fit(context, same, rows, step, iterations, generator)
                del rows
        self.memory = collector.report().get("memory")
        self.warnings.extend(collector.warnings)
        poor = [(name, text) for name, text in poor if name not in self.unconverged]
        self.unconverged.update(name for name, _ in poor)
        if poor:  # once per layer and run: later steps are in the report's diagnostics
            listed = ", ".join(text for _, text in poor[:5])
            self.warnings.append(
                f"fishleg: the fit of Q did not converge at step {step} for {len(poor)} "
                "layer(s) (auxiliary loss as a share of the closed-form optimum, before -> "
                f"after, where a good fit ends above 0 and does not fall): {listed}"
                f"{' and more' if len(poor) > 5 else ''}; raise --param aux_iters or "
                "lower --param aux_lr (every step: report.json pruner_diagnostics)"
            )
        self.seconds += time.perf_counter() - started

    def _fit(
        self,
        context: StepContext,
        targets: list[Target],
        rows: list[torch.Tensor],
        step: int,
        iterations: int,
        generator: torch.Generator,
    ) -> list[tuple[str, str]]:
        """Start Q of layers of one shape (first step, or every step with restart) and
        train them together, each on its own gradient rows; record each fit."""
        qs = [self._q(t, r) for t, r in zip(targets, rows, strict=True)]
        masks = [t.mask.reshape(q.shape) for t, q in zip(targets, qs, strict=True)]  # a Conv2d
        # kernel is flattened to (out, in·kh·kw)
        oracles = [
            FitOracle(r, q.gamma, m, gaussian_probes(q.shape, context.seed, r.device))
            for r, q, m in zip(rows, qs, masks, strict=True)
        ]
        before = [oracle.quality(q) for oracle, q in zip(oracles, qs, strict=True)]

        def log(name: str, it: int, loss: float) -> None:
            context.say(f"fishleg {name}: auxiliary iteration {it}/{iterations}, loss {loss:.4g}")

        traces = fit_qs(
            qs,
            rows,
            masks,
            [t.name for t in targets],
            iterations,
            self.hparams["aux_lr"],
            self.hparams["probe"],
            self.hparams["aux_batch"],
            self.hparams["probes"],
            generator=generator,
            log_every=self.hparams["log_every"],
            on_log=log,
        )
        poor = []
        for t, q, oracle, was, trace in zip(targets, qs, oracles, before, traces, strict=True):
            after = oracle.quality(q)
            self.trace.append(
                {
                    "step": step,
                    "target": t.name,
                    "iterations": iterations,
                    "loss": trace,
                    "fit_before": was,
                    "fit_after": after,
                }
            )
            if after["ratio"] <= 0 or after["ratio"] < was["ratio"] - FIT_SLACK:
                poor.append((t.name, f"{t.name} ({was['ratio']:.0%} -> {after['ratio']:.0%})"))
        return poor

    def diagnostics(self) -> dict[str, Any]:
        return {
            "auxiliary_seconds": round(self.seconds, 3),
            "gamma": self.gamma,
            "memory": self.memory,
            "auxiliary_loss": self.trace,
        }

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if not isinstance(target.module, SUPPORTED):
            return None  # declined: prunekit leaves this tensor as it is
        with torch.no_grad():
            diag = self._q(target).diagonal().reshape(target.weight.shape)
            return target.weight.detach().square() / (2 * diag)

    def set_scores(
        self, target: Target, stats: Mapping[str, torch.Tensor], sets: torch.Tensor
    ) -> torch.Tensor | None:
        """Group OBS with Q: ½ θ_Sᵀ (Q[S, S])⁻¹ θ_S, removing the set S jointly."""
        if not isinstance(target.module, SUPPORTED):
            return None
        weight = target.weight.detach() * target.mask
        return restricted_quadratic(self._q(target), weight, sets)

    def update(
        self, target: Target, keep: torch.Tensor, stats: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        prune = target.mask & ~keep
        if not prune.any() or not isinstance(target.module, SUPPORTED):
            return None
        q = self._q(target)
        with torch.no_grad():
            w = target.weight.detach().reshape(q.shape)
            p = prune.reshape(q.shape)
            if self.hparams["exact"]:
                x = solve_restricted(q, w, p)
            else:
                x = torch.where(p, w / q.diagonal(), torch.zeros_like(w))
            delta = -q(x) * target.mask.reshape(q.shape)  # pruned weights stay out
            updated = (w + delta).masked_fill(p, 0.0)
        return updated.reshape(target.weight.shape)
