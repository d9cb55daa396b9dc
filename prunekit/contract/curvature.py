"""Curvature handed to pruners as objects (plugin contract v1), not as raw padded tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockInverse:
    """H = (F + λI)⁻¹ of one weight tensor, block-diagonal along the flattened weight
    (row-major): blocks of B consecutive weights, the last block zero-padded.

    Vectors are flat, of the weight's ``numel`` (or ``(numel, k)`` for k at once).
    """

    blocks: torch.Tensor  # (nb, B, B), symmetric positive definite
    numel: int

    @property
    def block_size(self) -> int:
        return self.blocks.shape[-1]

    def diag(self) -> torch.Tensor:
        """diag H, flat."""
        return self.blocks.diagonal(dim1=1, dim2=2).reshape(-1)[: self.numel]

    def _blocked(self, v: torch.Tensor) -> tuple[torch.Tensor, int]:
        k = 1 if v.dim() == 1 else v.shape[1]
        flat = v.reshape(self.numel, k).to(self.blocks.dtype)
        pad = self.blocks.shape[0] * self.block_size - self.numel
        padded = torch.nn.functional.pad(flat, (0, 0, 0, pad))
        return padded.reshape(self.blocks.shape[0], self.block_size, k), k

    def _flat(self, blocked: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
        out = blocked.reshape(-1, k)[: self.numel]
        return out.reshape(like.shape).to(like.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v."""
        blocked, k = self._blocked(v)
        return self._flat(torch.bmm(self.blocks, blocked), k, v)

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
        return self._flat(torch.cholesky_solve(blocked.double(), factor), k, v)

    def to(self, device: torch.device | str) -> BlockInverse:
        return BlockInverse(self.blocks.to(device), self.numel)

    def cpu(self) -> BlockInverse:
        return self.to("cpu")
