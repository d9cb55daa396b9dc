"""FishLeg surgeon for prunekit (arXiv 2412.02328): a learned Q ≈ (F + γI)⁻¹ per layer."""

from prunekit_fishleg.qmatrix import KroneckerQ, auxiliary_loss, fit_q

__all__ = ["KroneckerQ", "auxiliary_loss", "fit_q"]
