"""Wall time per phase of a run (load, statistics, inverse, prune, ...), for report.json."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Timings:
    """Accumulates seconds per named phase; phases may repeat (every pruning step) and nest:
    a phase inside another is the inner one's time only, so the phases add up to the run."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.device = device
        self.started = time.perf_counter()
        self._open: list[str] = []  # the phases now open, innermost last
        self._since = 0.0  # when the innermost open phase last started or resumed

    def elapsed(self) -> float:
        """Seconds since these timings were started (the run's wall time so far)."""
        return round(time.perf_counter() - self.started, 3)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so GPU work lands in its own phase

    def _switch(self) -> None:
        """Credit the innermost open phase with the time since it (re)started."""
        self._sync()
        now = time.perf_counter()
        if self._open:
            name = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._switch()  # the enclosing phase pauses
        self._open.append(name)
        try:
            yield
        finally:
            self._switch()
            self._open.pop()

    def to_json(self) -> dict[str, float]:
        return {name: round(s, 3) for name, s in self.seconds.items()}
