"""Atomic outputs: a run writes into a staging folder that replaces OUT only on success.

Staging folders and files are named ``.NAME.staging-HOST-PID-RANDOM`` beside NAME, so a run
that was killed can be recognised later: a staging entry whose process is gone (same host)
is removed by the next run that writes NAME. An existing output is replaced with one atomic
exchange (Linux ``renameat2``), so a kill at any moment leaves either the old or the new
output in place, never neither. ``--force`` replaces only what prunekit wrote: a folder with
a ``report.json``, ``sweep.json`` or the ``.prunekit-output`` marker, or a regular file.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunekit.errors import OutputExistsError, UsageError

MARKER = ".prunekit-output"
OUTPUT_SIGNS = ("report.json", "sweep.json", MARKER)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def staging_name(name: str) -> str:
    return f".{name}.staging-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Remove staging entries of OUT left by killed runs on this host; say what went."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.staging-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}")
    notes = []
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return notes
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if not match or match[1] != _host() or _pid_alive(int(match[2])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        notes.append(f"removed {entry}, left by a killed run (process {match[2]})")
    return notes


def _inside_cwd_chain(out: Path) -> bool:
    """OUT is the current folder, one above it, or the filesystem root."""
    target = out.resolve()
    cwd = Path.cwd().resolve()
    return target == cwd or target in cwd.parents or target == Path(target.anchor)


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def is_prunekit_output(path: Path) -> bool:
    return path.is_dir() and any((path / sign).is_file() for sign in OUTPUT_SIGNS)


def check_writable(out: Path, force: bool, kind: str = "folder") -> None:
    """Fail before any work when OUT cannot or must not be (re)placed.

    ``kind`` is "folder" (a run's output folder) or "file" (one exported file).
    """
    if _inside_cwd_chain(out):
        raise UsageError(
            f"--out {out} is the current folder or one above it; prunekit writes a folder of "
            "its own: name a new one, e.g. --out prunekit-out/run1"
        )
    if os.path.lexists(out) and not (kind == "folder" and _empty_folder(out)):
        mode = os.lstat(out).st_mode
        if kind == "folder" and not stat.S_ISDIR(mode):
            what = "a file" if stat.S_ISREG(mode) else "a link, device or other special file"
            raise UsageError(f"--out {out} is {what}, not a folder; pick another --out")
        if kind == "file" and not stat.S_ISREG(mode):
            what = "a folder" if stat.S_ISDIR(mode) else "a link, device or other special file"
            raise UsageError(f"{out} is {what}, not a file prunekit can replace; pick another path")
        if not force:
            raise OutputExistsError(f"{out} already exists; pass --force to replace it")
        if kind == "folder" and not is_prunekit_output(out):
            raise UsageError(
                f"{out} is not a prunekit output (no {' or '.join(OUTPUT_SIGNS)} in it); "
                "--force replaces only prunekit outputs: pick another --out"
            )
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write {out}: {folder} is not a writable folder; pick another --out"
        )


def prepare_output(out: Path, force: bool, kind: str = "folder") -> list[str]:
    """check_writable, then remove what killed runs left beside OUT; the notes say what."""
    check_writable(out, force, kind)
    return clean_stale(out)


def _readable(path: Path) -> None:
    """Give written files the usual permissions (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, 0o666 & ~umask)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the system or filesystem lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}:
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _move_into_place(staging: Path, out: Path, force: bool) -> None:
    """Put ``staging`` at ``out``; if ``out`` exists, ``staging`` ends up holding the old one."""
    for _ in range(3):  # another run may create or remove OUT between the checks
        if _empty_folder(out):  # a folder the user made for us
            os.rmdir(out)
        if not os.path.lexists(out):
            try:
                if not _renameat2(staging, out, _RENAME_NOREPLACE):
                    if os.path.lexists(out):
                        continue
                    os.rename(staging, out)
                return
            except OSError as exc:
                if exc.errno not in {errno.EEXIST, errno.ENOTEMPTY}:
                    raise
                continue
        if not force:
            raise OutputExistsError(
                f"{out} was created by another run while this one worked; nothing was "
                "replaced: pass --force to replace it, or pick another --out"
            )
        check_writable(out, force)  # still a prunekit output?
        if _renameat2(staging, out, _RENAME_EXCHANGE):
            return
        # No atomic exchange here: move the old output to a staging name (cleaned if we die).
        old = out.with_name(staging_name(out.name))
        os.rename(out, old)
        os.rename(staging, out)
        os.rename(old, staging)
        return
    raise OutputExistsError(f"{out} keeps changing under another run; try again")


@contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; move it into place only if the block succeeds."""
    check_writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(staging_name(out.name))
    staging.mkdir(mode=0o755)
    try:
        yield staging
        (staging / MARKER).write_text("written by prunekit\n")
        _readable(staging)
        _move_into_place(staging, out, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_file(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    check_writable(path, force, kind="file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(staging_name(path.name) + ".tmp")
    try:
        yield tmp
        _readable(tmp)
        if not force and not _renameat2(tmp, path, _RENAME_NOREPLACE):
            if os.path.lexists(path):
                raise OutputExistsError(f"{path} was created by another run; nothing replaced")
            os.replace(tmp, path)
        elif force:
            os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise OutputExistsError(
                f"{path} was created by another run while this one worked; nothing replaced"
            ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
