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
        self._open: list[list[float | str]] = []  # [name, start] of the phases now open

    def elapsed(self) -> float:
        """Seconds since these timings were started (the run's wall time so far)."""
        return round(time.perf_counter() - self.started, 3)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so GPU work lands in its own phase

    def _credit(self, entry: list[float | str], now: float) -> None:
        name, start = str(entry[0]), float(entry[1])
        self.seconds[name] = self.seconds.get(name, 0.0) + now - start

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        now = time.perf_counter()
        if self._open:  # the enclosing phase pauses
            self._credit(self._open[-1], now)
        entry: list[float | str] = [name, now]
        self._open.append(entry)
        try:
            yield
        finally:
            self._sync()
            now = time.perf_counter()
            self._credit(entry, now)
            self._open.pop()
            if self._open:
                self._open[-1][1] = now

    def to_json(self) -> dict[str, float]:
        return {name: round(s, 3) for name, s in self.seconds.items()}
