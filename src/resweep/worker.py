"""What a worker does: the Context a config sees, what travels to a worker, one config's run."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import io
import logging
import operator
import os
import sys
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from resweep import cache
from resweep.clock import now_iso
from resweep.durable import DISK_ERRNOS, WriteFault, fault_text, is_write_fault
from resweep.errors import ResultError, ResweepError, StorageError
from resweep.files import (
    LazyLog,
    ResultLog,
    StoredResult,
    clear_earlier_attempt,
    config_path,
    make_config_dir,
    write_failure,
)

T = TypeVar("T")
ERROR_LINE_CHARS = 500
_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


@dataclass
class Job:
    """Everything a worker needs for every config of one run; shipped once per batch."""

    function: Callable[..., Any]
    takes_ctx: bool
    output_dir: str
    shared: Any
    setup_value: Any
    per_worker: Callable[[Any], Any] | None
    cache: bool
    coordinator_pid: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Process backends only: the directory of per-worker marker files.
    markers_dir: str | None = None
    # Where each process that runs configs appends their results (files.ResultLog).
    results_dir: str | None = None
    # While this file exists the run is stopping: workers start no further config.
    stop_file: str | None = None
    # fail_fast: a config that fails for good (no retry left) makes the stop file at once.
    fail_fast: bool = False
    retries: int = 0
    # The file the function is in: code sent by value from a script says "<dynamic-code>" for
    # its file on the other side, which worker_paths puts right.
    source_file: str | None = None
    # Recorded with every done config: which run session and which code produced it.
    session: str | None = None
    fingerprint: str | None = None
    # Hooks hear each config's start: a pool that sends configs in batches says when each one
    # starts, not only when its batch does (a stop can leave the rest of a batch unstarted).
    report_starts: bool = False


@dataclass(slots=True)
class Task:
    name: str
    config: Any
    attempt: int = 0
    # Failed attempts within this run, for Experiment.retries.
    failures: int = 0

    def __reduce__(self) -> tuple[type[Task], tuple[Any, ...]]:
        # Tasks and outcomes cross to and from the workers by the thousand; the __getstate__
        # that dataclass gives a slots class runs in Python, about 2 us more per object each way.
        return (Task, _task_values(self))


@dataclass(slots=True)
class Outcome:
    name: str
    ok: bool
    result: Any
    error: str | None
    start_time: str
    end_time: str
    duration_s: float
    attempt: int
    cache_hits: int = 0
    cache_misses: int = 0
    # Set when resweep could not store this outcome (a full disk): the config stays todo.
    fault: str | None = None
    # False for a config a worker did not start because the run is stopping: still todo.
    started: bool = True
    # Where it ran, for hooks: "host:pid", and the thread for a threads pool.
    worker: str | None = None

    def __reduce__(self) -> tuple[type[Outcome], tuple[Any, ...]]:
        return (Outcome, _outcome_values(self))

    def fields(self) -> dict[str, Any]:
        """What the state records about this outcome."""
        return {
            "status": "done" if self.ok else "failed",
            "end_time": self.end_time,
            "duration_s": round(self.duration_s, 6),
            "error": self.error,
            "result": self.result,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
        }


# Every field, in order, as __init__ takes them: a field added later is pickled too.
_task_values = operator.attrgetter(*(f.name for f in dataclasses.fields(Task)))
_outcome_values = operator.attrgetter(*(f.name for f in dataclasses.fields(Outcome)))


@dataclass(frozen=True)
class WorkerSetup:
    """Expensive set-up done once per run (common) and once per worker process (per_worker)."""

    # Runs once in the main process when a run starts; returns a picklable value.
    common: Callable[[], Any] | None = None
    # Runs once in every process that runs configs, with common's value, before its first config.
    per_worker: Callable[[Any], Any] | None = None


class Context:
    """What one run of one config sees: its name, directory, shared context and logger."""

    __slots__ = ("_dir", "_fault", "_log", "_log_stream", "attempt", "config", "name", "shared")
    _dir: str | Path

    def __init__(
        self,
        *,
        name: str,
        config: Any,
        dir: str | os.PathLike[str],
        shared: Any,
        attempt: int,
        log_stream: Any,
    ) -> None:
        self.name = name
        self.config = config
        self._dir = os.fspath(dir)
        self.shared = shared
        self.attempt = attempt
        self._log_stream = log_stream
        self._log: logging.Logger | None = None
        # Why ctx.dir could not be made (a link planted there, a full disk), kept even if the
        # config catches the error: the run stops on it, not the config.
        self._fault: OSError | None = None

    @property
    def dir(self) -> Path:
        """The config's own directory, for its artifacts: made when first asked for, so a config
        that keeps nothing costs no directory."""
        if not isinstance(self._dir, Path):
            try:
                make_config_dir(self._dir)
            except OSError as error:
                if is_write_fault(error):
                    self._fault = self._fault or error
                raise
            self._dir = Path(self._dir)
        return self._dir

    @property
    def log(self) -> logging.Logger:
        """A logger whose records land in this config's log.txt."""
        if self._log is None:
            # Not from getLogger: a registered logger per config would live forever.
            logger = logging.Logger(f"resweep.{self.name}", logging.DEBUG)
            handler = logging.StreamHandler(self._log_stream)
            handler.setFormatter(logging.Formatter(_LOG_FORMAT))
            logger.addHandler(handler)
            self._log = logger
        return self._log

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call fn through this config's request cache, like a @cached function."""
        # No name here: cache.py names fn (a repr would hold a memory address).
        result: T = cache.call_cached(None, fn, args, kwargs)
        return result

    def __repr__(self) -> str:
        # The path as text: a repr (in a debugger, say) must not make the directory.
        return f"Context(name={self.name!r}, attempt={self.attempt}, dir={os.fspath(self._dir)!r})"


