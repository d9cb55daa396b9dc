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

from collections.abc import Callable, Sequence

import torch
from torch import nn

from prunekit.api import NumericalError


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2


def _sum_of_outer_products(g: torch.Tensor, budget: int = 1 << 24) -> torch.Tensor:
    """Σ_n G_n G_nᵀ of (n, out, inp) rows, as batched products summed a slice of rows at a
    time (at most ``budget`` entries of (out, out) products alive): an order of magnitude
    faster than the equivalent einsum on CPU."""
    n, out, _ = g.shape
    total = g.new_zeros(out, out)
    step = max(1, budget // (out * out))
    for start in range(0, n, step):
        part = g[start : start + step]
        total += torch.bmm(part, part.transpose(1, 2)).sum(0)
    return total


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

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A ⊙ a₀, RᵀR, LLᵀ): Q u = a ⊙ (RᵀR · (a ⊙ u) · LLᵀ)."""
        return self.A * self.scale, self.R.T @ self.R, self.L @ self.L.T

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Q u for u of shape (..., out, inp): two small matrix products."""
        return apply_q(self.factors(), u)

    def diagonal(self) -> torch.Tensor:
        """diag(Q) in closed form, shaped (out, inp)."""
        a = self.A * self.scale
        return a.square() * self.R.square().sum(0)[:, None] * self.L.square().sum(1)[None, :]

    def start_kronecker(self, rows: torch.Tensor) -> None:
        """Start at the damped inverse of the nearest Kronecker estimate of the Fisher.

        From gradient rows G_n (out x inp): F ≈ E[G Gᵀ] ⊗ E[Gᵀ G] / tr F (exact when F is a
        Kronecker product), damped as (R + π√γ I)⁻¹ ⊗ (L + √γ/π I)⁻¹ with π balancing the two
        factors' mean eigenvalues (K-FAC's split). Sets RᵀR and LLᵀ to the two inverses by
        Cholesky factors, A to ones and the fixed scale so that diag Q is exact for R ⊗ L.
        """
        out, inp = self.shape
        g = rows.reshape(-1, out, inp)
        n = len(g)
        with torch.no_grad():
            # float32 products (as the gradients), float64 from here on
            left = _sum_of_outer_products(g).double()
            right = (g.reshape(-1, inp).T @ g.reshape(-1, inp)).double()
            trace = float(left.trace()) / n
            left /= n * max(trace, 1e-300)
            right /= n
            pi = (float(left.trace()) / out / max(float(right.trace()) / inp, 1e-300)) ** 0.5
            pi = max(pi, 1e-12)
            root = self.gamma**0.5
            eye_o = torch.eye(out, dtype=torch.float64, device=g.device)
            eye_i = torch.eye(inp, dtype=torch.float64, device=g.device)
            left_inv = _symmetric(torch.linalg.inv(left + pi * root * eye_o))
            right_inv = _symmetric(torch.linalg.inv(right + root / pi * eye_i))
            self.R.copy_(torch.linalg.cholesky(left_inv).T.float())
            self.L.copy_(torch.linalg.cholesky(right_inv).float())
            # The split's extra damping √γ(π I⊗L + R⊗I/π) shrinks diag Q unevenly; the scale
            # makes diag Q exactly the diagonal of (R ⊗ L + γI)⁻¹ (in the eigenbases of R, L),
            # which is what the OBS scores read.
            r, u_r = torch.linalg.eigh(left)
            ell, u_l = torch.linalg.eigh(right)
            inv_eig = 1.0 / (r.clamp(min=0)[:, None] * ell.clamp(min=0)[None, :] + self.gamma)
            wanted = u_r.square() @ inv_eig @ u_l.square().T
            have = left_inv.diagonal()[:, None] * right_inv.diagonal()[None, :]
            self.scale.copy_((wanted / have).sqrt().float())
            self.A.fill_(1.0)

    def dense(self) -> torch.Tensor:
        """The explicit (d x d) matrix, d = out·inp (for tests on small layers)."""
        eye = torch.eye(self.A.numel(), device=self.A.device).reshape(-1, *self.shape)
        return self(eye).reshape(self.A.numel(), -1)


def apply_q(
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], u: torch.Tensor
) -> torch.Tensor:
    """Q u from Q's factors (a, RᵀR, LLᵀ), each possibly with leading batch dimensions."""
    a, left, right = factors
    return a * (left @ (a * u) @ right)


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


