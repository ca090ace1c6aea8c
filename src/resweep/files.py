"""Every path under output_dir but the state's: config directories, results, logs, markers."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from resweep.clock import now_iso
from resweep.durable import (
    WriteFault,
    is_write_fault,
    open_fd,
    open_text,
    persisted,
    write_all,
    write_atomic,
)
from resweep.encoding import decode_flow, encode_line, yaml_error
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
# Each process that runs configs appends their results to .results/<pid>.jsonl.
RESULTS_DIR = ".results"
RESULTS_SUFFIX = ".jsonl"
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


def make_config_dir(config_dir: str | os.PathLike[str]) -> None:
    """Make a config's directory when something is first kept there; never through a link."""
    try:
        os.mkdir(config_dir)
    except FileExistsError:
        _check_config_dir(config_dir)
    except FileNotFoundError:
        os.makedirs(config_dir, exist_ok=True)


def _check_config_dir(config_dir: str | os.PathLike[str]) -> bool:
    """Whether config_dir exists; a WriteFault when it is a link or no directory."""
    try:
        mode = os.lstat(config_dir).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISLNK(mode):
        raise WriteFault(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(config_dir))
    if not stat.S_ISDIR(mode):
        raise WriteFault(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(config_dir))
    return True


def clear_earlier_attempt(config_dir: str | os.PathLike[str]) -> None:
    """Remove the files an earlier execution of a config left that would tell of it as the last.

    Every attempt, not only the second on: an execution that no run recorded, or a record
    dropped by clean_index, gives the next one the same attempt number. One lstat when the
    config has no directory, which is the common case; never through a link.
    """
    if not _check_config_dir(config_dir):
        return
    for stale in (RESULT_FILE, EXCEPTION_FILE):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(os.path.join(config_dir, stale))


