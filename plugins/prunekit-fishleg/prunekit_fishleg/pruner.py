"""The `fishleg` pruner: OBS with a learned inverse Fisher Q instead of an inverted estimate.

Score θ²/(2 diag Q); update δθ = −Q(θ_P ⊘ diag(Q)_P), pruned weights set to zero. Q lives on
the pruner object, so in a gradual schedule it is refined by a few auxiliary iterations before
each step ("progressive assimilation") instead of being estimated anew. Linear and Conv2d
weights are parameterised; biases and BatchNorm are not pruned and have no Q; other layer
types are skipped with a warning (never pruned).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunekit.errors import UsageError
from prunekit.pruners import Param, Pruner, Target
from prunekit.pruners.base import StatsSpec
from prunekit.stats import calibration_batches, check_spec, per_sample_gradients
from prunekit_fishleg.qmatrix import (
    KroneckerQ,
    calibrate_scale,
    fit_q,
    fit_quality,
    solve_restricted,
)

DIAGNOSTIC_PROBES = 16
FIT_SLACK = 0.05  # probe noise: a fit that loses more than this share of the optimum warns

SUPPORTED = (nn.Linear, nn.Conv2d)


class FishLegPruner(Pruner):
    """FishLeg surgeon: OBS with a learned Kronecker-factored inverse Fisher, refined per step."""

    name = "fishleg"
    params = (
        Param(
            "damping",
            1e-2,
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
            "diagonal",
            "start of Q: diagonal ((diag F + γ)⁻¹) or identity (I/γ, the paper's)",
            choices=("diagonal", "identity"),
        ),
        Param(
            "aux_lr",
            1e-3,
            "Adam learning rate of the auxiliary loss",
            minimum=0.0,
            exclusive_minimum=True,
        ),
        Param("aux_iters", 300, "auxiliary iterations before the first pruning step", minimum=0),
        Param("refine_iters", 50, "auxiliary iterations before every later step", minimum=0),
        Param(
            "probe",
            "gradient",
            "auxiliary probes u: gradient rows or gaussian",
            choices=("gradient", "gaussian"),
        ),
        Param("num_grads", 1000, "gradients (sampled labels) in the Fisher pool", minimum=1),
        Param("aux_batch", 64, "gradient rows per Fisher-vector product", minimum=1),
        Param(
            "exact",
            False,
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
        if target.name not in self.q:
            w = target.weight
            diagonal = self.hparams["init"] == "diagonal" and rows is not None
            self.q[target.name] = KroneckerQ(
                w.shape[0],
                w[0].numel(),
                self.gamma or self.hparams["damping"],
                device=w.device,
                fisher_diag=rows.square().mean(0) if diagonal else None,
            )
        return self.q[target.name]

    def _damping(self, pool: dict[str, torch.Tensor]) -> float:
        """γ: absolute, or α times the mean Fisher diagonal over every layer."""
        alpha = self.hparams["damping"]
        if self.hparams["damping_mode"] == "absolute":
            return alpha
        total = sum(float(rows.double().square().sum()) for rows in pool.values())
        count = sum(rows.shape[0] * rows.shape[1] for rows in pool.values())
        return alpha * max(total / max(count, 1), 1e-30)

    def _pool(self, context: Any, targets: list[Target]) -> dict[str, torch.Tensor]:
        """Per-sample gradients with labels sampled from the model (the true Fisher)."""
        wanted = self.hparams["num_grads"]
        check_spec(StatsSpec(num_grads=wanted), len(context.calibration))
        rows: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
        context.model.eval()
        batches = calibration_batches(
            context.model, context.calibration, wanted, 128, True, context.device, context.seed
        )
        for x, y in batches:
            for name, g in per_sample_gradients(context.model, targets, x, y).items():
                rows[name].append(g)
        return {name: torch.cat(parts) for name, parts in rows.items()}

    def prepare(self, context: Any, step: int, steps: int) -> None:
        """Fit Q (first step) or refine it (later steps) at the current weights."""
        started = time.perf_counter()
        targets = self._parameterised(list(context.targets))
        first = not self.q
        iterations = self.hparams["aux_iters"] if first else self.hparams["refine_iters"]
        pool = self._pool(context, targets)
        if first:
            self.gamma = self._damping(pool)
        generator = torch.Generator(context.device).manual_seed(context.seed + step)
        poor = []
        for t in targets:
            new = t.name not in self.q
            q = self._q(t, pool[t.name])
            mask = t.mask.reshape(q.shape)  # a Conv2d kernel is flattened to (out, in·kh·kw)
            probes = pool[t.name][:DIAGNOSTIC_PROBES].reshape(-1, *q.shape)
            if new:  # the start's overall scale against this layer's Fisher, in closed form
                calibrate_scale(q, pool[t.name], mask, pool[t.name].reshape(-1, *q.shape))
            before = fit_quality(q, pool[t.name], mask, probes)

            def log(it: int, loss: float, name: str = t.name) -> None:
                context.say(
                    f"fishleg {name}: auxiliary iteration {it}/{iterations}, loss {loss:.4g}"
                )

            trace = fit_q(
                q,
                pool[t.name],
                mask,
                iterations,
                self.hparams["aux_lr"],
                self.hparams["probe"],
                self.hparams["aux_batch"],
                generator=generator,
                log_every=self.hparams["log_every"],
                on_log=log,
                name=t.name,
            )
            after = fit_quality(q, pool[t.name], mask, probes)
            if after["ratio"] <= 0 or after["ratio"] < before["ratio"] - FIT_SLACK:
                poor.append(f"{t.name} ({before['ratio']:.0%} -> {after['ratio']:.0%})")
            self.trace.append(
                {
                    "step": step,
                    "target": t.name,
                    "iterations": iterations,
                    "loss": trace,
                    "fit_before": before,
                    "fit_after": after,
                }
            )
        if poor:
            self.warnings.append(
                f"fishleg: the fit of Q did not converge at step {step} for {len(poor)} "
                "layer(s) (auxiliary loss as a share of the closed-form optimum, before -> "
                f"after; at most 0 or falling by over 5 points): {', '.join(poor[:5])}"
                f"{' and more' if len(poor) > 5 else ''}; raise --param aux_iters or "
                "lower --param aux_lr (report.json: pruner_diagnostics)"
            )
        self.seconds += time.perf_counter() - started

    def diagnostics(self) -> dict[str, Any]:
        return {
            "auxiliary_seconds": round(self.seconds, 3),
            "gamma": self.gamma,
            "auxiliary_loss": self.trace,
        }

    def score(self, target: Target, stats: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if not isinstance(target.module, SUPPORTED):
            return None  # declined: prunekit leaves this tensor as it is
        with torch.no_grad():
            diag = self._q(target).diagonal().reshape(target.weight.shape)
            return target.weight.detach().square() / (2 * diag)

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
