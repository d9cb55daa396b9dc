"""Symmetric integer grids for weights: what ``--quantize`` rounds every weight to.

A weight matrix (out, d) (a Conv2d flattened to (out, in·kh·kw)) is stored as integer codes
q and float32 scales s, w = q · s. Symmetric, so a pruned (zero) weight has code 0 and stays
exactly zero. Per output channel (``group_size`` None: one scale per row) or per group of
``group_size`` consecutive inputs of a row. The scale of a row or group is chosen the way ONNX
Runtime's own quantizers choose it, so their kernels read the codes unchanged:

- 8 bits: s = max|w| / 127, codes in [-127, 127] (QDQ ``DequantizeLinear``, zero point 0);
- 4 bits: s = w* / -8, w* the entry of largest magnitude (its sign kept), codes in [-8, 7]
  (``MatMulNBits``, symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4)


@dataclass(frozen=True)
class QuantGrid:
    """An integer grid: ``bits`` (8 or 4) and the inputs per scale (None: a whole row)."""

    bits: int = 8
    group_size: int | None = None

    @property
    def qmin(self) -> int:
        return -127 if self.bits == 8 else -8

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    def group_of(self, columns: int) -> int:
        """Inputs per scale for a matrix of ``columns`` inputs."""
        return self.group_size or columns

    def scales(self, w: torch.Tensor) -> torch.Tensor:
        """Scales for the columns of ``w`` (rows, k), one per row (k ≤ the group size), in
        float32; a row of zeros gets scale 1 (its codes are 0 whatever the scale)."""
        w = w.float()
        if self.bits == 8:
            scale = w.abs().amax(dim=1) / 127.0
        else:
            extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            scale = extreme / -8.0
        return torch.where(scale == 0, torch.ones_like(scale), scale)

    def codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Integer codes (int8) of the columns of ``w`` under per-row ``scale``."""
        q = torch.round(w.float() / scale.float().unsqueeze(1))
        return q.clamp(self.qmin, self.qmax).to(torch.int8)

    def round(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``w`` rounded to the grid (dequantized, in w's dtype)."""
        return dequantize(self.codes(w, scale), scale).to(w.dtype)

    def on_grid(self, weight: torch.Tensor, scales: torch.Tensor) -> QuantizedTensor:
        """The codes of a weight already on this grid (a rounding of it), given its scales
        (rows, groups): exact, on the CPU."""
        matrix = weight.detach().reshape(weight.shape[0], -1).float().cpu()
        scales = scales.float().cpu()
        codes = torch.round(matrix / expand_scales(scales, matrix.shape[1]))
        codes = codes.clamp(self.qmin, self.qmax).to(torch.int8)
        return QuantizedTensor(codes, scales, self.bits, self.group_size)

    def quantize(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round-to-nearest codes (rows, d) and scales (rows, groups) of a whole matrix."""
        d = matrix.shape[1]
        group = self.group_of(d)
        codes, scales = [], []
        for start in range(0, d, group):
            part = matrix[:, start : start + group]
            scale = self.scales(part)
            codes.append(self.codes(part, scale))
            scales.append(scale)
        return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes (rows, k) times per-row ``scale`` (rows,), in float32."""
    return codes.float() * scale.float().unsqueeze(1)


def expand_scales(scales: torch.Tensor, columns: int) -> torch.Tensor:
    """Per-group scales (rows, groups) as one scale per entry (rows, columns)."""
    group = -(-columns // scales.shape[1])
    return scales.repeat_interleave(group, dim=1)[:, :columns]


@dataclass
class QuantizedTensor:
    """One weight on its grid: int8 codes shaped like the weight matrix (out, d) and float32
    scales (out, groups); the weight is codes · scales exactly."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int | None

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * expand_scales(self.scales, self.codes.shape[1])
