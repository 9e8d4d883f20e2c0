"""Output folders that appear whole or not at all: written in a hidden staging folder, renamed at the end.

The staging folder, `.<out name>.mergegate-partial-<pid>` beside the output, is locked (flock) by the process
writing it for as long as it lives. A process killed with SIGKILL cannot remove its folder, but the kernel
drops its lock: the next staging into the same parent folder removes every partial folder whose lock nobody
holds and whose pid is gone (one whose pid was reused stays until that process ends).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MergegateError

_PARTIAL = re.compile(r"^\.(?:.+\.mergegate-partial(?:-(\d+))?|mergegate-new-(\d+)-.+)$")
_DESTINATIONS: dict[Path, Path] = {}  # staging folder → the output folder it becomes, while it is being written


def destination(folder: Path) -> Path:
    """The output folder a staging folder of `staged` will be renamed to; any other folder is its own."""
    return _DESTINATIONS.get(Path(folder), Path(folder))


def check_output(out_dir: Path, overwrite: bool) -> Path:
    """Refuse a non-empty `out_dir` unless `overwrite`, and one that cannot be created; return it absolute."""
    out_dir = Path(out_dir).absolute()
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise MergegateError(f"{out_dir} exists and is not a folder")
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise MergegateError(f"{out_dir} exists and is not empty; choose another folder or pass --overwrite")
    except OSError as exc:
        raise MergegateError(f"{out_dir}: cannot be read ({exc.strerror or exc})") from None
    existing = out_dir.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MergegateError(f"{out_dir}: cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MergegateError(f"{out_dir}: cannot be created: {existing} is not writable")
    return out_dir


def _lock(folder: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `folder`, or None when another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a file system without locks: fall back to the pid in the name alone
        return fd
    return fd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OverflowError:
        return False
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the partial staging folders in `parent` left by processes that died mid-write (SIGKILL, power
    loss): those whose lock nobody holds and whose pid is not alive. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        digits = match.group(1) or match.group(2)
        pid = int(digits) if digits else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue  # its writer may still be running (or the pid was reused: left for a later run)
        try:
            fd = _lock(entry)
        except OSError:
            continue
        if fd is None:
            continue  # locked: a live writer (perhaps in another pid namespace)
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            os.close(fd)
    return removed


@contextmanager
def staged(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside `out_dir`; on success it replaces `out_dir`, on failure it is removed."""
    out_dir = check_output(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir.parent)
        # created under a temporary name and locked before it gets the name other runs look for, so that a
        # concurrent cleanup never sees it unlocked
        scratch = Path(tempfile.mkdtemp(prefix=f".mergegate-new-{os.getpid()}-", dir=out_dir.parent))
        lock = _lock(scratch)
        staging = out_dir.parent / f".{out_dir.name}.mergegate-partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        scratch.rename(staging)
    except OSError as exc:
        raise MergegateError(f"{out_dir}: cannot be created ({exc.strerror or exc})") from None
    _DESTINATIONS[staging] = out_dir
    try:
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = None
        try:
            if out_dir.exists():
                old = out_dir.parent / f".{out_dir.name}.mergegate-old"
                shutil.rmtree(old, ignore_errors=True)
                out_dir.rename(old)
            staging.rename(out_dir)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if old is not None and old.exists() and not out_dir.exists():
                old.rename(out_dir)  # the previous output back where it was
            raise MergegateError(f"{out_dir}: cannot be put in place ({exc.strerror or exc})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        _DESTINATIONS.pop(staging, None)
        if lock is not None:
            os.close(lock)