def exact_inverse_product(rows: torch.Tensor, gamma: float, u: torch.Tensor) -> torch.Tensor:
    """(F + γI)⁻¹ u for F = mean of the rows' outer products, by Woodbury (n x n solve).

    ``rows`` (n, d), ``u`` (k, d). The oracle of the fit diagnostics.
    """
    n = len(rows)
    gram = (rows @ rows.T).double()  # float32 products (the d-long sums), float64 solve
    kernel = n * gamma * torch.eye(n, dtype=gram.dtype, device=gram.device) + gram
    inner = torch.linalg.solve(kernel, (rows @ u.T).double())  # (n, k)
    return ((u.double().T - rows.double().T @ inner) / gamma).T


def gaussian_probes(
    shape: tuple[int, int], seed: int, device: torch.device, count: int = 16
) -> torch.Tensor:
    """Fixed, seeded standard normal probes for the fit diagnostics: every direction counts,
    as in the OBS scores and updates (gradient probes would see only the pool's span)."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(count, *shape, generator=generator, device=device)


DIAGNOSTIC_ROWS = 256  # gradient rows of the Fisher a fit is judged on


class FitOracle:
    """The closed-form optimum of the auxiliary loss on fixed probes, for judging a Q.

    For probes u (k, out, inp) over the kept weights, the optimum is −½ uᵀ(F + γI)⁻¹u (by
    Woodbury, once); ``quality(q)`` is Q's loss on the same probes with the same F: the first
    ``DIAGNOSTIC_ROWS`` rows of the pool (all of it when smaller),
    and ``ratio`` = loss / optimum (1: exact on these probes; 0: no better than Q = 0; below 0:
    worse).
    """

    def __init__(
        self, rows: torch.Tensor, gamma: float, mask: torch.Tensor, probes: torch.Tensor
    ) -> None:
        rows = rows[:DIAGNOSTIC_ROWS]  # the closed form costs rows² · d
        self.rows, self.mask, self.probes = rows, mask, probes
        keep = mask.reshape(-1)
        with torch.no_grad():
            flat = (probes * mask).reshape(len(probes), -1)[:, keep]
            best = exact_inverse_product(rows[:, keep], gamma, flat)
            self.optimum = float(-0.5 * (flat.double() * best).sum(1).mean())

    def quality(self, q: KroneckerQ) -> dict[str, float]:
        with torch.no_grad():
            loss = float(auxiliary_loss(q, self.probes, self.rows, self.mask))
        ratio = loss / self.optimum if self.optimum else 0.0
        return {"loss": loss, "optimum": self.optimum, "ratio": ratio}


def fit_quality(
    q: KroneckerQ, rows: torch.Tensor, mask: torch.Tensor, u: torch.Tensor
) -> dict[str, float]:
    """Q's auxiliary loss on probes ``u`` against the closed-form optimum (see FitOracle)."""
    return FitOracle(rows, q.gamma, mask, u).quality(q)


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
    report = None if on_log is None else (lambda _name, it, loss: on_log(it, loss))
    return fit_qs([q], [rows], [mask], [name], iterations, lr, probe, batch, probes, generator,
                  log_every, report)[0]  # fmt: skip


