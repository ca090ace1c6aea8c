"""Every path under output_dir but the state's: config directories, results, logs, markers."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from resweep.clock import now_iso
from resweep.durable import WriteFault, open_fd, open_text, persisted, write_all, write_atomic
from resweep.encoding import decode_flow, encode_flow, encode_line, yaml_error
from resweep.errors import ConfigError, StateError

CONFIGS_DIR = "configs"
RESULT_FILE = "result.yaml"
LOG_FILE = "log.txt"
EXCEPTION_FILE = "exception.txt"
# Written next to the saved state when a run stops on an error inside resweep.
RUN_FAILURE_FILE = "run_failure.txt"
RESULT_META_PREFIX = "# resweep: "
# The meta line's key for the length of the result line, which tells a whole file from a cut one.
RESULT_BYTES_KEY = "bytes"
# Where each worker process of a run says which config it is running now.
WORKERS_DIR = ".workers"
# Where hooks keep their artifacts: hooks/<hook id>/... (artifacts.ArtifactWriter).
HOOKS_DIR = "hooks"
MARKER_BYTES = 1024


# Names that are no directory of their own ("/", os.sep on every POSIX system, is checked apart).
_NOT_NAMES = frozenset({"", ".", ".."})


def config_path(root: str | os.PathLike[str], name: str) -> str:
    """configs/<name> under root, as a string: most configs never need a Path of it.

    Names are checked before anything runs (identity.check_name); this refuses, once more, any
    name that would lead out of configs/.
    """
    if "/" in name or name in _NOT_NAMES or "\0" in name:
        raise ConfigError(f"config name {name!r} would lead out of {CONFIGS_DIR}/; rename it")
    return f"{os.fspath(root)}{os.sep}{CONFIGS_DIR}{os.sep}{name}"


def prepare_config_dir(config_dir: str | os.PathLike[str]) -> None:
    """Make a config's directory, or clear the files an earlier attempt left in it."""
    try:
        os.mkdir(config_dir)
    except FileExistsError:
        if os.path.islink(config_dir):
            raise WriteFault(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(config_dir)) from None
        # Only a directory that was there can hold files of an earlier attempt.
        for stale in (RESULT_FILE, EXCEPTION_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(config_dir, stale))
    except FileNotFoundError:
        os.makedirs(config_dir, exist_ok=True)


# The entries of output_dir that resweep writes in or through, and whether each is a directory.
OWN_ENTRIES = {
    CONFIGS_DIR: True, "cache": True, WORKERS_DIR: True, "cache.lock": False, ".lock": False,
    "run.json": False, "journal.jsonl": False, "experiment.yaml": False, "summary.csv": False,
    ".finished.json": False, RUN_FAILURE_FILE: False, HOOKS_DIR: True,
    # The request cache's SQLite files, which diskcache opens by name.
    "cache/cache.db": False, "cache/cache.db-wal": False, "cache/cache.db-shm": False,
}  # fmt: skip


def check_layout(root: str | os.PathLike[str]) -> None:
    """A StateError, before a run changes anything, when one of resweep's own entries under
    output_dir is a symbolic link, or a directory where a file belongs (or the reverse)."""
    for entry, is_dir in OWN_ENTRIES.items():
        path = os.path.join(root, entry)
        if os.path.islink(path):
            raise StateError(
                f"{path} is a symbolic link; resweep writes only through paths it made: replace "
                "it with a real file or directory, or point output_dir at the link's target"
            )
        if os.path.exists(path) and os.path.isdir(path) != is_dir:
            kind, other = ("a file", "directory") if is_dir else ("a directory", "file")
            raise StateError(
                f"{path} is {kind} where resweep keeps its {other}; move it away and run again"
            )


# -- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredResult:
    """A finished config's result with what recovery needs: written before it is recorded."""

    result: Any
    attempt: int
    end_time: str | None
    duration_s: float | None
    cache_hits: int = 0
    cache_misses: int = 0
    session: str | None = None
    fingerprint: str | None = None

    def fields(self) -> dict[str, Any]:
        """The state's fields for a config whose result file was written but never recorded."""
        return {
            "status": "done",
            "result": self.result,
            "error": None,
            "end_time": self.end_time,
            "duration_s": self.duration_s,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "session": self.session,
            "fingerprint": self.fingerprint,
        }


_META_KEYS = tuple(f.name for f in dataclasses.fields(StoredResult) if f.name != "result")


def write_result(config_dir: str | os.PathLike[str], stored: StoredResult) -> None:
    """Write result.yaml, whose comment line keeps what a crash recovery needs.

    Written in place, not through a renamed temporary file: the comment line gives the result
    line's length in bytes, so a file cut short by a crash reads as no result at all.
    """
    data = encode_flow(stored.result).encode("utf-8")
    # The keys of _META_KEYS spelled out, not looped over: this runs once per config.
    meta = {
        "attempt": stored.attempt,
        "end_time": stored.end_time,
        "duration_s": stored.duration_s,
        "cache_hits": stored.cache_hits,
        "cache_misses": stored.cache_misses,
        "session": stored.session,
        "fingerprint": stored.fingerprint,
        RESULT_BYTES_KEY: len(data),
    }
    head = f"{RESULT_META_PREFIX}{encode_line(meta)}\n".encode()
    path = os.path.join(config_dir, RESULT_FILE)
    fd = open_fd(path)
    try:
        write_all(fd, head + data + b"\n")
    finally:
        os.close(fd)
    persisted("result-write")


