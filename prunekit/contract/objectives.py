"""Objectives: the loss whose per-sample gradients feed the statistics (``--objective``).

``labels``  cross-entropy with the data's labels: the empirical Fisher (with
            ``--param fisher=true`` the labels are drawn from the model: the ``kl`` objective).
``kl``      KL(dense ‖ model) of a classifier's predictive distribution, no labels needed.
            At the dense weights its Hessian is the model's Fisher E_{y~p}[∇ log p ∇ log pᵀ],
            estimated with labels drawn from the model.
``mse``     ½‖f(x) − f_dense(x)‖² of the outputs (embeddings). At the dense weights its
            Hessian is the Gauss–Newton matrix JᵀJ = E_z[Jᵀz zᵀJ], z ~ N(0, I): estimated
            with targets f(x) + z.
``cosine``  1 − cos(f(x), f_dense(x)) = ½‖u − u_dense‖² with u = f/‖f‖: ``mse`` on
            unit-normalised outputs (the usual sentence-embedding similarity).

The label-free objectives are zero, with zero gradient, at the dense weights: their gradients
only carry curvature (targets drawn around the model's own outputs), so the mean gradient
averages to zero and pruners that rank by it (snip, grad_norm, grasp, fts, fbss) need labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import UsageError


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    sampled: bool  # targets drawn from the model (curvature only; the mean gradient is ~0)
    fits_embeddings: bool  # may be used on a model that returns embeddings, not logits

    def targets(
        self, outputs: torch.Tensor | None, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """What ``loss`` compares the outputs with: the labels, or targets drawn around the
        model's ``outputs`` (computed without gradients, given when ``sampled``)."""
        if not self.sampled:
            return labels
        assert outputs is not None
        if self.name == "kl":  # a class per sample, or a next token per position (N, L, V)
            probs = torch.softmax(outputs.float(), dim=-1).reshape(-1, outputs.shape[-1])
            drawn = torch.multinomial(probs, 1, generator=generator)
            return drawn.reshape(outputs.shape[:-1])
        base = _unit(outputs) if self.name == "cosine" else outputs
        noise = torch.randn(base.shape, generator=generator, device=base.device)
        return base + noise.to(base.dtype)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch."""
        if self.name in {"labels", "kl"}:  # (N, L, V) logits: the mean over the tokens
            return nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten())
        base = _unit(outputs) if self.name == "cosine" else outputs
        return 0.5 * (base - targets).square().sum(-1).mean()

    def for_fisher(self, fisher: str) -> Objective:
        """``labels`` with ``fisher=true`` is ``kl``; the other objectives stay as they are."""
        return KL if self is LABELS and fisher == "true" else self


def _unit(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x, dim=-1)


LABELS = Objective("labels", "cross-entropy with the data's labels", False, False)
KL = Objective("kl", "KL to the dense model's predictions (classifiers)", True, False)
MSE = Objective("mse", "squared distance to the dense model's outputs", True, True)
COSINE = Objective("cosine", "cosine distance to the dense model's outputs", True, True)
OBJECTIVES = {o.name: o for o in (LABELS, KL, MSE, COSINE)}


def returns_embeddings(model: nn.Module) -> bool:
    """Whether ``model`` returns embeddings (an ``hf:`` encoder) rather than logits."""
    return getattr(model, "kind", None) == "encoder"


def resolve_objective(name: str | None, labeled: bool, embeddings: bool, data: str) -> Objective:
    """The objective ``--objective name`` asks for, or the default: ``labels`` on labeled
    data, else ``cosine`` for a model that returns embeddings and ``kl`` for a classifier."""
    if name is None:
        return COSINE if embeddings else LABELS if labeled else KL
    objective = OBJECTIVES.get(name)
    if objective is None:
        raise UsageError(f"--objective {name}: choose from {', '.join(OBJECTIVES)}")
    if embeddings and not objective.fits_embeddings:
        raise UsageError(
            f"--objective {name} needs class logits but the model returns embeddings; "
            "use --objective cosine or mse"
        )
    if objective is LABELS and not labeled:
        raise UsageError(
            f"--objective labels needs labels but {data} has none; use --objective kl "
            "(or leave it out)"
        )
    return objective
