"""What every command shares: the consoles, one-line errors and exit codes, JSON output.

Exit codes: 0 ok, 1 failure while running, 2 usage error, 130 interrupted. No traceback
unless --debug or PRUNEKIT_DEBUG=1. Output meant for pipelines goes to stdout (``--json``);
progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import typer
from rich.console import Console
from rich.markup import escape

from prunekit.errors import PrunekitError, UsageError

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
RANK_GRACE_SECONDS = 2.0  # torchrun notices a failed process within 0.1 s


def debug() -> bool:
    return os.environ.get("PRUNEKIT_DEBUG", "") not in {"", "0"}


def _fail(message: str, code: int, lost_contact: bool = False) -> typer.Exit:
    """Print the one error line. Under torchrun it names the rank; ranks other than 0 (and
    a rank that lost contact with a failed one) wait a moment first, so that one failure is
    printed once: the failed rank's exit makes torchrun stop the others before they print."""
    from prunekit.runtime import distributed

    where = ""
    if distributed.launched():
        where = f" on rank {distributed.rank()} of {distributed.world_size()}"
        if lost_contact:  # the failed rank prints first (after its own grace) and exits
            time.sleep(3 * RANK_GRACE_SECONDS)
        elif distributed.rank() > 0:
            time.sleep(RANK_GRACE_SECONDS)
    err.print(f"[red]error{where}:[/red] {escape(message)}", markup=True, highlight=False)
    return typer.Exit(code)


def handle_errors(command: F) -> F:
    """Turn a PrunekitError, an out-of-memory or an OSError into one line and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PrunekitError as exc:
            if debug():
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except RuntimeError as exc:  # an out-of-memory outside the statistics' back-off
            from prunekit.calibrate.memory import is_out_of_memory
            from prunekit.runtime.distributed import lost_contact

            if not debug() and lost_contact(exc):
                raise _fail(
                    "lost contact with the other processes (another rank failed or was "
                    f"stopped; its error says why): {str(exc).splitlines()[0]}",
                    1,
                    lost_contact=True,
                ) from None
            if debug() or not is_out_of_memory(exc):
                raise
            first = str(exc).splitlines()[0]
            raise _fail(
                f"out of memory ({first}); lower --batch-size or --memory-budget, or use a "
                "device with more memory",
                1,
            ) from None
        except OSError as exc:  # disk full, permission denied, a missing folder...
            if debug():
                raise
            raise _fail(os_error_line(exc), 1) from None

    return cast(F, wrapper)  # functools.wraps: same signature as command


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EACCES: "permission denied: pick a path you may read or write",
    errno.EPERM: "not permitted: pick a path you may read or write",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "that is a folder, not a file: check the path",
    errno.EEXIST: "it already exists: pass --force or pick another path",
    errno.ENAMETOOLONG: "the name is too long: pick a shorter path",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError, with the fix that its errno calls for."""
    where = f" ({exc.filename})" if exc.filename else ""
    fix = _OS_FIXES.get(exc.errno or 0, "check the path")
    return f"{(exc.strerror or str(exc)).splitlines()[0]}{where}; {fix}"


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def warn(warnings: list[str]) -> None:
    for warning in warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)


def exit_if_failed(validation: dict[str, Any] | None) -> None:
    if validation is not None and not validation["passed"]:
        for failure in validation["failures"]:
            err.print(f"[red]validation failed:[/red] {escape(failure)}", highlight=False)
        raise typer.Exit(1)


def number_list(text: str, option: str, kind: type = int) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(
            f"{option} {text}: give comma-separated {kind.__name__}s, e.g. 1,32"
        ) from None