def read_result(config_dir: str | os.PathLike[str]) -> StoredResult | None:
    """The stored result, or None when the file is missing, unreadable or cut short."""
    path = Path(config_dir, RESULT_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    except OSError as error:
        raise StateError(
            f"cannot read {path}: {error.strerror}; fix its permissions (or move it away to run "
            "that config again)"
        ) from None
    first, _, rest = text.partition("\n")
    if not first.startswith(RESULT_META_PREFIX):
        return None
    try:
        meta = json.loads(first.removeprefix(RESULT_META_PREFIX))
        if not isinstance(meta, dict) or not isinstance(meta.get("attempt"), int):
            return None
        size = meta.pop(RESULT_BYTES_KEY, None)
        if size is not None and (len(rest.encode("utf-8")) != size + 1 or rest[-1:] != "\n"):
            return None  # cut short by a crash while it was written
        result = decode_flow(rest)
    except (ValueError, yaml_error()):
        return None
    known = {key: meta[key] for key in _META_KEYS if key in meta}
    return StoredResult(result=result, **known)


# -- logs and failures -----------------------------------------------------------------------


def log_header(attempt: int, *, remote: bool = False) -> str:
    """The line that opens an attempt's part of log.txt; a remote one names its host."""
    where = f" on {socket.gethostname()}" if remote else ""
    return f"--- attempt {attempt}, {now_iso()}, pid {os.getpid()}{where}\n"


def append_log(config_dir: str | os.PathLike[str], text: str) -> None:
    """Add text to a config's log.txt (log.txt keeps every attempt)."""
    if text:
        with open_text(os.path.join(config_dir, LOG_FILE), append=True) as log:
            log.write(text)


def write_failure(
    config_dir: str | os.PathLike[str], attempt: int, end_time: str, trace: str
) -> None:
    """A failed attempt's traceback: log.txt keeps every attempt's, exception.txt the last one."""
    write_atomic(Path(config_dir, EXCEPTION_FILE), trace, durable=False)
    append_log(config_dir, f"--- attempt {attempt} failed, {end_time}\n{trace}")


class LazyLog(io.TextIOBase):
    """A config's log.txt, opened on first write so that silent configs cost no file."""

    def __init__(self, path: str | os.PathLike[str], attempt: int) -> None:
        self._path = path
        self._attempt = attempt
        self._handle: TextIO | None = None

    def write(self, text: str) -> int:
        if not text:
            return 0
        if self._handle is None:
            self._handle = open_text(self._path, append=True)
            self._handle.write(log_header(self._attempt))
        return self._handle.write(text)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        super().close()


# -- markers: which config each worker process runs now ------------------------------------


class Marker:
    """This worker process's marker file, rewritten in place whenever it starts or ends a config.

    While it runs a config the process holds an flock on the file: a later run that finds the
    lock held knows a process still runs a config of a run that is gone (see recovery).
    """

    def __init__(self, markers_dir: str | os.PathLike[str], name: str | None = None) -> None:
        path = os.path.join(markers_dir, name or str(os.getpid()))
        self._fd = open_fd(path)

    def mark(self, name: str) -> None:
        """Say which config this process runs now ('' for none)."""
        import fcntl

        record = f"{time.time():.3f} {name}".encode()[:MARKER_BYTES]
        if name:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.pwrite(self._fd, record.ljust(MARKER_BYTES), 0)
        if not name:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def marker_pid(file_name: str) -> tuple[str, int] | None:
    """(host, pid) of the process a marker file belongs to: '<pid>' here, 'dask-<host>-<pid>-<thread>'."""
    if file_name.isdigit():
        return socket.gethostname(), int(file_name)
    if file_name.startswith("dask-"):  # dask-<host>-<pid>-<thread>
        host_pid, _, thread = file_name[len("dask-") :].rpartition("-")
        host, _, pid = host_pid.rpartition("-")
        if pid.isdigit() and thread.isdigit() and host:
            return host, int(pid)
    return None


def read_markers(markers_dir: str | os.PathLike[str]) -> dict[str, tuple[int, float]]:
    """The configs that worker processes were running: name -> (pid, start time)."""
    running = {}
    try:
        entries = list(os.scandir(markers_dir))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    for entry in entries:
        try:
            with open(entry.path, "rb") as handle:
                stamp, _, name = handle.read(MARKER_BYTES).decode().strip().partition(" ")
            owner = marker_pid(entry.name)
            if owner is not None:
                running[name] = (owner[1], float(stamp))
        except (OSError, ValueError):
            continue
    running.pop("", None)
    return running


# A Dask run's coordinator lists here each config a worker was heard to start, one per line.
STARTED_FILE = "started"


def note_started(markers_dir: str | os.PathLike[str], names: list[str]) -> None:
    """Append configs that really started, for the settling of a run that dies (Dask)."""
    data = "".join(f"{encode_line(name)}\n" for name in names).encode()
    fd = open_fd(os.path.join(markers_dir, STARTED_FILE), append=True)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def read_started(markers_dir: str | os.PathLike[str]) -> set[str] | None:
    """The configs a Dask run heard start, or None when it was no Dask run."""
    try:
        text = Path(markers_dir, STARTED_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    started = set()
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            name = json.loads(line)
            if isinstance(name, str):
                started.add(name)
    return started


def clear_markers(markers_dir: str | os.PathLike[str]) -> None:
    """Forget what dead worker processes were running: the next pool's write anew."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(markers_dir):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


# Made by the first Ctrl-C: a worker that finds it starts no further config.
STOP_FILE = "stop"


def request_stop(root: str | os.PathLike[str]) -> None:
    """Tell every worker of this run to start no further config."""
    path = os.path.join(root, WORKERS_DIR, STOP_FILE)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(open_fd(path))


def remove_workers_dir(root: str | os.PathLike[str]) -> None:
    """Drop a run's markers once nothing needs them: read when settling, written anew by a run."""
    import shutil

    shutil.rmtree(os.path.join(root, WORKERS_DIR), ignore_errors=True)
