"""Statistics for pruners, collected once per pruning step and shared between criteria.

Each pruner declares the statistics it ``needs``; ``collect`` returns them per target name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunekit.errors import PluginError
from prunekit.pruners.base import Target

AVAILABLE: frozenset[str] = frozenset()


def collect(needs: frozenset[str], targets: Sequence[Target]) -> dict[str, dict[str, torch.Tensor]]:
    """Compute every statistic in ``needs`` for every target."""
    unknown = sorted(needs - AVAILABLE)
    if unknown:
        raise PluginError(
            f"the pruner needs statistics prunekit cannot collect: {', '.join(unknown)} "
            f"(available: {', '.join(sorted(AVAILABLE)) or 'none'}); upgrade prunekit"
        )
    return {t.name: {} for t in targets}
