"""Output folders (and files) that appear whole or not at all: written in a hidden staging folder (file), renamed
at the end.

The staging folder, `.<out name>.mergegate-partial-<pid>` beside the output, is locked (flock) by the process
writing it for as long as it lives. A process killed with SIGKILL cannot remove its folder, but the kernel
drops its lock: the next staging into the same parent folder removes every partial folder whose lock nobody
holds and whose pid is gone (one whose pid was reused stays until that process ends). What is put in place has
the modes the umask gives any new folder and file, not a temporary folder's private ones. `locked` holds any
folder the same way, for a writer that works in place (a search's output folder).
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
    _check_creatable(out_dir)
    return out_dir


def check_output_file(out: Path, overwrite: bool) -> Path:
    """Refuse an `out` file that exists unless `overwrite`, a folder, and one that cannot be created; return it
    absolute."""
    out = Path(out).absolute()
    if out.is_dir():
        raise MergegateError(f"{out} is a folder; give the path of the file to write")
    if os.path.lexists(out) and not overwrite:
        raise MergegateError(f"{out} exists; choose another name or pass --overwrite")
    _check_creatable(out)
    return out


def _missing_folders(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, nearest first."""
    missing = []
    folder = path.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _check_creatable(path: Path) -> None:
    missing = _missing_folders(path)
    existing = missing[-1].parent if missing else path.parent
    if not existing.is_dir():
        raise MergegateError(f"{path}: cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MergegateError(f"{path}: cannot be created: {existing} is not writable")


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path` (a folder or a file), or None when another process
    holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a file system without locks: fall back to the pid in the name alone
        return fd
    return fd


@contextmanager
def locked(folder: Path, busy: MergegateError) -> Iterator[None]:
    """Hold an existing `folder` for the block as a staging folder is held (an exclusive lock the kernel drops
    when the process dies, however it dies); raise `busy` when another process, or another open, holds it."""
    try:
        fd = _lock(folder)
    except OSError as exc:
        raise MergegateError(f"{folder}: cannot be opened ({exc.strerror or exc})") from None
    if fd is None:
        raise busy
    try:
        yield
    finally:
        os.close(fd)


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
    """Remove the partial staging folders and files in `parent` left by processes that died mid-write (SIGKILL,
    power loss): those whose lock nobody holds and whose pid is not alive. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if not match or entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
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
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
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
            _set_modes_from_umask(staging)
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


def _umask() -> int:
    """The process's umask, read without setting it where the kernel says it (setting it, even back, races other
    threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_modes_from_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes the umask gives new folders and files: tempfile made it
    0700 (and makes its own files 0600), and others on the machine must be able to read a model when the umask
    lets them."""
    umask = _umask()
    for root, folders, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)
        for name in folders:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


@contextmanager
def staged_file(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a partial file beside the file `out`, created now so that a place that cannot be written is refused
    before any work; on success it replaces `out`, on failure it is removed with the folders made for it."""
    out = check_output_file(out, overwrite)
    made = _missing_folders(out)
    partial = out.parent / f".{out.name}.mergegate-partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out.parent)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies, as to any file
    except OSError as exc:
        _remove_empty(made)
        raise MergegateError(f"{out}: cannot be written ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the end: a cleanup never takes it for stale
        except OSError:
            pass  # a file system without locks: the pid in the name alone keeps it
        try:
            yield partial
        except BaseException:
            partial.unlink(missing_ok=True)
            _remove_empty(made)
            raise
        try:
            os.replace(partial, out)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            _remove_empty(made)
            raise MergegateError(f"{out}: cannot be put in place ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (nearest first) as long as they are empty: the ones a failed write made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
