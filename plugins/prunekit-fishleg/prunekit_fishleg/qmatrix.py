"""The FishLeg inverse-Fisher parameterisation of one layer and its auxiliary training.

For a weight U of shape (out, inp) (a Conv2d kernel flattened to (out, in·kh·kw)):

    Q u = A ⊙ (Rᵀ R · (A ⊙ U) · L Lᵀ)

with L (inp x inp) and R (out x out) initialised to the identity and A = a₀ Â, a₀ = 1/√γ
fixed and Â initialised to ones, so Q starts at I/γ = (0 + γI)⁻¹ and Adam's steps on Â are
relative. Q is symmetric positive semi-definite: D_A (RᵀR ⊗ LLᵀ) D_A. Its diagonal has the
closed form diag(Q)_ij = A_ij² (RᵀR)_ii (LLᵀ)_jj. Q is trained on

    ℓ(ψ) = ½ vᵀ (F + γI) v − uᵀ v,   v = Q(ψ) u,

whose minimiser (for probes u spanning the space) is Q = (F + γI)⁻¹; F v comes from gradient
rows g with labels sampled from the model, F v ≈ mean_i g_i (g_iᵀ v).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunekit.errors import NumericalError


class KroneckerQ(nn.Module):
    """Q(ψ) ≈ (F + γI)⁻¹ for one (out, inp) weight."""

    def __init__(self, out: int, inp: int, gamma: float, device: torch.device | None = None):
        super().__init__()
        self.gamma = gamma
        self.scale = gamma**-0.5
        self.L = nn.Parameter(torch.eye(inp, device=device))
        self.R = nn.Parameter(torch.eye(out, device=device))
        self.A = nn.Parameter(torch.ones(out, inp, device=device))

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape  # type: ignore[return-value]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Q u for u of shape (..., out, inp): two small matrix products."""
        a = self.A * self.scale
        return a * (self.R.T @ (self.R @ (a * u)) @ self.L @ self.L.T)

    def diagonal(self) -> torch.Tensor:
        """diag(Q) in closed form, shaped (out, inp)."""
        a = self.A * self.scale
        return a.square() * self.R.square().sum(0)[:, None] * self.L.square().sum(1)[None, :]

    def dense(self) -> torch.Tensor:
        """The explicit (d x d) matrix, d = out·inp (for tests on small layers)."""
        eye = torch.eye(self.A.numel(), device=self.A.device).reshape(-1, *self.shape)
        return self(eye).reshape(self.A.numel(), -1)


def auxiliary_loss(
    q: KroneckerQ, u: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over probes of ½ vᵀ(F + γI)v − uᵀv, v = mask ⊙ Q(mask ⊙ u).

    ``u``: probes (k, out, inp); ``rows``: gradient rows (n, out·inp) estimating F; pruned
    weights (``mask`` False) are removed from u, v and the Fisher products.
    """
    u = u * mask
    v = q(u) * mask
    flat_v = v.reshape(len(v), -1)
    fisher_term = (flat_v @ rows.T).square().mean(1)  # vᵀ F v with F = mean g gᵀ
    quad = 0.5 * (fisher_term + q.gamma * flat_v.square().sum(1))
    return (quad - (u.reshape(len(u), -1) * flat_v).sum(1)).mean()


def fit_q(
    q: KroneckerQ,
    rows: torch.Tensor,
    mask: torch.Tensor,
    iterations: int,
    lr: float,
    probe: str = "gradient",
    batch: int = 64,
    probes: int = 16,
    generator: torch.Generator | None = None,
    log_every: int = 50,
    on_log: Callable[[int, float], None] | None = None,
    name: str = "layer",
) -> list[tuple[int, float]]:
    """Adam on ψ for ``iterations`` steps (cosine-decayed learning rate).

    Returns (iteration, mean loss over the last ``log_every`` iterations) pairs.
    """
    if iterations <= 0:
        return []
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    # cosine decay: large steps first, then the probe noise averages out
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    n = len(rows)
    trace = []
    window: list[float] = []
    for it in range(1, iterations + 1):
        pick = torch.randint(0, n, (min(batch, n),), generator=generator, device=rows.device)
        if probe == "gradient":
            chosen = torch.randint(0, n, (probes,), generator=generator, device=rows.device)
            u = rows[chosen].reshape(probes, *q.shape)
        else:
            u = torch.randn(probes, *q.shape, generator=generator, device=rows.device)
        loss = auxiliary_loss(q, u, rows[pick], mask)
        if not torch.isfinite(loss):
            raise NumericalError(
                f"the FishLeg auxiliary loss of {name} diverged to {loss.item()} at iteration "
                f"{it}; lower --param aux_lr (now {lr:g}) or raise --param damping"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        window.append(loss.item())
        if it % log_every == 0 or it == iterations:
            mean = sum(window) / len(window)  # one probe draw is noisy: report the window mean
            trace.append((it, mean))
            window.clear()
            if on_log is not None:
                on_log(it, mean)
    return trace


def solve_restricted(
    q: KroneckerQ,
    rhs: torch.Tensor,
    subset: torch.Tensor,
    iterations: int = 200,
    tolerance: float = 1e-5,
) -> torch.Tensor:
    """x with Q[P, P] x_P = rhs_P and x = 0 outside P, by conjugate gradients on Q-products.

    ``subset`` (bool, like rhs) is P. Used for the joint OBS update δθ = −Q[:, P] x.
    """

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return q(v * subset) * subset

    b = rhs * subset
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum()
    stop = tolerance**2 * rs
    for _ in range(iterations):
        if rs <= stop:
            break
        qp = matvec(p)
        alpha = rs / (p * qp).sum()
        x += alpha * p
        r -= alpha * qp
        rs_new = (r * r).sum()
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x
