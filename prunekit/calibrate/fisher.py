"""Blockwise damped inverse empirical Fisher and the Optimal Brain Surgeon algebra.

A target's flattened weights (or, for a pruner with ``covered_curvature``, its unpruned
weights in flat order: a pruned weight has zero gradients, so F = λ there, uncoupled) are cut
into contiguous blocks of size B (the last one padded with zero-gradient coordinates, which
get F = λ and are dropped afterwards). For the
gradient rows G (m x B) of one block, F_λ = λI + GᵀG / m. Both ways of inverting it are
batched over all blocks with torch.linalg:

- Cholesky of the B x B matrices, when m >= B;
- Woodbury, F_λ⁻¹ = (I − Gᵀ (mλI + GGᵀ)⁻¹ G) / λ with m x m solves, when m < B.

The factorisations run in float64 by default (``FACTOR_DTYPE``), a slice of blocks at a
time so the float64 copies stay small; the Gram blocks are accumulated in place in the
gradients' dtype. λ is either absolute or relative: α times the mean of the Fisher diagonal
over every target (as OBC / SparseGPT scale their damping to the curvature; one λ for the
whole model, so that OBS scores stay comparable across layers in a global ranking).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prunekit.errors import NumericalError

FACTOR_DTYPE = torch.float64
FACTOR_SLICE_BYTES = 32 * 2**20  # float64 workspace of one factorisation slice
TINY = 1e-30  # floor of a relative damping's scale: a target without gradient signal


def num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def to_blocks(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """(m, d) -> (nb, m, B), zero-padding the last block."""
    m, d = rows.shape
    nb = num_blocks(d, block_size)
    if nb * block_size != d:  # no copy when the blocks tile the rows
        rows = torch.nn.functional.pad(rows, (0, nb * block_size - d))
    return rows.reshape(m, nb, block_size).transpose(0, 1)


def gram_blocks(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Σ_i g_i g_iᵀ per block: (nb, B, B). Summable over chunks of rows."""
    blocks = to_blocks(rows, block_size)
    return blocks.transpose(1, 2) @ blocks


