"""The FishLeg inverse-Fisher parameterisation of one layer and its auxiliary training.

For a weight U of shape (out, inp) (a Conv2d kernel flattened to (out, in·kh·kw)):

    Q u = A ⊙ (Rᵀ R · (A ⊙ U) · L Lᵀ)

with L (inp x inp) and R (out x out) initialised to the identity and A = a₀ ⊙ Â, a₀ fixed and
Â initialised to ones, so Adam's steps on Â are relative. a₀ = 1/√(diag F + γ) starts Q at
the inverse of the damped diagonal Fisher (the default); a₀ = 1/√γ starts it at I/γ, which
is far from the optimum whenever γ is small against F. Q is symmetric positive
semi-definite: D_A (RᵀR ⊗ LLᵀ) D_A. Its diagonal has the closed form
diag(Q)_ij = A_ij² (RᵀR)_ii (LLᵀ)_jj. Q is trained on

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

    def __init__(
        self,
        out: int,
        inp: int,
        gamma: float,
        device: torch.device | None = None,
        fisher_diag: torch.Tensor | None = None,
    ):
        super().__init__()
        self.gamma = gamma
        if fisher_diag is None:
            scale = torch.full((out, inp), gamma**-0.5, device=device)
        else:
            scale = (fisher_diag.reshape(out, inp).to(device) + gamma).rsqrt()
        self.register_buffer("scale", scale)
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


def calibrate_scale(
    q: KroneckerQ, rows: torch.Tensor, mask: torch.Tensor, u: torch.Tensor
) -> float:
    """Rescale Q by the scalar c that minimises the auxiliary loss of c·Q on probes ``u``:
    c = Σ uᵀv / Σ vᵀ(F + γI)v, v = Q u. The loss is then −½ (Σ uᵀv)² / Σ vᵀ(F + γI)v < 0,
    better than Q = 0, whatever the start's scale against F. Returns c."""
    with torch.no_grad():
        u = u * mask
        v = (q(u) * mask).reshape(len(u), -1)
        curvature = (v @ rows.T).square().mean(1) + q.gamma * v.square().sum(1)
        c = float((u.reshape(len(u), -1) * v).sum() / curvature.sum())
        if c > 0 and torch.isfinite(torch.tensor(c)):
            q.scale.mul_(c**0.5)
    return c


def exact_inverse_product(rows: torch.Tensor, gamma: float, u: torch.Tensor) -> torch.Tensor:
    """(F + γI)⁻¹ u for F = mean of the rows' outer products, by Woodbury (n x n solve).

    ``rows`` (n, d), ``u`` (k, d). The oracle of the fit diagnostics.
    """
    g = rows.double()
    n = len(g)
    kernel = n * gamma * torch.eye(n, dtype=g.dtype, device=g.device) + g @ g.T
    inner = torch.linalg.solve(kernel, g @ u.double().T)  # (n, k)
    return ((u.double().T - g.T @ inner) / gamma).T


def fit_quality(
    q: KroneckerQ, rows: torch.Tensor, mask: torch.Tensor, u: torch.Tensor
) -> dict[str, float]:
    """The auxiliary loss of Q on fixed probes ``u`` with the whole pool as F, next to the
    closed-form optimum −½ uᵀ(F + γI)⁻¹u over the kept weights; ``ratio`` = loss / optimum
    (1: Q is exact on these probes; 0: no better than Q = 0; below 0: worse)."""
    keep = mask.reshape(-1)
    with torch.no_grad():
        loss = float(auxiliary_loss(q, u, rows, mask))
        flat = (u * mask).reshape(len(u), -1)[:, keep]
        best = exact_inverse_product(rows[:, keep], q.gamma, flat)
        optimum = float(-0.5 * (flat.double() * best).sum(1).mean())
    return {"loss": loss, "optimum": optimum, "ratio": loss / optimum if optimum else 0.0}


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