# The entries of output_dir that resweep writes in or through, and whether each is a directory.
OWN_ENTRIES = {
    CONFIGS_DIR: True, "cache": True, WORKERS_DIR: True, RESULTS_DIR: True, "cache.lock": False,
    ".lock": False, "run.json": False, "journal.jsonl": False, "experiment.yaml": False,
    "summary.csv": False, ".finished.json": False, RUN_FAILURE_FILE: False, HOOKS_DIR: True,
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


class ResultLog:
    """This process's append-only results file: a config's result is written here, one line in
    one write(), before the coordinator hears of it, so a coordinator killed at once loses none.

    One file per worker process, not one per config: no inode per config on the way.
    """

    def __init__(self, results_dir: str | os.PathLike[str]) -> None:
        self._dir = results_dir
        self._path = os.path.join(results_dir, f"{os.getpid()}{RESULTS_SUFFIX}")
        self._fd: int | None = None
        self._size = 0
        self._torn = False
        # The in-process backends and a Dask coordinator's landing threads share one file.
        self._lock = threading.Lock()

    def append(self, name: str, stored: StoredResult) -> None:
        """Add one finished config's result."""
        # The keys of _META_KEYS spelled out, not looped over: this runs once per config.
        record = {
            "name": name,
            "attempt": stored.attempt,
            "end_time": stored.end_time,
            "duration_s": stored.duration_s,
            "cache_hits": stored.cache_hits,
            "cache_misses": stored.cache_misses,
            "session": stored.session,
            "fingerprint": stored.fingerprint,
            "result": stored.result,
        }
        data = f"{encode_line(record)}\n".encode()
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = open_fd(self._path, append=True)
                except FileNotFoundError:
                    os.makedirs(self._dir, exist_ok=True)
                    self._fd = open_fd(self._path, append=True)
                self._size = os.fstat(self._fd).st_size
                # A file left by a dead process with this pid may end in a cut line.
                self._torn = bool(self._size)
            if self._torn:
                data = b"\n" + data
            try:
                write_all(self._fd, data)
            except OSError:
                # A full disk: cut the part written, so that the next line starts a line.
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    self._torn = True
                raise
            self._size += len(data)
            self._torn = False
        persisted("result-write")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None


class ResultsIndex(Mapping[tuple[str, int], StoredResult]):
    """The whole results in a run's results files, by (name, attempt).

    Read incrementally: refresh() parses only the lines added since the last one, so a pool
    that breaks many times in a long run reads each line once; a result is kept as where it
    is, and parsed again when asked for.
    """

    def __init__(self, results_dir: str | os.PathLike[str]) -> None:
        self._dir = os.fspath(results_dir)
        # File name -> bytes read up to the end of its last whole line.
        self._read: dict[str, int] = {}
        # (name, attempt) -> (file name, offset, length, end time) of its newest line.
        self._where: dict[tuple[str, int], tuple[str, int, int, str]] = {}

    def refresh(self) -> ResultsIndex:
        """Take in the lines written since the last refresh."""
        if os.path.islink(self._dir):
            return self  # never read through a link (a run refuses to start on one)
        try:
            entries = [e.name for e in os.scandir(self._dir) if e.name.endswith(RESULTS_SUFFIX)]
        except (FileNotFoundError, NotADirectoryError):
            return self
        for file_name in entries:
            start = self._read.get(file_name, 0)
            data = _read_regular(os.path.join(self._dir, file_name), start)
            if data is None:
                continue
            whole = data.rfind(b"\n") + 1  # a last line without its end may be being written
            self._read[file_name] = start + whole
            offset = start
            for line in data[:whole].split(b"\n")[:-1]:
                parsed = _parse_result_line(line)
                if parsed is not None:
                    name, stored = parsed
                    key = (name, stored.attempt)
                    end_time = stored.end_time or ""
                    known = self._where.get(key)
                    # One attempt twice (a pool that broke and ran it again): the later counts.
                    if known is None or end_time >= known[3]:
                        self._where[key] = (file_name, offset, len(line), end_time)
                offset += len(line) + 1
        return self

    def __getitem__(self, key: tuple[str, int]) -> StoredResult:
        file_name, offset, length, _ = self._where[key]
        path = os.path.join(self._dir, file_name)
        data = _read_regular(path, offset, length)
        parsed = _parse_result_line(data) if data is not None else None
        if parsed is None:
            raise KeyError(key)  # the file changed under the index: no result to trust
        return parsed[1]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_results(results_dir: str | os.PathLike[str]) -> dict[tuple[str, int], StoredResult]:
    """Every whole result in the results files under results_dir, by (name, attempt)."""
    return dict(ResultsIndex(results_dir).refresh())


def _read_regular(path: str, offset: int, length: int = -1) -> bytes | None:
    """Bytes of a regular file from offset (length of them, or to the end); None for anything
    else (a link, a FIFO, a directory), which resweep neither made nor reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            return None
        raise StateError(
            f"cannot read {path}: {error.strerror}; fix its permissions, then run again"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        size = length if length >= 0 else os.fstat(fd).st_size - offset
        while size > 0:
            chunk = os.pread(fd, min(size, 1 << 24), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse_result_line(line: bytes) -> tuple[str, StoredResult] | None:
    """(name, result) from one line of a results file, or None for a cut, damaged or
    hand-made line: only what resweep writes passes."""
    if not line.strip():
        return None
    try:
        record = decode_flow(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, StateError, yaml_error()):
        return None
    if not isinstance(record, dict) or "result" not in record:
        return None
    name, attempt, result = record.get("name"), record.get("attempt"), record["result"]
    if type(name) is not str or type(attempt) is not int or attempt < 1:
        return None
    if result is not None and not isinstance(result, dict):
        return None
    texts = [record.get(key) for key in ("end_time", "session", "fingerprint")]
    counts = [record.get(key, 0) for key in ("cache_hits", "cache_misses")]
    duration_s = record.get("duration_s")
    if any(v is not None and type(v) is not str for v in texts):
        return None
    if any(type(v) is not int for v in counts):
        return None
    if duration_s is not None and type(duration_s) not in (int, float):
        return None
    end_time, session, fingerprint = texts
    hits, misses = counts
    stored = StoredResult(result, attempt, end_time, duration_s, hits, misses, session, fingerprint)
    return name, stored


def read_result(config_dir: str | os.PathLike[str]) -> StoredResult | None:
    """A result.yaml, or None when missing, unreadable or cut short.

    Earlier versions of resweep wrote one per done config, before they recorded it: a run of
    theirs that died may have left one for a config it left running.
    """
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
        make_config_dir(config_dir)
        with open_text(os.path.join(config_dir, LOG_FILE), append=True) as log:
            log.write(text)


def write_failure(
    config_dir: str | os.PathLike[str], attempt: int, end_time: str, trace: str
) -> None:
    """A failed attempt's traceback: log.txt keeps every attempt's, exception.txt the last one."""
    make_config_dir(config_dir)
    write_atomic(Path(config_dir, EXCEPTION_FILE), trace, durable=False)
    append_log(config_dir, f"--- attempt {attempt} failed, {end_time}\n{trace}")


class LazyLog(io.TextIOBase):
    """A config's log.txt, made with its directory on first write: silent configs cost no file."""

    def __init__(self, config_dir: str | os.PathLike[str], attempt: int) -> None:
        self._dir = config_dir
        self._attempt = attempt
        self._handle: TextIO | None = None
        # Why resweep could not write its own file here (a link, a full disk), kept because a
        # logging handler, or the config's own try/except, may swallow the error.
        self.fault: OSError | None = None

    def write(self, text: str) -> int:
        if not text:
            return 0
        if self._handle is None:
            try:
                make_config_dir(self._dir)
                self._handle = open_text(os.path.join(self._dir, LOG_FILE), append=True)
                # Each line reaches the file as it is printed: `status` shows a running
                # config's last.
                self._handle.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
            except OSError as error:
                if is_write_fault(error):
                    self.fault = self.fault or error
                raise
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

    def __init__(
        self, markers_dir: str | os.PathLike[str], name: str | None = None, *, locked: bool = True
    ) -> None:
        path = os.path.join(markers_dir, name or str(os.getpid()))
        self._fd = open_fd(path)
        # A thread of the coordinator needs no lock: it cannot outlive the run's own process.
        self._locked = locked

    def mark(self, name: str) -> None:
        """Say which config this process runs now ('' for none)."""
        import fcntl

        record = f"{time.time():.3f} {name}".encode()[:MARKER_BYTES]
        if name and self._locked:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.pwrite(self._fd, record.ljust(MARKER_BYTES), 0)
        if not name and self._locked:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def thread_marker_name(pid: int, thread: int) -> str:
    """The marker file of one thread of a run that runs configs in its own process."""
    return f"thread-{pid}-{thread}"


def marker_pid(file_name: str) -> tuple[str, int] | None:
    """(host, pid) of the process a marker file belongs to: '<pid>' or 'thread-<pid>-<thread>'
    here, 'dask-<host>-<pid>-<thread>'."""
    if file_name.isdigit():
        return socket.gethostname(), int(file_name)
    if file_name.startswith("thread-"):
        pid, _, thread = file_name[len("thread-") :].partition("-")
        if pid.isdigit() and thread.isdigit():
            return socket.gethostname(), int(pid)
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


# A Dask run's coordinator lists here each config a worker was heard to start, one per line:
# [name, attempt, start time] (a bare name from older versions).
STARTED_FILE = "started"


def note_started(
    markers_dir: str | os.PathLike[str], started: list[tuple[str, int]], when: float
) -> None:
    """Append configs that really started, (name, attempt) at time when: for the settling of a
    run that dies, and for `status` (Dask)."""
    data = "".join(f"{encode_line([name, attempt, when])}\n" for name, attempt in started)
    fd = open_fd(os.path.join(markers_dir, STARTED_FILE), append=True)
    try:
        write_all(fd, data.encode())
    finally:
        os.close(fd)


def read_started(markers_dir: str | os.PathLike[str]) -> dict[str, tuple[int, float]] | None:
    """The configs a Dask run heard start, name -> (attempt, start time) of the last start heard,
    or None when it was no Dask run. An older file's lines give attempt 0 and time 0."""
    try:
        text = Path(markers_dir, STARTED_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    started = {}
    for line in text.splitlines():
        with contextlib.suppress(ValueError, TypeError):
            entry = json.loads(line)
            if isinstance(entry, str):
                started[entry] = (0, 0.0)
            elif isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str):
                started[entry[0]] = (int(entry[1]), float(entry[2]))
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


def remove_worker_files(root: str | os.PathLike[str]) -> None:
    """Drop a run's markers and results files once the state holds all they tell: they are read
    when settling what a run left running, and written anew by the next run."""
    import shutil

    shutil.rmtree(os.path.join(root, WORKERS_DIR), ignore_errors=True)
    shutil.rmtree(os.path.join(root, RESULTS_DIR), ignore_errors=True)