def takes_context(function: Callable[..., Any]) -> bool:
    """Whether function wants ctx: it accepts a second positional argument."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


_current_log: contextvars.ContextVar[io.TextIOBase | None] = contextvars.ContextVar(
    "resweep_log", default=None
)


class Router(io.TextIOBase):
    """Sends print() output to the running config's log, and elsewhere to the real stream."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def write(self, text: str) -> int:
        log = _current_log.get()
        if log is not None:
            return log.write(text)
        written: int = self.original.write(text)
        return written

    def flush(self) -> None:
        log = _current_log.get()
        (log if log is not None else self.original).flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return _current_log.get() is None and bool(self.original.isatty())

    def fileno(self) -> int:
        fileno: int = self.original.fileno()
        return fileno

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.original, "encoding", "utf-8"))


@contextlib.contextmanager
def routed_output() -> Iterator[None]:
    """Route sys.stdout and sys.stderr through the per-config log while inside."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, Router):
        sys.stdout = Router(sys.stdout)
    if not isinstance(sys.stderr, Router):
        sys.stderr = Router(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def error_line(exc: BaseException) -> str:
    """'Type: first line of the message', safe whatever the exception holds."""
    try:
        text = str(exc).strip().splitlines()
    except Exception:  # a __str__ that raises is the config's bug, not a reason to stop the run
        text = ["(its message could not be read)"]
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return _valid_text(line[:ERROR_LINE_CHARS])


def error_trace(exc: BaseException) -> str:
    """The traceback as text, safe whatever the exception holds."""
    try:
        return _valid_text("".join(traceback.format_exception(exc)))
    except Exception:
        return f"{error_line(exc)}\n(the traceback could not be formatted)\n"


def _valid_text(text: str) -> str:
    """text with any lone surrogate (from bytes decoded with os.fsdecode) escaped."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def call_config(
    job: Job,
    task: Task,
    config_dir: str | os.PathLike[str],
    log: io.TextIOBase,
    cache_dir: str | os.PathLike[str],
    stats: cache.CallStats,
    setup_error: str | None,
) -> tuple[bool, Any, str | None, str | None] | OSError:
    """Call the user's function on one config: (ok, result, error line, traceback).

    A full disk or an I/O error is returned instead: the disk failed, not the config.
    """
    ok, result, error, trace = False, None, setup_error, None
    token = _current_log.set(log)
    ctx = None
    try:
        if setup_error is None:
            ctx = Context(
                name=task.name,
                config=task.config,
                dir=config_dir,
                shared=job.shared,
                attempt=task.attempt,
                log_stream=log,
            )
            with cache.scope(cache_dir if job.cache else None, task.name, "record", stats):
                raw = job.function(task.config, ctx) if job.takes_ctx else job.function(task.config)
            result = to_plain_result(raw)
            ok = True
    except KeyboardInterrupt as exc:
        if os.getpid() == job.coordinator_pid:
            raise  # Ctrl-C, in a run of this process's own: the run stops
        # A worker process ignores Ctrl-C: a KeyboardInterrupt there is the config's own.
        error, trace = error_line(exc), error_trace(exc)
    except OSError as exc:
        # The config's own OSError is its failure, unless the disk failed or resweep's own write.
        if isinstance(exc, WriteFault) or exc.errno in DISK_ERRNOS:
            return exc
        error, trace = error_line(exc), error_trace(exc)
    except BaseException as exc:  # SystemExit too: one config's exit must not end the run
        error, trace = error_line(exc), error_trace(exc)
    finally:
        _current_log.reset(token)
    # resweep could not write under the config's directory, whatever the config did with that.
    fault = getattr(log, "fault", None) or (ctx._fault if ctx is not None else None)
    if fault is not None:
        return fault
    return ok, result, error, trace


