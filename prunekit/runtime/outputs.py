"""Atomic outputs: a run writes into a staging folder that replaces OUT only on success.

Each run writing NAME takes a token and holds an ``flock`` on ``.NAME.lock-TOKEN`` for as
long as it works; its staging folder or file is ``.NAME.staging-TOKEN``. A staging entry
whose lock nobody holds belongs to a killed run: the next run writing NAME removes it (and
says so). An existing output is replaced in one atomic exchange (Linux ``renameat2``), so a
kill at any moment leaves the old or the new output in place. Where the exchange is missing,
the old output is parked as ``.NAME.previous-TOKEN`` for the two renames, and put back by
the next run if a kill came between them. ``--force`` replaces only what prunekit wrote.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from prunekit.errors import OutputExistsError, UsageError
from prunekit.runtime.schema import Lenient, parsed

MARKER = ".prunekit-output"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _entry(out: Path, kind: str, token: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{token}")


@contextmanager
def _held(out: Path) -> Iterator[str]:
    """A fresh token whose lock file is held (flock) until the block ends."""
    token = _token()
    lock = _entry(out, "lock", token)
    fd = os.open(lock, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield token
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(out: Path) -> list[str]:
    """Tidy what killed runs left beside OUT; the notes say what was done."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    pattern = re.compile(
        rf"^\.{re.escape(out.name)}\.(staging|previous|lock)-(\d+-[0-9a-f]{{8}})(\.tmp)?$"
    )
    tokens: dict[str, list[Path]] = {}
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match:
            tokens.setdefault(match[2], []).append(entry)
    notes = []
    for token, entries in tokens.items():
        lock = _entry(out, "lock", token)
        fd = os.open(lock, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run
            for entry in entries:
                if entry == lock:
                    continue
                if entry.name.startswith(f".{out.name}.previous-") and not os.path.lexists(out):
                    os.rename(entry, out)
                    notes.append(f"restored {out} from {entry.name}, parked by a killed run")
                    continue
                _remove(entry)
                notes.append(f"removed {entry}, left by a killed run")
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return notes


def inside_cwd_chain(out: Path) -> bool:
    """OUT is the current folder, one above it, or the filesystem root."""
    target = out.resolve()
    cwd = Path.cwd().resolve()
    return target == cwd or target in cwd.parents or target == Path(target.anchor)


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def is_prunekit_output(path: Path) -> bool:
    """A folder holding prunekit's marker file (every run and sweep writes one). A folder
    whose report.json merely has prunekit's keys is not enough: another tool's may too."""
    return path.is_dir() and (path / MARKER).is_file()


class Manifest(Lenient):
    """A run folder's marker: what prunekit wrote into it (path -> size, sha256)."""

    kind: Literal["run", "sweep"]
    files: dict[str, tuple[Annotated[int, Field(ge=0)], str]] = Field(default_factory=dict)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _contents(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir() and p.name != MARKER)


def write_marker(folder: Path, kind: str) -> None:
    """The marker of a run folder lists every file in it with its size and hash; a sweep's
    names it a sweep (its cells come and go)."""
    files = {} if kind == "sweep" else {
        str(p.relative_to(folder)): (p.stat().st_size, file_sha256(p)) for p in _contents(folder)
    }  # fmt: skip
    (folder / MARKER).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")


def foreign_files(out: Path) -> str | None:
    """Why --force may not replace the prunekit output ``out``, or None: a file prunekit did
    not write there (added or changed since), or a sweep folder."""
    marker = out / MARKER
    try:
        text = marker.read_bytes()
    except OSError as exc:
        return f"its marker cannot be read ({exc.strerror})"
    if not text.startswith(b"{"):  # an older prunekit's marker lists no files
        return "it was written by an older prunekit, whose marker lists no files"
    manifest = parsed(Manifest, text, str(marker), "pick another --out")
    if manifest.kind == "sweep":
        return "it is a sweep's folder"
    for path in _contents(out):
        name = str(path.relative_to(out))
        known = manifest.files.get(name)
        if path.is_symlink() or known is None or known[0] != path.stat().st_size:
            return f"{name} was not written by prunekit"
        if known[1] != file_sha256(path):
            return f"{name} changed since prunekit wrote it"
    return None


def written_by_prunekit(path: Path) -> bool:
    """A safetensors or ONNX file whose metadata names the prunekit version that wrote it
    (every file prunekit exports carries ``prunekit_version``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "prunekit_version" in (f.metadata() or {})
    except Exception:  # not a safetensors file (its reader raises several types)
        pass
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX file (the parser raises several types)
        return False
    return any(p.key == "prunekit_version" for p in proto.metadata_props)


def check_writable(out: Path, force: bool, kind: str = "folder") -> None:
    """Fail before any work when OUT cannot or must not be (re)placed.

    ``kind`` is "folder" (a run's output folder), "file" (one file prunekit keeps inside
    a folder of its own, e.g. a sweep's) or "export" (a file the user named: replaced only
    if prunekit wrote it).
    """
    if "\0" in str(out):
        raise UsageError(f"--out {str(out)!r} holds a NUL character; name a path without one")
    if inside_cwd_chain(out):
        raise UsageError(
            f"--out {out} is the current folder or one above it; prunekit writes a folder of "
            "its own: name a new one, e.g. --out prunekit-out/run1"
        )
    if os.path.lexists(out) and not (kind == "folder" and _empty_folder(out)):
        mode = os.lstat(out).st_mode
        if kind == "folder" and not stat.S_ISDIR(mode):
            what = "a file" if stat.S_ISREG(mode) else "a link, device or other special file"
            raise UsageError(f"--out {out} is {what}, not a folder; pick another --out")
        if kind != "folder" and not stat.S_ISREG(mode):
            what = "a folder" if stat.S_ISDIR(mode) else "a link, device or other special file"
            raise UsageError(f"{out} is {what}, not a file prunekit can replace; pick another path")
        if kind == "folder" and not is_prunekit_output(out):
            raise UsageError(
                f"{out} exists and is not a prunekit output (no {MARKER} in it); prunekit "
                "replaces only its own outputs: pick another --out"
            )
        foreign = foreign_files(out) if kind == "folder" and force else None
        if foreign is not None:
            raise UsageError(
                f"{out} is a prunekit output, but {foreign}; --force replaces only what "
                "prunekit wrote: move it out or pick another --out"
            )
        if kind == "export" and not written_by_prunekit(out):
            raise UsageError(
                f"{out} exists and was not written by prunekit (no prunekit_version in its "
                "metadata); --force replaces only prunekit's own files: pick another path"
            )
        if not force:
            raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write {out}: {folder} is not a writable folder; pick another --out"
        )


def prepare_output(out: Path, force: bool, kind: str = "folder") -> list[str]:
    """Tidy what killed runs left beside OUT (notes say what), then check_writable."""
    notes = clean_stale(out)
    check_writable(out, force, kind)
    return notes


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


def _move_into_place(staging: Path, out: Path, force: bool, token: str) -> None:
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
        # No atomic exchange here: park the old output where the next run can restore it.
        previous = _entry(out, "previous", token)
        os.rename(out, previous)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(previous, out)
            raise
        os.rename(previous, staging)  # removed with the staging folder
        return
    raise OutputExistsError(f"{out} keeps changing under another run; try again")


@contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; move it into place only if the block succeeds."""
    check_writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _held(out) as token:
        staging = _entry(out, "staging", token)
        staging.mkdir(mode=0o755)
        try:
            yield staging
            write_marker(staging, "run")
            _readable(staging)
            _move_into_place(staging, out, force, token)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_file(path: Path, force: bool, kind: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success
    (``kind``: "file", or "export" for a file the user named, see check_writable)."""
    check_writable(path, force, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)  # temp files of this same file from a killed run
    with _held(path) as token:
        staging = _entry(path, "staging", token)
        tmp = staging.with_name(staging.name + ".tmp")
        try:
            yield tmp
            _readable(tmp)
            if force:
                os.replace(tmp, path)
            elif not _renameat2(tmp, path, _RENAME_NOREPLACE):
                if os.path.lexists(path):
                    raise OutputExistsError(f"{path} was created by another run; nothing replaced")
                os.replace(tmp, path)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise OutputExistsError(
                    f"{path} was created by another run while this one worked; nothing replaced"
                ) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
