"""Wall time per phase of a run (load, statistics, inverse, prune, ...), for report.json."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Timings:
    """Accumulates seconds per named phase; phases may repeat (every pruning step)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.device = device
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since these timings were started (the run's wall time so far)."""
        return round(time.perf_counter() - self.started, 3)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so GPU work lands in its own phase

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def to_json(self) -> dict[str, float]:
        return {name: round(s, 3) for name, s in self.seconds.items()}
