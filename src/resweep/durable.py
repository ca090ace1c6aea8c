"""Writes that survive a crash: atomic replacement, syncs, and the kill-point test hook."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

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


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace path with text so that a reader sees the old file or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
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
