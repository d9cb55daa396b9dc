"""Progress reporting: the pipeline announces stages; the CLI shows them with rich on stderr.

On a terminal each stage is a spinner whose text follows the sub-steps (step k/K, gradients
n/m); elsewhere (CI logs, pipes) the same events are plain lines, a sub-step line at most
every ``PLAIN_INTERVAL`` seconds, and every stage ends with its time; they all begin with
``progress:`` so that logs can be filtered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Reporter(Protocol):
    def stage(self, description: str) -> AbstractContextManager[Callable[[str], None]]: ...

    def note(self, text: str) -> None: ...


class Silent:
    """Reports nothing (library use and tests)."""

    @contextmanager
    def stage(self, description: str) -> Iterator[Callable[[str], None]]:
        yield lambda _: None

    def note(self, text: str) -> None:
        pass


class RichReporter:
    """A spinner with elapsed time per stage, on stderr so stdout stays machine-readable."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True, soft_wrap=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,  # no stray blank lines in logs and pipes
        )

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    @contextmanager
    def stage(self, description: str) -> Iterator[Callable[[str], None]]:
        """Show ``description``; the yielded function shows a sub-step next to it."""
        if not self.console.is_terminal:
            with self._plain_stage(description) as update:
                yield update
            return
        with self.progress:
            task = self.progress.add_task(description, total=None)

            def update(text: str) -> None:
                self.progress.update(task, description=f"{description}: {text}")

            try:
                yield update
            finally:
                self.progress.remove_task(task)

    @contextmanager
    def _plain_stage(self, description: str) -> Iterator[Callable[[str], None]]:
        started = last = time.monotonic()
        self.console.print(f"progress: {description}", highlight=False)

        def update(text: str) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PLAIN_INTERVAL:
                last = now
                self.console.print(f"progress: {description}: {text}", highlight=False)

        yield update
        self.console.print(
            f"progress: {description}: done in {time.monotonic() - started:.1f} s",
            highlight=False,
        )


PLAIN_INTERVAL = 2.0  # seconds between sub-step lines in logs
