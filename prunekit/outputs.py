"""Atomic outputs: a run writes into a staging folder that replaces OUT only on success."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunekit.errors import OutputExistsError, UsageError


def check_writable(out: Path, force: bool) -> None:
    """Fail before any work when OUT exists and --force was not given."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write {out}: {folder} is not a writable folder; pick another --out"
        )


def _readable(path: Path) -> None:
    """Give written files the usual permissions (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, 0o666 & ~umask)


@contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; move it into place only if the block succeeds."""
    check_writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(staging, 0o755)
    try:
        yield staging
        _readable(staging)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_file(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        _readable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