class Marks(Protocol):
    """Where a worker process says which config it runs now (see files.Marker)."""

    def mark(self, name: str) -> None: ...


def execute(
    job: Job, task: Task, setup_error: str | None = None, marker: Marks | None = None
) -> Outcome:
    """Run one config: its result is in a results file before the coordinator hears of it."""
    start_time = now_iso()
    started = time.perf_counter()
    # A string, not a Path, and not made: ctx.dir and the log make it only when they need it.
    config_dir = config_path(job.output_dir, task.name)
    try:
        clear_earlier_attempt(config_dir)
    except OSError as exc:
        return faulted(task, start_time, exc)
    log = LazyLog(config_dir, task.attempt)
    stats = cache.CallStats()
    if marker is not None:
        marker.mark(task.name)
    try:
        try:
            call = call_config(job, task, config_dir, log, job.output_dir, stats, setup_error)
        finally:
            with contextlib.suppress(OSError):
                log.close()
        if isinstance(call, OSError):
            return faulted(task, start_time, call)
        ok, result, error, trace = call
        outcome = Outcome(
            task.name, ok, result, error, start_time, now_iso(), time.perf_counter() - started,
            task.attempt, stats.hits, stats.misses, worker=worker_id(),
        )  # fmt: skip
        try:
            if ok:
                keep_result(job, outcome)
            elif trace is not None:
                write_failure(config_dir, task.attempt, now_iso(), trace)
        except OSError as exc:
            if is_write_fault(exc):
                return faulted(task, start_time, exc)
            return unstorable(outcome, exc)
        except Exception as exc:  # a result that cannot be encoded: this config's failure alone
            return unstorable(outcome, exc)
        return outcome
    finally:
        # Idle only once the result is stored: a settled config is never half-done.
        if marker is not None:
            marker.mark("")


_result_logs: dict[str, ResultLog] = {}
_result_logs_lock = threading.Lock()


def keep_result(job: Job, outcome: Outcome) -> None:
    """Append a done outcome to this process's results file, where recovery finds it."""
    if job.results_dir is None:
        return
    log = _result_logs.get(job.token)
    if log is None:
        with _result_logs_lock:
            log = _result_logs.get(job.token)
            if log is None:
                if os.getpid() != job.coordinator_pid:
                    # A worker process runs one run at a time: a new run ends the last one's.
                    for earlier in _result_logs.values():
                        earlier.close()
                    _result_logs.clear()
                # In a run's own process (threads, Dask landing) the run closes it at its end.
                log = _result_logs[job.token] = ResultLog(job.results_dir)
    log.append(outcome.name, stored_result(job, outcome))


def close_result_log(job: Job) -> None:
    """Close this process's results file of job's run (the coordinator's, when the run ends)."""
    with _result_logs_lock:
        log = _result_logs.pop(job.token, None)
    if log is not None:
        log.close()


_host: list[str] = []


def worker_id() -> str:
    """This worker as hooks name it: "host:pid", and "/thread" outside the main thread."""
    if not _host:
        import socket

        _host.append(f"{socket.gethostname()}:")
    thread = threading.current_thread()
    where = f"{_host[0]}{os.getpid()}"
    return where if thread is threading.main_thread() else f"{where}/{thread.name}"


def stored_result(job: Job, outcome: Outcome) -> StoredResult:
    """What a results file keeps of a done outcome, for recovery: the one place that builds it."""
    return StoredResult(
        result=outcome.result,
        attempt=outcome.attempt,
        end_time=outcome.end_time,
        duration_s=outcome.duration_s,
        cache_hits=outcome.cache_hits,
        cache_misses=outcome.cache_misses,
        session=job.session,
        fingerprint=job.fingerprint,
    )


def stopping(job: Job) -> bool:
    """Whether the run asked its workers to start nothing more (the first Ctrl-C)."""
    return job.stop_file is not None and os.path.exists(job.stop_file)


def not_started(task: Task) -> Outcome:
    """The outcome of a config a worker left alone because the run is stopping."""
    now = now_iso()
    return Outcome(task.name, False, None, None, now, now, 0.0, task.attempt, started=False)


def unstorable(outcome: Outcome, error: Exception) -> Outcome:
    """The outcome of a config whose result could not be stored: failed, with why."""
    outcome.ok = False
    outcome.result = None
    outcome.error = f"cannot store the result: {error_line(error)}"
    return outcome


