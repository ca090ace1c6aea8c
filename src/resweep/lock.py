"""The experiment lock: one run at a time per output_dir, and who holds it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from resweep.clock import now_iso
from resweep.durable import write_atomic
from resweep.encoding import encode_flow
from resweep.errors import LockedError
from resweep.processes import pid_alive

LOCK_FILE = ".lock"
RUN_FILE = "run.json"
# How long a refused run waits for the lock's new holder to write run.json.
HOLDER_WAIT_S = 2.0


@dataclass(frozen=True)
class RunInfo:
    """Who holds the experiment: shown to a second run that finds it busy."""

    host: str
    pid: int
    start_time: str
    # The inode of the lock file this run locked: a run.json of a living run whose lock file
    # is another one tells a lock file replaced under it.
    lock: int | None = None

    @staticmethod
    def current(lock: int | None = None) -> RunInfo:
        return RunInfo(socket.gethostname(), os.getpid(), now_iso(), lock)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.start_time}"

    def provably_dead(self) -> bool:
        """On this host with no such process: nobody is running under this record."""
        return self.host == socket.gethostname() and not pid_alive(self.pid)


# Filesystems whose locks a process on another host can hold: there a held lock may belong to a
# run that is gone with its machine, which --break-lock is for.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "fuse.cephfs", "ocfs2", "gfs2", "afs", "9p", "panfs", "wekafs",
})  # fmt: skip


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem path is on, from /proc/self/mountinfo (None: cannot tell)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, rest.split()[0]
    return kind


def lock_is_local(path: Path) -> bool:
    """Whether a held lock on path can only be held by a process of this host (any container)."""
    kind = filesystem_type(path)
    return kind is not None and kind not in NETWORK_FILESYSTEMS


def local_holders(path: Path) -> set[int] | None:
    """The pids of processes on this host that hold a lock on path, from /proc/locks.

    None where the kernel does not say (no /proc/locks): then nobody can tell.
    """
    try:
        info = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = set()
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 21470 fe:00:2467049 0 EOF"; a blocked waiter has "->".
        if "->" in fields or len(fields) < 6:
            continue
        if fields[5] == device and fields[4].isdigit():
            holders.add(int(fields[4]))
    return holders


def _read_run_file(run_path: Path) -> RunInfo | None:
    try:
        return RunInfo(**json.loads(run_path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def holder(root: Path, wait_s: float = HOLDER_WAIT_S) -> RunInfo | None:
    """Who holds the lock, from run.json; waits a moment for a holder that just took it."""
    deadline = time.monotonic() + wait_s
    while True:
        info = _read_run_file(root / RUN_FILE)
        # A run.json left by a dead run names a dead pid: the new holder has not written yet.
        if info is not None and not info.provably_dead():
            return info
        if time.monotonic() > deadline:
            return info
        time.sleep(0.02)


def active_run(root: Path) -> RunInfo | None:
    """The run holding the experiment now; None when there is none or its process is gone."""
    info = _read_run_file(root / RUN_FILE)
    return None if info is None or info.provably_dead() else info


@contextlib.contextmanager
def hold(root: Path, *, break_lock: bool = False) -> Iterator[RunInfo]:
    """Hold the experiment for one run; a lock dies with its holder's process."""
    import filelock

    lock_path = root / LOCK_FILE
    run_path = root / RUN_FILE
    lock = filelock.FileLock(str(lock_path), is_singleton=False)
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        found = holder(root)
        described = found.describe() if found else "holder unknown"
        if not break_lock:
            raise LockedError(
                f"another run is active on {root}: {described}; wait for it to end, "
                "or if it is dead on another host, run again with --break-lock"
            ) from None
        living = local_holders(lock_path)
        here = found is not None and found.host == socket.gethostname()
        # On a local filesystem only a process of this host (in any container or PID namespace,
        # which /proc/locks may hide) can hold the lock: it is alive, since flock dies with it.
        if living or here or lock_is_local(lock_path) or (living is None and found is None):
            # flock dies with its holder: a lock held on this host has a living holder, whatever
            # side files say. Where the kernel cannot say who holds it, nothing is broken.
            pid = found.pid if found is not None else min(living or {0})
            hint = f"stop it first (kill {pid})" if pid else "stop it first"
            raise LockedError(
                f"another run is active on {root}: {described}, alive on this host; "
                f"{hint}, --break-lock only takes over a run on another host that is gone"
            ) from None
        # Taking over: a new lock file, so the old holder's lock no longer counts.
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        lock = filelock.FileLock(str(lock_path), is_singleton=False)
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:
            raise LockedError(
                f"another run took {root} while breaking its lock; try again"
            ) from None
    locked = os.stat(lock_path).st_ino
    previous = _read_run_file(run_path)
    if (
        previous is not None
        and previous.lock is not None
        and previous.lock != locked
        and previous.host == socket.gethostname()
        and previous.pid != os.getpid()
        and pid_alive(previous.pid)
    ):
        # The lock file was replaced under a run that is still alive: its lock no longer shows.
        lock.release()
        raise LockedError(
            f"another run is active on {root}: {previous.describe()}, alive on this host, though "
            f"its lock file was removed; stop it first (kill {previous.pid})"
        )
    info = RunInfo.current(locked)
    try:
        write_atomic(run_path, encode_flow(asdict(info)) + "\n", durable=False)
        yield info
    finally:
        with contextlib.suppress(OSError):
            run_path.unlink()
        lock.release()