def fit_qs(
    qs: Sequence[KroneckerQ],
    rows: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    names: Sequence[str],
    iterations: int,
    lr: float,
    probe: str = "gradient",
    batch: int = 64,
    probes: int = 16,
    generator: torch.Generator | None = None,
    log_every: int = 50,
    on_log: Callable[[str, int, float], None] | None = None,
) -> list[list[tuple[int, float]]]:
    """Fit several Q's of one shape together: each is trained on its own auxiliary loss
    (their sum is minimised; the layers share no parameter, and Adam's steps are per entry),
    with its products batched over the layers. Returns each one's loss trace."""
    if iterations <= 0 or not qs:
        return [[] for _ in qs]
    shape = qs[0].shape
    if any(q.shape != shape for q in qs):
        raise ValueError("fit_qs fits Q's of one shape together")
    k, n = len(qs), min(len(r) for r in rows)
    device = rows[0].device
    params = [p for q in qs for p in q.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    # cosine decay: large steps first, then the probe noise averages out
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    mask = torch.stack([m.reshape(shape) for m in masks]).unsqueeze(1)  # (k, 1, out, inp)
    gamma = torch.tensor([q.gamma for q in qs], device=device)
    traces: list[list[tuple[int, float]]] = [[] for _ in qs]
    window = torch.zeros(k, dtype=torch.float64)
    count = 0
    for it in range(1, iterations + 1):
        pick = torch.randint(0, n, (k, min(batch, n)), generator=generator, device=device)
        picked = torch.stack([r[i] for r, i in zip(rows, pick, strict=True)])  # (k, b, d)
        if probe == "gradient":
            chosen = torch.randint(0, n, (k, probes), generator=generator, device=device)
            u = torch.stack([r[i] for r, i in zip(rows, chosen, strict=True)])
            u = u.reshape(k, probes, *shape)
        else:
            u = torch.randn(k, probes, *shape, generator=generator, device=device)
        losses = _batched_loss(qs, u, picked, mask, gamma)
        if not torch.isfinite(losses).all():
            bad = int((~torch.isfinite(losses)).nonzero()[0])
            raise NumericalError(
                f"the FishLeg auxiliary loss of {names[bad]} diverged to "
                f"{float(losses[bad])} at iteration {it}; lower --param aux_lr (now {lr:g}) "
                "or raise --param damping"
            )
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        schedule.step()
        window += losses.detach().double().cpu()
        count += 1
        if it % log_every == 0 or it == iterations:
            means = (window / count).tolist()  # one probe draw is noisy: the window mean
            for trace, name, mean in zip(traces, names, means, strict=True):
                trace.append((it, mean))
                if on_log is not None:
                    on_log(name, it, mean)
            window.zero_()
            count = 0
    return traces


def _batched_loss(
    qs: Sequence[KroneckerQ],
    u: torch.Tensor,
    rows: torch.Tensor,
    mask: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """``auxiliary_loss`` of k Q's of one shape at once: u (k, probes, out, inp), rows
    (k, b, out·inp), mask (k, 1, out, inp), γ (k,) -> (k,) losses."""
    a = (torch.stack([q.A for q in qs]) * torch.stack([q.scale for q in qs])).unsqueeze(1)
    r, ell = torch.stack([q.R for q in qs]), torch.stack([q.L for q in qs])
    k, probes, out, inp = u.shape
    u = u * mask
    x = r.transpose(1, 2).unsqueeze(1) @ (r.unsqueeze(1) @ (a * u))  # RᵀR · (a ⊙ u)
    x = x.reshape(k, probes * out, inp)  # then · LLᵀ, the probes' rows stacked
    # forming LLᵀ (inp³) costs less than a second product when inp < probes · out
    precompute = inp < probes * out
    x = x @ (ell @ ell.transpose(1, 2)) if precompute else (x @ ell) @ ell.transpose(1, 2)
    v = a * x.reshape(u.shape) * mask
    flat_v = v.flatten(2)  # (k, probes, d)
    fisher_term = (flat_v @ rows.transpose(1, 2)).square().mean(2)  # vᵀ F v, F = mean g gᵀ
    quad = 0.5 * (fisher_term + gamma[:, None] * flat_v.square().sum(2))
    return (quad - (u.flatten(2) * flat_v).sum(2)).mean(1)


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

    with torch.no_grad():
        factors = q.factors()

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return apply_q(factors, v * subset) * subset

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


def restricted_quadratic(
    q: KroneckerQ, weight: torch.Tensor, sets: torch.Tensor, budget: int = 1 << 24
) -> torch.Tensor:
    """½ θ_Sᵀ (Q[S, S])⁻¹ θ_S for each set S (a row of ``sets``, flat indices into the
    (out, inp) weight): the group OBS score with Q in place of the inverse Fisher.

    Q[S, S] comes from the Kronecker form, entry (s, t) = a_s a_t (RᵀR)_{o_s o_t}
    (LLᵀ)_{j_s j_t}, and is solved in batches of at most ``budget`` matrix entries.
    """
    inp = q.shape[1]
    with torch.no_grad():
        a = (q.A * q.scale).reshape(-1).double()
        rr = (q.R.T @ q.R).double()
        ll = (q.L @ q.L.T).double()
        flat = weight.detach().reshape(-1).double()
        sets = sets.to(flat.device)
        n, k = sets.shape
        total = torch.empty(n, dtype=torch.float64, device=flat.device)
        step = max(1, budget // (k * k))
        for start in range(0, n, step):
            idx = sets[start : start + step]
            o, j = idx // inp, idx % inp
            sub = rr[o[:, :, None], o[:, None, :]] * ll[j[:, :, None], j[:, None, :]]
            sub *= a[idx][:, :, None] * a[idx][:, None, :]
            val = flat[idx]
            solved = torch.linalg.solve(sub, val.unsqueeze(-1)).squeeze(-1)
            total[start : start + step] = 0.5 * (val * solved).sum(1)
    return total
