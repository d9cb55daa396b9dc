"""Curvature handed to pruners as objects (plugin contract v1), not as raw padded tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockInverse:
    """H = (F + λI)⁻¹ of one weight tensor, block-diagonal along the flattened weight
    (row-major): blocks of B consecutive weights, the last block zero-padded.

    When the weight already has pruned entries, their gradients are zero, so F does not
    couple them: H = I/λ there. The blocks then cover only the unpruned coordinates,
    ``index`` (sorted flat positions), B consecutive ones per block, and ``outside`` holds
    1/λ for the rest. ``index`` None: the blocks cover every coordinate.

    Vectors are flat, of the weight's ``numel`` (or ``(numel, k)`` for k at once).
    """

    blocks: torch.Tensor  # (nb, B, B), symmetric positive definite
    numel: int
    index: torch.Tensor | None = None  # covered flat positions (int64), None: all of them
    outside: float = 0.0  # H on the coordinates outside ``index`` (1/λ)

    def __post_init__(self) -> None:
        if self.index is not None and not self.outside > 0:
            raise ValueError("a BlockInverse with an index needs outside = 1/λ > 0")

    @property
    def block_size(self) -> int:
        return self.blocks.shape[-1]

    @property
    def covered(self) -> int:
        """How many coordinates the blocks cover."""
        return self.numel if self.index is None else len(self.index)

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        """The covered entries of a weight-shaped or flat vector (flat out), or of a
        ``(numel, k)`` matrix, in block order."""
        flat = v.reshape(-1) if v.numel() == self.numel else v.reshape(self.numel, -1)
        return flat if self.index is None else flat[self.index.to(flat.device)]

    def scatter(self, covered: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """``rest`` (full length) with its covered entries replaced by ``covered``."""
        if self.index is None:
            return covered.reshape(rest.shape)
        out = rest.clone()
        out[self.index.to(out.device)] = covered.to(out.dtype)
        return out

    def diag(self) -> torch.Tensor:
        """diag H, flat."""
        inner = self.blocks.diagonal(dim1=1, dim2=2).reshape(-1)[: self.covered]
        if self.index is None:
            return inner
        return self.scatter(inner, inner.new_full((self.numel,), self.outside))

    def _blocked(self, v: torch.Tensor) -> tuple[torch.Tensor, int]:
        k = 1 if v.dim() == 1 else v.shape[1]
        flat = self.gather(v).reshape(self.covered, k).to(self.blocks.dtype)
        pad = self.blocks.shape[0] * self.block_size - self.covered
        padded = torch.nn.functional.pad(flat, (0, 0, 0, pad))
        return padded.reshape(self.blocks.shape[0], self.block_size, k), k

    def _flat(
        self, blocked: torch.Tensor, k: int, like: torch.Tensor, rest_scale: float
    ) -> torch.Tensor:
        inner = blocked.reshape(-1, k)[: self.covered]
        flat = like.reshape(self.numel, k).to(blocked.dtype)
        out = self.scatter(inner, flat * rest_scale)
        return out.reshape(like.shape).to(like.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v."""
        blocked, k = self._blocked(v)
        return self._flat(torch.bmm(self.blocks, blocked), k, v, self.outside)

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        """H⁻¹ v = (F + λI) v, solved block by block (Cholesky, in float64).

        Exact up to the precision of the stored inverse: with a damping λ far below the
        Fisher's scale (relative α ≪ 1e-3) the float32 inverse limits it.
        """
        from prunekit.errors import NumericalError

        blocked, k = self._blocked(v)
        try:
            factor = torch.linalg.cholesky(self.blocks.double())
        except torch.linalg.LinAlgError as exc:
            raise NumericalError(
                f"the inverse Fisher is not positive definite in float64 ({exc}); raise damp"
            ) from exc
        rest = 1 / self.outside if self.outside else 0.0
        return self._flat(torch.cholesky_solve(blocked.double(), factor), k, v, rest)

    def to(self, device: torch.device | str) -> BlockInverse:
        index = None if self.index is None else self.index.to(device)
        return BlockInverse(self.blocks.to(device), self.numel, index, self.outside)

    def cpu(self) -> BlockInverse:
        return self.to("cpu")