def storage_error(fault: str) -> StorageError:
    """The error a run stops with when resweep could not write: nothing finished is lost."""
    return StorageError(f"stopped: {fault}, then run again (every finished config is saved)")


def pickle_job(job: Job) -> bytes:
    """The job as worker processes receive it: cloudpickle, so that a script's own functions travel."""
    import cloudpickle

    try:
        blob: bytes = cloudpickle.dumps(job)
    except Exception as error:
        raise ResweepError(
            f"the experiment cannot be sent to worker processes ({error_line(error)}); "
            "make function, context and setup picklable, or use backend='threading'"
        ) from None
    return blob


_DYNAMIC_CODE = "<dynamic-code>"


def _with_filename(code: types.CodeType, path: str) -> types.CodeType:
    consts = tuple(
        _with_filename(c, path) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    return code.replace(co_filename=path, co_consts=consts)


def restore_source_paths(job: Job) -> None:
    """Give the script's functions, unpickled by value in a worker, their file back, so that a
    traceback there shows the script's path, line and source as it does in the coordinator."""
    path = job.source_file
    if path is None:
        return
    seen: set[int] = set()
    stack: list[Any] = [job.function, job.per_worker]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, types.FunctionType):
            if item.__code__.co_filename != _DYNAMIC_CODE:
                continue
            item.__code__ = _with_filename(item.__code__, path)
            # The script's other functions and classes, which the function may call.
            stack.extend(
                v for v in item.__globals__.values() if isinstance(v, type | types.FunctionType)
            )
        elif isinstance(item, type) and item.__module__ == getattr(
            job.function, "__module__", None
        ):
            stack.extend(vars(item).values())


def setup_worker(job: Job) -> str | None:
    """Run per_worker once in a process that runs configs, the same way under every backend.

    Returns the error every config of this process then fails with, or None.
    """
    with contextlib.suppress(Exception):  # a nicer traceback is not worth failing a run for
        restore_source_paths(job)
    if job.per_worker is None:
        return None
    try:
        job.per_worker(job.setup_value)
    except Exception as exc:
        return f"setup.per_worker failed: {error_line(exc)}"
    return None


def install_router() -> None:
    """Send this process's print() output to the running config's log from now on."""
    if not isinstance(sys.stdout, Router):
        sys.stdout = Router(sys.stdout)
    if not isinstance(sys.stderr, Router):
        sys.stderr = Router(sys.stderr)


def faulted(task: Task, start_time: str, error: OSError) -> Outcome:
    """An outcome that could not be stored: the coordinator stops the run, the config stays todo."""
    return Outcome(
        task.name, False, None, None, start_time, now_iso(), 0.0, task.attempt,
        fault=fault_text(error),
    )  # fmt: skip


_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any, where: str) -> Any:
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_text(value, where)
        return value
    if kind is int or kind is float or kind is bool or value is None:
        return value
    if isinstance(value, _SCALARS):
        # A subclass (an IntEnum member, a str subclass) is stored as its plain value, so the
        # state, summary.csv and show all say the same.
        plain = _plain_scalar(value)
        return _plain(plain, where) if type(plain) is str else plain
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ResultError(f"result key {where}{k!r} is not a string")
            if type(k) is not str:
                k = str.__str__(k)
            if not k.isascii():
                _check_text(k, where)
            out[k] = _plain(v, f"{where}{k}.")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where.rstrip('.')}[{i}].") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item):
        return _plain(item(), where)
    key = where.rstrip(".") or "(the result)"
    raise ResultError(
        f"result key {key!r} is a {type(value).__name__}, which is not YAML-safe; return str, "
        "int, float, bool, None, or lists and dicts of those"
    )


def _plain_scalar(value: Any) -> Any:
    """The plain str, int, float or bool with the value of a subclass instance."""
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return str.__str__(value)


def _check_text(text: str, where: str) -> None:
    """Refuse a string that is not valid Unicode (a lone surrogate, from a file name's bytes)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        key = where.rstrip(".") or "(the result)"
        raise ResultError(
            f"result key {key!r} holds {text!r}, which is not valid Unicode text (a lone "
            "surrogate, as os.fsdecode makes of bytes that are not UTF-8); decode it yourself"
        ) from None


def to_plain_result(raw: Any) -> Any:
    """The result as YAML-safe data, or a ResultError naming the offending key."""
    if raw is None:
        return None
    if not (
        isinstance(raw, Mapping) or (dataclasses.is_dataclass(raw) and not isinstance(raw, type))
    ):
        raise ResultError(
            f"the function returned a {type(raw).__name__}; return a dict, a dataclass or None"
        )
    return _plain(raw, "")
