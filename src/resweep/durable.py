"""Writes that survive a crash: atomic replacement, syncs, and the kill-point test hook."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import TextIO

# Test hook for the kill-point suite: with RESWEEP_CRASH_AFTER_STEP=N set, the coordinating
# process dies (os._exit) right after its N-th persistence step (a write, fsync, rename, ...).
CRASH_EXIT_CODE = 86
_crash_after_step = int(os.environ.get("RESWEEP_CRASH_AFTER_STEP") or 0)
_steps_taken = 0


def persisted(step: str) -> None:
    """Count one persistence step; the kill-point tests crash the process here."""
    global _steps_taken
    if _crash_after_step:
        _steps_taken += 1
        if _steps_taken == _crash_after_step:
            os._exit(CRASH_EXIT_CODE)


def disable_crash_hook() -> None:
    """Worker processes inherit the environment but are not the process under test."""
    global _crash_after_step
    _crash_after_step = 0


def file_version(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten: inode, modification time, size."""
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns, info.st_size


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in path survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    persisted("fsync-dir")


# Every file resweep writes is opened without following a symbolic link at its own name: a link
# planted under output_dir must not send resweep's writes elsewhere (ELOOP instead).
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# Errors that mean the disk, not the code, failed: the run stops cleanly, exit status 2.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT, errno.EROFS})
# Writing resweep's own files, these too stop the run: output_dir made read-only, or a link.
OWN_WRITE_ERRNOS = DISK_ERRNOS | {errno.EACCES, errno.EPERM, errno.ELOOP}


class WriteFault(OSError):
    """resweep could not write a file of its own: the run stops, and no config is to blame."""


def is_write_fault(error: OSError) -> bool:
    """Whether an error while resweep wrote its own files stops the run (else: the config's)."""
    return isinstance(error, WriteFault) or error.errno in OWN_WRITE_ERRNOS


def open_fd(path: str | os.PathLike[str], *, append: bool = False) -> int:
    """A file descriptor of resweep's own file for writing bytes, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        return os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno in OWN_WRITE_ERRNOS:
            raise WriteFault(error.errno, error.strerror, error.filename) from None
        raise


def open_text(path: str | os.PathLike[str], *, append: bool = False) -> TextIO:
    """Open a file of resweep's own for writing text, never through a symbolic link."""
    fd = open_fd(path, append=append)
    return os.fdopen(fd, "a" if append else "w", encoding="utf-8", errors="replace")


def fault_text(error: OSError) -> str:
    """What a run stopped by a write fault says: what failed, where, and what to do."""
    where = error.filename or "a file"
    if error.errno == errno.ELOOP:
        return (
            f"{where} is a symbolic link, which resweep does not write through; replace it with "
            "a real file or directory"
        )
    if error.errno == errno.ENOTDIR:
        return f"{where} is not a directory, where resweep keeps one; move it away"
    what = error.strerror or os.strerror(error.errno or 0)
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{what} while writing {where}; fix its permissions"
    if error.errno in DISK_ERRNOS:
        return f"{what} while writing {where}; free space or fix the disk"
    return f"{error.strerror or os.strerror(error.errno or 0)} while writing {where}"


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace path with text so that a reader sees the old file or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_text(tmp) as handle:
            handle.write(text)
            handle.flush()
            persisted("write")
            if durable:
                os.fsync(handle.fileno())
                persisted("fsync")
        os.replace(tmp, path)
        persisted("rename")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: one call may take only part of a large buffer."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