def accumulate_gram(gram: torch.Tensor | None, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """``gram += gram_blocks(rows)`` without a second (nb, B, B) temporary."""
    blocks = to_blocks(rows, block_size)
    if gram is None:
        return blocks.transpose(1, 2) @ blocks
    return gram.baddbmm_(blocks.transpose(1, 2), blocks)


def relative_damping(fisher_diags: Sequence[torch.Tensor], alpha: float) -> float:
    """λ = α · mean(diag F) over all the given coordinates (floored so that λ stays > 0)."""
    total = sum(float(f.double().sum()) for f in fisher_diags)
    count = sum(f.numel() for f in fisher_diags)
    return alpha * max(total / max(count, 1), TINY)


def _slices(count: int, per_item_bytes: int) -> list[slice]:
    step = max(1, FACTOR_SLICE_BYTES // max(per_item_bytes, 1))
    return [slice(i, min(i + step, count)) for i in range(0, count, step)]


def _cholesky(matrices: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrices)
    if bool((info > 0).any()):
        raise NumericalError(f"{what} is not positive definite")
    return factor


def inverse_from_gram(
    gram: torch.Tensor, m: int, damp: float, dtype: torch.dtype | None = FACTOR_DTYPE
) -> torch.Tensor:
    """(λI + gram/m)⁻¹ for every block, by Cholesky (the m >= B path).

    Factorised in ``dtype`` (None: the Gram's own), a slice of blocks at a time; returned
    in the Gram's dtype.
    """
    work = dtype or gram.dtype
    size = gram.shape[-1]
    out = torch.empty_like(gram)
    item = size * size * torch.finfo(work).bits // 8
    for part in _slices(gram.shape[0], 3 * item):  # at most three slices alive at once
        damped = gram[part].to(work, copy=True).div_(m)
        damped.diagonal(dim1=-2, dim2=-1).add_(damp)
        factor = _cholesky(damped, "a damped Fisher block")
        del damped
        out[part] = torch.cholesky_inverse(factor)
    return out


def inverse_from_rows(
    rows: torch.Tensor, block_size: int, damp: float, dtype: torch.dtype | None = FACTOR_DTYPE
) -> torch.Tensor:
    """(λI + GᵀG/m)⁻¹ for every block by Woodbury (the m < B path); rows is (m, d)."""
    m = rows.shape[0]
    work = dtype or rows.dtype
    blocks = to_blocks(rows, block_size)  # (nb, m, B)
    eye_m = torch.eye(m, dtype=work, device=rows.device)
    eye_b = torch.eye(block_size, dtype=work, device=rows.device)
    out = torch.empty(blocks.shape[0], block_size, block_size, dtype=rows.dtype, device=rows.device)
    item = (m * m + 2 * m * block_size + block_size**2) * torch.finfo(work).bits // 8
    for part in _slices(blocks.shape[0], item):
        g = blocks[part].to(work)
        kernel = m * damp * eye_m + g @ g.transpose(1, 2)  # (n, m, m)
        factor = _cholesky(kernel, "a damped Woodbury kernel")
        solved = torch.cholesky_solve(g, factor)  # (mλI + GGᵀ)⁻¹ G
        out[part] = ((eye_b - g.transpose(1, 2) @ solved) / damp).to(rows.dtype)
    return out


def rank1_inverse_reference(rows: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    """The reference codes' sequential recursion, one gradient at a time (oracle, baseline).

    F⁻¹ ← F⁻¹ − c cᵀ, c = F⁻¹g / √(m + gᵀF⁻¹g), starting from I/λ.
    """
    m = rows.shape[0]
    blocks = to_blocks(rows, block_size)
    eye = torch.eye(block_size, dtype=rows.dtype, device=rows.device)
    inverse = (eye / damp).expand(blocks.shape[0], -1, -1).clone()
    for i in range(m):
        g = blocks[:, i, :].unsqueeze(-1)  # (nb, B, 1)
        fg = inverse @ g
        c = fg / torch.sqrt(m + (g.transpose(1, 2) @ fg))
        inverse -= c @ c.transpose(1, 2)
    return inverse


def obs_scores(weight: torch.Tensor, inverse_diagonal: torch.Tensor) -> torch.Tensor:
    """ρ_q = θ_q² / (2 [F⁻¹]_qq): the loss increase of removing weight q alone, from
    diag F⁻¹ shaped like the weight (``BlockInverse.diag()``)."""
    return weight.square() / (2 * inverse_diagonal)


def group_obs_scores(
    weight: torch.Tensor, inverse: torch.Tensor, sets: torch.Tensor, budget: int = 1 << 24
) -> torch.Tensor:
    """ρ_S = ½ θ_Sᵀ (F⁻¹[S, S])⁻¹ θ_S for each set S (a row of ``sets``, flat indices): the
    loss increase of removing the weights of S together, the others compensating. With a
    block-diagonal F⁻¹ it is the sum over the blocks S meets. The (set, block) pieces are
    solved in batches of at most ``budget`` matrix entries. A negative index is no member
    (sets of different sizes, or members the blocks do not cover: an already pruned weight,
    zero and uncoupled, adds nothing)."""
    nb, block_size, _ = inverse.shape
    flat = weight.detach().reshape(-1).double()
    n = sets.shape[0]
    member = sets >= 0
    owner_set = torch.arange(n, device=sets.device)[:, None].expand_as(sets)[member]
    sets = sets[member]
    piece = owner_set * nb + sets // block_size  # (set, block) id
    if len(piece) == 0:
        return torch.zeros(n, dtype=torch.float64, device=sets.device)
    pieces, which = torch.unique(piece, return_inverse=True)
    order = torch.argsort(which, stable=True)
    counts = torch.bincount(which, minlength=len(pieces))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(which)
    rank[order] = torch.arange(len(which), device=sets.device) - starts[which[order]]
    size = int(counts.max())
    positions = torch.full((len(pieces), size), -1, dtype=torch.long, device=sets.device)
    positions[which, rank] = sets % block_size
    values = torch.zeros(len(pieces), size, dtype=torch.float64, device=sets.device)
    values[which, rank] = flat[sets]
    owner_block = pieces % nb
    total = torch.zeros(n, dtype=torch.float64, device=sets.device)
    step = max(1, budget // (size * size))
    eye = torch.eye(size, dtype=torch.float64, device=sets.device)
    for start in range(0, len(pieces), step):
        part = slice(start, start + step)
        pos, val = positions[part], values[part]
        valid = pos >= 0
        safe = pos.clamp(min=0)
        owner = owner_block[part][:, None, None]
        sub = inverse[owner, safe[:, :, None], safe[:, None, :]].double()  # (p, size, size)
        both = valid[:, :, None] & valid[:, None, :]
        sub = torch.where(both, sub, eye)
        solved = torch.linalg.solve(sub, val.unsqueeze(-1)).squeeze(-1)
        total.index_add_(0, pieces[part] // nb, 0.5 * (val * solved).sum(1))
    return total


def obs_update(
    weight: torch.Tensor, inverse: torch.Tensor, prune: torch.Tensor, exact: bool = False
) -> torch.Tensor:
    """The weights after removing ``prune`` (bool, like weight) with OBS compensation.

    independent: δθ = −F⁻¹ (θ_P ⊘ diag(F⁻¹)_P), summing the single-weight updates;
    exact: δθ = −F⁻¹[:, P] (F⁻¹[P, P])⁻¹ θ_P, the optimum of the local quadratic with θ_P = 0.
    The pruned entries are set to exactly zero either way.
    """
    nb, block_size, _ = inverse.shape
    numel = weight.numel()
    pad = nb * block_size - numel
    w = torch.nn.functional.pad(weight.reshape(-1), (0, pad)).reshape(nb, block_size)
    p = torch.nn.functional.pad(prune.reshape(-1), (0, pad)).reshape(nb, block_size)
    theta_p = torch.where(p, w, torch.zeros_like(w))
    if exact:
        # Solve F⁻¹[P,P] x = θ_P inside each block, with identity rows/columns outside P.
        both = p.unsqueeze(-1) & p.unsqueeze(-2)
        eye = torch.eye(block_size, dtype=inverse.dtype, device=inverse.device).bool()
        restricted = torch.where(both, inverse, eye.to(inverse.dtype))
        restricted = torch.where(both | eye, restricted, torch.zeros_like(restricted))
        x = torch.linalg.solve(restricted, theta_p.unsqueeze(-1)).squeeze(-1)
    else:
        x = theta_p / inverse.diagonal(dim1=1, dim2=2)
    delta = -(inverse @ x.unsqueeze(-1)).squeeze(-1)
    updated = (w + delta).reshape(-1)[:numel].reshape(weight.shape)
    return updated.masked_fill(prune, 0.0)
