"""Progress reporting: the pipeline announces stages; the CLI shows them with rich on stderr."""

from __future__ import annotations

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
        with self.progress:
            task = self.progress.add_task(description, total=None)

            def update(text: str) -> None:
                self.progress.update(task, description=f"{description}: {text}")

            try:
                yield update
            finally:
                self.progress.remove_task(task)
