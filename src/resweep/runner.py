"""Scheduling configs over joblib backends, and what a worker does with each config."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import hashlib
import io
import json
import operator
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resweep import cache, identity
from resweep.errors import ResultError, ResweepError, StorageError
from resweep.experiment import Context, Experiment, RunReport, select, takes_context
from resweep.store import (
    CONFIGS_DIR,
    EXCEPTION_FILE,
    LOG_FILE,
    MARKER_BYTES,
    RESULT_FILE,
    WORKERS_DIR,
    Recorder,
    State,
    Store,
    disable_crash_hook,
    encode_flow,
    now_iso,
    read_markers,
    read_result,
    recovered_fields,
    write_atomic,
    write_result,
)

if TYPE_CHECKING:
    from resweep.cluster import DaskPool

# A batch of fast configs should keep a worker busy about this long.
TARGET_BATCH_S = 0.1
MAX_BATCH_SIZE = 2000
# Group commit: outcomes reach the journal file at once (safe from a process crash) and the
# disk within this window (safe from a power cut), with one fdatasync for all of them.
SYNC_EVERY_S = 0.05
# Fold the journal into experiment.yaml at least this often while running.
COMPACT_EVERY_S = 10.0
ERROR_LINE_CHARS = 500
RUN_FAILURE_FILE = "run_failure.txt"
# Where each worker process says which config it is running (pool-break forensics, timeouts).
# How often the coordinator looks for configs that outlived timeout_s.
TIMEOUT_POLL_S = 0.1
# Dask: configs out on the cluster per worker thread (running or queued at the scheduler).
DASK_QUEUED_PER_THREAD = 8
# Dask: configs faster than this on average travel several to a task (a lost worker re-runs its
# whole batch, so slower ones go one per task). Each also costs about DASK_CONFIG_OVERHEAD_S
# outside its function: scratch directory, scratch cache, shipping back, landing.
DASK_BATCH_BELOW_S = 0.02
DASK_CONFIG_OVERHEAD_S = 0.001
# Pool breaks in a row that no config explains before the run gives up.
MAX_UNEXPLAINED_BREAKS = 3
# Errors that mean the disk, not the code, failed: the run stops cleanly, exit status 2.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT, errno.EROFS})


# -- what travels to a worker ------------------------------------------------------------


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
    # Recorded with every done config: which run session and which code produced it.
    session: str | None = None
    fingerprint: str | None = None


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


# -- worker side ---------------------------------------------------------------------------

_current_log: contextvars.ContextVar[io.TextIOBase | None] = contextvars.ContextVar(
    "resweep_log", default=None
)


class _LazyLog(io.TextIOBase):
    """A config's log.txt, opened on first write so that silent configs cost no file."""

    def __init__(self, path: str | os.PathLike[str], attempt: int) -> None:
        self._path = path
        self._attempt = attempt
        self._handle: io.TextIOWrapper | None = None

    def write(self, text: str) -> int:
        if not text:
            return 0
        if self._handle is None:
            self._handle = open(self._path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (closed by close())
            self._handle.write(f"--- attempt {self._attempt}, {now_iso()}, pid {os.getpid()}\n")
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


class _Router(io.TextIOBase):
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
    if not isinstance(sys.stdout, _Router):
        sys.stdout = _Router(sys.stdout)
    if not isinstance(sys.stderr, _Router):
        sys.stderr = _Router(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


_jobs: dict[str, Job] = {}
_setup_errors: dict[str, str | None] = {}
_prepare_lock = threading.Lock()
_marker_fd: int | None = None


# How often a worker process checks that its coordinator is still alive.
ORPHAN_CHECK_S = 1.0
_watching: list[int] = []


def _watch_coordinator(coordinator_pid: int) -> None:
    """End this worker soon after its coordinator dies: nobody could record what it does next."""
    if coordinator_pid in _watching:
        return
    _watching.append(coordinator_pid)

    def watch() -> None:
        while os.getppid() == coordinator_pid:
            time.sleep(ORPHAN_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="resweep-orphan-check", daemon=True).start()


def _mark(name: str) -> None:
    """Tell the coordinator which config this worker process runs now ('' for none)."""
    if _marker_fd is not None:
        record = f"{time.time():.3f} {name}".encode()[:MARKER_BYTES]
        os.pwrite(_marker_fd, record.ljust(MARKER_BYTES), 0)


def _prepare(payload: tuple[str, Any]) -> Job:
    """This process's Job, unpickled and set up once per run, however many batches arrive."""
    token, blob = payload
    job = _jobs.get(token)
    if job is not None:
        return job
    with _prepare_lock:
        job = _jobs.get(token)
        if job is not None:
            return job
        if isinstance(blob, bytes):
            import pickle

            job = pickle.loads(blob)
        else:
            job = blob
        assert isinstance(job, Job)
        if os.getpid() != job.coordinator_pid:
            # Ctrl-C belongs to the coordinator, which lets running configs finish.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            disable_crash_hook()
            if not isinstance(sys.stdout, _Router):
                sys.stdout = _Router(sys.stdout)
                sys.stderr = _Router(sys.stderr)
            if job.markers_dir is not None:
                _watch_coordinator(job.coordinator_pid)
                global _marker_fd
                if _marker_fd is not None:
                    os.close(_marker_fd)
                path = os.path.join(job.markers_dir, str(os.getpid()))
                _marker_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        error = None
        if job.per_worker is not None:
            try:
                job.per_worker(job.setup_value)
            except Exception as exc:
                error = f"setup.per_worker failed: {_error_line(exc)}"
        _setup_errors[token] = error
        _jobs.clear()  # one run at a time per process; drop the previous run's job
        _jobs[token] = job
        return job


def run_batch(payload: tuple[str, Any], tasks: list[Task]) -> list[Outcome]:
    """Run a batch of configs in this worker, each isolated from the others' failures."""
    job = _prepare(payload)
    setup_error = _setup_errors.get(payload[0])
    outcomes = []
    for task in tasks:
        if job.markers_dir is not None and os.getppid() != job.coordinator_pid:
            os._exit(0)  # the coordinator died: start nothing it cannot record
        outcomes.append(execute(job, task, setup_error))
    return outcomes


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[:ERROR_LINE_CHARS]


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
    except KeyboardInterrupt:
        raise
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            return exc
        error = _error_line(exc)
        trace = "".join(traceback.format_exception(exc))
    except BaseException as exc:  # SystemExit too: one config's exit must not end the run
        error = _error_line(exc)
        trace = "".join(traceback.format_exception(exc))
    finally:
        _current_log.reset(token)
    return ok, result, error, trace


def execute(job: Job, task: Task, setup_error: str | None = None) -> Outcome:
    """Run one config: its result file is written before the coordinator hears of it."""
    start_time = now_iso()
    started = time.perf_counter()
    # A string, not a Path: ctx.dir becomes one only if the function asks for it.
    config_dir = f"{job.output_dir}{os.sep}{CONFIGS_DIR}{os.sep}{task.name}"
    try:
        try:
            os.mkdir(config_dir)
        except FileExistsError:
            # Only a directory that was there can hold files of an earlier attempt.
            for stale in (RESULT_FILE, EXCEPTION_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(config_dir, stale))
        except FileNotFoundError:
            os.makedirs(config_dir, exist_ok=True)
    except OSError as exc:
        return _faulted(task, start_time, exc)
    log = _LazyLog(os.path.join(config_dir, LOG_FILE), task.attempt)
    stats = cache.CallStats()
    _mark(task.name)
    try:
        call = call_config(job, task, config_dir, log, job.output_dir, stats, setup_error)
    finally:
        with contextlib.suppress(OSError):
            log.close()
    if isinstance(call, OSError):
        _mark("")
        return _faulted(task, start_time, call)
    ok, result, error, trace = call
    duration_s = time.perf_counter() - started
    outcome = Outcome(
        task.name, ok, result, error, start_time, now_iso(), duration_s, task.attempt,
        stats.hits, stats.misses,
    )  # fmt: skip
    try:
        if ok:
            meta = {"attempt": task.attempt, "end_time": outcome.end_time, "duration_s": duration_s}
            meta.update(cache_hits=stats.hits, cache_misses=stats.misses)
            meta.update(session=job.session, fingerprint=job.fingerprint)
            write_result(config_dir, result, meta)
        elif trace is not None:
            write_atomic(Path(config_dir, EXCEPTION_FILE), trace, durable=False)
            # log.txt keeps every attempt's traceback; exception.txt only the last one.
            with open(os.path.join(config_dir, LOG_FILE), "a", encoding="utf-8") as handle:
                handle.write(f"--- attempt {task.attempt} failed, {now_iso()}\n{trace}")
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        return _faulted(task, start_time, exc)
    finally:
        # Idle only once the result is stored: a settled config is never half-done.
        _mark("")
    return outcome


def _faulted(task: Task, start_time: str, error: OSError) -> Outcome:
    """An outcome that could not be stored: the coordinator stops the run, the config stays todo."""
    fault = f"{os.strerror(error.errno or 0)} while writing {error.filename or 'a file'}"
    return Outcome(
        task.name, False, None, None, start_time, now_iso(), 0.0, task.attempt, fault=fault
    )


_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ResultError(f"result key {where}{k!r} is not a string")
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


# -- coordinator side ----------------------------------------------------------------------


class _Stop:
    """What the signal handlers asked for: a graceful stop, then a hard one."""

    def __init__(self, *, raise_on_hard: bool) -> None:
        self.requested = False
        self.hard = False
        self.signal_name: str | None = None
        # In-process runs have no workers to kill: a hard stop interrupts the config itself.
        self.raise_on_hard = raise_on_hard
        self.critical = 0
        self.hard_pending = False

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested or signum == signal.SIGTERM:
            self.requested = self.hard = True
            self.signal_name = name if signum == signal.SIGTERM else (self.signal_name or name)
            if self.raise_on_hard:
                if self.critical:
                    self.hard_pending = True  # raised once the state is consistent again
                else:
                    raise KeyboardInterrupt
            return
        self.requested = True
        self.signal_name = name
        print(
            "\nresweep: stopping once the running configs finish; Ctrl-C again to stop at once",
            file=sys.__stderr__,
            flush=True,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        saved = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def critical_section(self) -> Iterator[None]:
        self.critical += 1
        try:
            yield
        finally:
            self.critical -= 1
            if not self.critical and self.hard_pending:
                self.hard_pending = False
                raise KeyboardInterrupt


class _InlineExecutor:
    """The sequential backend: each batch runs in this process when submitted (for debugging)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        return None


def _worker_started() -> None:
    """A loky worker's initializer: unpickling it imports this module while the coordinator
    still prepares the run."""


# Set by the command line, whose process ends when the run does: the threads shutting down the
# pools it let go, which it joins before it returns.
_released_pools: contextvars.ContextVar[list[threading.Thread] | None] = contextvars.ContextVar(
    "resweep_released_pools", default=None
)


@contextlib.contextmanager
def pool_released_at_end() -> Iterator[None]:
    """Within it, a run that finishes cleanly lets its worker pool go at once, rather than keep
    it warm for a next run in the same process: the workers exit during the final writes. The
    pool is fully shut down when the block ends, whether the rest of the run went well or not."""
    released: list[threading.Thread] = []
    token = _released_pools.set(released)
    try:
        yield
    finally:
        _released_pools.reset(token)
        for shutting_down in released:
            shutting_down.join()


def _release(executor: Any, released: list[threading.Thread]) -> None:
    """Shut a pool down in the background, for pool_released_at_end to join."""
    thread = threading.Thread(target=executor.shutdown, name="resweep-pool-release")
    thread.start()
    released.append(thread)


def _executor(backend: str, max_workers: int) -> Any:
    """A concurrent.futures executor for the backend."""
    if backend == "sequential":
        return _InlineExecutor()
    if backend == "threading":
        return ThreadPoolExecutor(max_workers, thread_name_prefix="resweep")
    # joblib's process pool, imported on its own: the joblib package would import numpy into this
    # process and every worker. Unlike joblib.Parallel(n_jobs=1) it keeps one worker out of process.
    from loky import get_reusable_executor

    return get_reusable_executor(max_workers=max_workers, initializer=_worker_started)


def _shut_down(executor: Any, *, kill: bool) -> None:
    """Stop a pool; with kill, running configs are stopped too where the backend can."""
    with contextlib.suppress(Exception):
        if isinstance(executor, ThreadPoolExecutor):
            # Threads cannot be killed: queued batches are dropped, running ones finish.
            executor.shutdown(wait=True, cancel_futures=kill)
        elif kill:
            # wait=True: the workers are dead before anything is settled.
            executor.shutdown(wait=True, kill_workers=True)


def _progress_bar() -> Any:
    """tqdm's bar class, a notebook widget under Jupyter: tqdm.auto's choice without the asyncio
    import it adds, about 30 ms of every run's start."""
    from tqdm.std import TqdmExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmExperimentalWarning)
        from tqdm.autonotebook import tqdm
    return tqdm


def _death_reason(error: BaseException) -> str:
    """'worker died: SIGSEGV' from loky's report of the dead worker's exit code."""
    match = re.search(r"exit codes of the workers are \{([^}]*)\}", str(error))
    codes = match.group(1) if match else ""
    signals = re.findall(r"(SIG[A-Z0-9]+)", codes)
    if signals:
        return f"worker died: {signals[0]}"
    numbers = re.findall(r"-?\d+", codes)
    return f"worker died: exit code {numbers[0]}" if numbers else "worker died"


class _Scheduler:
    """Feeds batches of configs to a pool and records every outcome as it arrives."""

    def __init__(
        self,
        job: Job,
        tasks: list[Task],
        recorder: Recorder,
        *,
        backend: str,
        max_workers: int,
        retries: int,
        progress: bool,
        timeout_s: float | None = None,
        pool: DaskPool | None = None,
    ) -> None:
        self.job = job
        self.pending: deque[Task] = deque(tasks)
        # Configs that were running when a worker died: each re-runs alone to find the culprit.
        self.suspects: deque[Task] = deque()
        self.in_flight: dict[str, Task] = {}
        self.futures: dict[Future[Any], list[Task]] = {}
        self.recorder = recorder
        self.backend = backend
        self.n_workers = 1 if backend == "sequential" else max_workers
        self.retries = retries
        self.timeout_s = timeout_s
        self.stop = _Stop(raise_on_hard=backend == "sequential")
        self.mean_config_s: float | None = None
        self.executed = 0
        self.done = 0
        self.failed = 0
        self.interrupted = 0
        self.fault: str | None = None
        self.timed_out: set[str] = set()
        self.unexplained_breaks = 0
        self.last_compaction = time.monotonic()
        self.compaction_s = 0.0
        self.last_sync = 0.0
        self.unsynced = False
        self.markers_dir = Path(job.markers_dir) if job.markers_dir else None
        # The Dask backend: a cluster whose size may change while the run goes on.
        self.pool = pool
        self.max_workers = max_workers
        self.queue_dropped = False
        if backend in ("loky", "dask"):
            import cloudpickle

            try:
                blob = cloudpickle.dumps(job)
            except Exception as error:
                raise ResweepError(
                    f"the experiment cannot be sent to worker processes ({_error_line(error)}); "
                    "make function, context and setup picklable, or use backend='threading'"
                ) from None
            self.payload: tuple[str, Any] = (job.token, blob)
        else:
            self.payload = (job.token, job)
        if pool is not None:
            pool.start(job, blob, report_starts=timeout_s is not None)
        self.bar = _progress_bar()(
            total=len(tasks),
            disable=not progress,
            unit="config",
            dynamic_ncols=True,
            file=sys.__stderr__,
            smoothing=0.05,
        )
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"done={self.done} failed={self.failed}", refresh=False)

    def _batch_size(self) -> int:
        if self.mean_config_s is None:
            return 1
        if self.pool is not None:
            # A lost Dask worker re-runs its batch: a slow config is its own task.
            if self.mean_config_s >= DASK_BATCH_BELOW_S:
                return 1
            per_config = self.mean_config_s + DASK_CONFIG_OVERHEAD_S
        else:
            # Per-config overhead outside the function: directory, result file, journal line.
            per_config = self.mean_config_s + 50e-6
        size = int(TARGET_BATCH_S / per_config)
        balance = len(self.pending) // (4 * self.n_workers)
        return max(1, min(size, balance, MAX_BATCH_SIZE))

    def _start(self, batch: list[Task]) -> None:
        """Record a batch as running before any of it can run."""
        start_time = now_iso()
        configs = self.recorder.state.configs
        by_attempt: dict[int, list[str]] = {}
        for task in batch:
            task.attempt = configs[task.name]["attempts"] + 1
            by_attempt.setdefault(task.attempt, []).append(task.name)
            self.in_flight[task.name] = task
        for attempt, names in by_attempt.items():
            fields = {"status": "running", "attempts": attempt, "start_time": start_time}
            fields["end_time"] = None
            self.recorder.update_same(names, fields)
        # Written, not yet synced: a crash now still shows these configs as running.
        self.recorder.write(sync=False)

    def _dispatch(self, executor: Any) -> None:
        """Keep every worker busy with one batch and one more queued; a suspect runs alone."""
        if self.stop.requested or self.fault is not None:
            return
        if self.pool is not None:
            self._dispatch_dask()
            return
        if self.suspects:
            if not self.futures:
                batch = [self.suspects.popleft()]
                self._start(batch)
                self.futures[self._submit(executor, batch)] = batch
            return
        while self.pending and len(self.futures) < self._window():
            size = self._batch_size()
            batch = [self.pending.popleft() for _ in range(min(size, len(self.pending)))]
            self._start(batch)
            self.futures[self._submit(executor, batch)] = batch
            if self.stop.requested:
                return

    def _dispatch_dask(self) -> None:
        """Dask: fill the window with batches, sent together; a suspect travels alone."""
        assert self.pool is not None
        batches: list[list[Task]] = []
        while (self.suspects or self.pending) and len(self.futures) + len(batches) < self._window():
            if self.suspects:
                # One config of a batch that killed its workers: only running alone tells which.
                batches.append([self.suspects.popleft()])
                continue
            size = self._batch_size()
            batches.append([self.pending.popleft() for _ in range(min(size, len(self.pending)))])
        if not batches:
            return
        for batch in batches:
            self._start(batch)
        for future, batch in zip(self.pool.submit(batches), batches, strict=True):
            self.futures[future] = batch

    def _window(self) -> int:
        """How many batches may be out at once: one running and one queued per worker."""
        if self.pool is not None:
            # A Dask result crosses the network twice; more configs queued hide that delay.
            return DASK_QUEUED_PER_THREAD * self.n_workers
        return 2 * self.n_workers

    def _submit(self, executor: Any, batch: list[Task]) -> Future[Any]:
        future: Future[Any] = executor.submit(run_batch, self.payload, batch)
        return future

    def _finish(self, task: Task, fields: dict[str, Any], *, ok: bool) -> None:
        """Record one config's end; a failure with retries left goes back to the queue."""
        fields["session"] = self.job.session
        if ok:
            fields["fingerprint"] = self.job.fingerprint
            self.done += 1
        elif task.failures < self.retries:
            task.failures += 1
            fields["status"] = "todo"
            self.pending.append(task)
            self.bar.total += 1
        else:
            fields["status"] = "failed"
            self.failed += 1
        self.recorder.update(task.name, fields)

    def _absorb(self, outcomes: list[Outcome]) -> None:
        with self.stop.critical_section():
            for outcome in outcomes:
                task = self.in_flight.pop(outcome.name)
                if outcome.fault is not None:
                    # Nothing of this attempt is stored: it is todo, and the run stops.
                    self.fault = self.fault or outcome.fault
                    self.recorder.update(outcome.name, {"status": "todo"})
                    continue
                self.executed += 1
                self._finish(task, outcome.fields(), ok=outcome.ok)
            self._commit()
            durations = [o.duration_s for o in outcomes]
            mean = sum(durations) / len(durations)
            self.mean_config_s = (
                mean if self.mean_config_s is None else 0.7 * self.mean_config_s + 0.3 * mean
            )
            self.bar.update(len(outcomes))
            self._postfix()

    def _commit(self, *, force: bool = False) -> None:
        """Write journaled changes now; sync them unless the last sync is under SYNC_EVERY_S old."""
        now = time.monotonic()
        sync = force or now - self.last_sync >= SYNC_EVERY_S
        self.recorder.write(sync=sync)
        if sync:
            self.last_sync = now
        self.unsynced = not sync

    def _maybe_compact(self) -> None:
        if time.monotonic() - self.last_compaction > max(COMPACT_EVERY_S, 20 * self.compaction_s):
            started = time.monotonic()
            self.recorder.compact()
            self.last_compaction = time.monotonic()
            self.compaction_s = self.last_compaction - started

    def _enforce_timeouts(self) -> None:
        """Kill the worker of any config running longer than timeout_s; the pool break follows."""
        if self.timeout_s is None or self.markers_dir is None:
            return
        now = time.time()
        for name, (pid, started) in read_markers(self.markers_dir).items():
            if name in self.in_flight and now - started > self.timeout_s:
                self.timed_out.add(name)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def _after_break(self, error: BaseException) -> None:
        """A worker died and took the pool with it: settle every config that was in flight."""
        running = read_markers(self.markers_dir) if self.markers_dir else {}
        lost = [task for batch in self.futures.values() for task in batch]
        self.futures.clear()
        executing = [task for task in lost if task.name in running]
        timeouts = bool(self.timed_out)
        # Without a timeout to explain it, the death is a config's when that config ran alone.
        culprit = None
        if not timeouts and len(lost) == 1:
            culprit = lost[0].name
        elif not timeouts and len(executing) == 1:
            culprit = executing[0].name
        store = Store(self.job.output_dir)
        for task in lost:
            self.in_flight.pop(task.name, None)
            found = read_result(store.config_dir(task.name))
            if found is not None and found[1].get("attempt") == task.attempt:
                self.recorder.update(task.name, recovered_fields(*found))
                self.executed += 1
                self.done += 1
                self.bar.update(1)
            elif task.name in self.timed_out or task.name == culprit:
                self.executed += 1
                self.bar.update(1)
                reason = (
                    f"timeout: ran longer than timeout_s={self.timeout_s:g}"
                    if task.name in self.timed_out
                    else _death_reason(error)
                )
                self._finish(task, {"error": reason, "end_time": now_iso()}, ok=False)
            elif task.name in running and not timeouts:
                self.recorder.update(task.name, {"status": "todo"})
                self.suspects.append(task)
            else:  # queued behind the dead worker, or killed with it: simply run again
                self.recorder.update(task.name, {"status": "todo"})
                self.pending.appendleft(task)
        explained = timeouts or culprit is not None or bool(executing)
        self.timed_out.clear()
        self.recorder.write(sync=True)
        self._postfix()
        if self.markers_dir is not None:
            for entry in os.scandir(self.markers_dir):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        self.unexplained_breaks = 0 if explained else self.unexplained_breaks + 1
        if self.unexplained_breaks >= MAX_UNEXPLAINED_BREAKS:
            raise ResweepError(
                f"worker processes died {MAX_UNEXPLAINED_BREAKS} times outside any config "
                f"({_death_reason(error)}); check setup.per_worker and the machine's memory"
            )

    def _collect(self, finished: set[Future[Any]]) -> None:
        """Dask: record every config that came back, in one group commit."""
        assert self.pool is not None
        outcomes, alone = self.pool.collect([(f, self.futures.pop(f)) for f in finished])
        for task in alone:
            # Its batch killed every worker it ran on: the same attempt runs again, alone.
            del self.in_flight[task.name]
            self.recorder.update(task.name, {"status": "todo", "attempts": task.attempt - 1})
            self.suspects.append(task)
        # Only the first outcome of an attempt counts; one task per batch makes that the only one.
        outcomes = [o for o in outcomes if self._current(o)]
        if outcomes:
            self._absorb(outcomes)
        elif alone:
            self.recorder.write(sync=False)

    def _current(self, outcome: Outcome) -> bool:
        task = self.in_flight.get(outcome.name)
        return task is not None and task.attempt == outcome.attempt

    def _drop(self, future: Future[Any]) -> list[Task]:
        """Take a Dask task off the cluster; its configs are no longer in flight."""
        assert self.pool is not None
        batch = self.futures.pop(future)
        self.pool.cancel(future)
        for task in batch:
            del self.in_flight[task.name]
        return batch

    def _watch_pool(self) -> None:
        """Dask: the scheduler is still there, a stop drops queued configs, overdue ones end."""
        pool = self.pool
        assert pool is not None
        if not pool.alive():
            raise pool.lost()
        self.n_workers = max(self.max_workers, pool.slots())
        if self.stop.requested and not self.queue_dropped:
            # Configs no worker has started do not hold the stop up; this attempt did not happen.
            self.queue_dropped = True
            for future in pool.unstarted(list(self.futures)):
                for task in self._drop(future):
                    self.recorder.update(
                        task.name, {"status": "todo", "attempts": task.attempt - 1}
                    )
            self.recorder.write(sync=True)
        if self.timeout_s is None:
            return
        by_name = {task.name: future for future, batch in self.futures.items() for task in batch}
        stuck = []
        for name, worker in pool.overdue(self.in_flight, self.timeout_s):
            future = by_name[name]
            if future not in self.futures:
                continue
            for task in self._drop(future):
                if task.name != name:
                    # The rest of its batch: outcomes lost with the task, the same attempt again.
                    self.recorder.update(
                        task.name, {"status": "todo", "attempts": task.attempt - 1}
                    )
                    self.pending.appendleft(task)
                    continue
                self.executed += 1
                self.bar.update(1)
                reason = f"timeout: ran longer than timeout_s={self.timeout_s:g}"
                self._finish(task, {"error": reason, "end_time": now_iso()}, ok=False)
            stuck.append(worker)
        if stuck:
            self.recorder.write(sync=True)
            self._postfix()
            # Code blocked in C cannot be interrupted: its worker process is restarted instead.
            pool.restart(stuck)

    def run(self) -> None:
        from concurrent.futures.process import BrokenProcessPool

        executor = None
        ended = False  # the loop ran out of work, with no exception on its way out
        with self.stop.installed():
            try:
                executor = self.pool or _executor(self.backend, self.n_workers)
                while not self.stop.hard:
                    self._dispatch(executor)
                    if not self.futures:
                        break
                    finished, _ = wait(
                        list(self.futures),
                        timeout=SYNC_EVERY_S if self.unsynced else TIMEOUT_POLL_S,
                        return_when=FIRST_COMPLETED,
                    )
                    try:
                        if self.pool is not None:
                            self._collect(finished)
                        else:
                            for future in finished:
                                outcomes = future.result()
                                del self.futures[future]
                                self._absorb(outcomes)
                    except BrokenProcessPool as error:
                        if self.stop.requested:
                            break  # SIGTERM reached the workers too: this is the stop
                        self._after_break(error)
                        executor = _executor(self.backend, self.n_workers)
                    if self.unsynced:
                        self._commit()
                    self._enforce_timeouts()
                    if self.pool is not None:
                        self._watch_pool()
                    self._maybe_compact()
                ended = True
            except KeyboardInterrupt:
                self.stop.requested = self.stop.hard = True
                self.stop.signal_name = self.stop.signal_name or "SIGINT"
            finally:
                if executor is not None:
                    # Work still in flight means a hard stop or an error: stop it before settling,
                    # so that nothing finishes after it was recorded as todo.
                    _shut_down(executor, kill=bool(self.futures) or self.stop.hard)
                    released = _released_pools.get()
                    if (
                        ended
                        and released is not None
                        and self.backend == "loky"
                        and self._finished_cleanly()
                    ):
                        # The process ends with this run: the workers exit while the state and
                        # the summary are written, instead of after them.
                        _release(executor, released)
                self.bar.close()
                self._settle_in_flight()
        if self.fault is not None:
            raise StorageError(
                f"stopped: {self.fault}; free space or fix the disk, then run again "
                "(every finished config is saved)"
            )

    def _finished_cleanly(self) -> bool:
        """Every config ran and was recorded: no stop, no storage fault, nothing in flight."""
        return not (self.futures or self.pending or self.suspects) and not (
            self.fault is not None or self.stop.requested
        )

    def _settle_in_flight(self) -> None:
        """Configs cut off by a stop: done if their result file made it, else todo again."""
        store = Store(self.job.output_dir)
        self.futures.clear()
        executing = read_markers(self.markers_dir) if self.markers_dir is not None else {}
        for name, task in list(self.in_flight.items()):
            found = read_result(store.config_dir(name))
            if found is not None and found[1].get("attempt") == task.attempt:
                self.recorder.update(name, recovered_fields(*found))
                self.done += 1
            elif self.markers_dir is not None and name not in executing:
                # Queued behind a busy worker, never started: this attempt did not happen.
                self.recorder.update(name, {"status": "todo", "attempts": task.attempt - 1})
            else:
                self.recorder.update(name, {"status": "todo", "end_time": now_iso()})
                self.interrupted += 1
        self.in_flight.clear()


def _merge(
    state: State, experiment: Experiment, named: dict[str, tuple[Any, dict[str, Any]]]
) -> bool:
    """Add configs that are new as todo; an existing name must not change its params.

    Returns whether the state changed.
    """
    from resweep.errors import ConfigError

    changed_state = False
    for key in ("name", "description"):
        value = getattr(experiment, key)
        if value is not None and getattr(state, key) != value:
            setattr(state, key, value)
            changed_state = True
    for name, (_, params) in named.items():
        record = state.configs.get(name)
        if record is None:
            state.configs[name] = {
                "params": params,
                "status": "todo",
                "attempts": 0,
                "start_time": None,
                "end_time": None,
            }
            changed_state = True
            continue
        stored = record["params"]
        if stored == params:
            continue
        # Fields added (with a default) or removed since keep the identity; a changed value does not.
        changed = _changed_params(stored, params)
        if changed:
            key, old, new = changed[0]
            raise ConfigError(
                f"config name {name!r} is stored with {key}={old!r}, but now has {key}={new!r}; "
                "config_naming must give different configs different names"
            )
        if json.dumps(record["params"], sort_keys=True) != json.dumps(params, sort_keys=True):
            record["params"] = params
            changed_state = True
    return changed_state


def _changed_params(
    stored: dict[str, Any], params: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """The (dotted) keys both sides have with different values; nested dicts may grow fields."""
    changed = []
    for key in stored.keys() & params.keys():
        old, new = stored[key], params[key]
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_params(old, new, f"{prefix}{key}.")
        elif not _same_param(old, new):
            changed.append((f"{prefix}{key}", old, new))
    return changed


def _same_param(old: Any, new: Any) -> bool:
    """Python's equality, except that NaN equals NaN: a NaN param is still the same config."""
    if isinstance(old, float) and isinstance(new, float) and old != old and new != new:
        return True
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(map(_same_param, old, new))
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same_param(old[k], new[k]) for k in old)
    return bool(old == new)


@dataclass
class Plan:
    """What a run would do: the configs it would run, by why, and those it would leave."""

    new: list[str]
    todo: list[str]
    failed: list[str]
    changed: list[str]
    done: int
    skipped_failed: int
    running: list[str]

    @property
    def to_run(self) -> list[str]:
        return [*self.new, *self.todo, *self.failed, *self.changed]

    def describe(self, *, names: bool = True) -> str:
        lines = [
            f"would run {len(self.to_run)} configs: {len(self.new)} new, {len(self.todo)} todo, "
            f"{len(self.failed)} failed, {len(self.changed)} done but changed; "
            f"would leave {self.done} done"
            + (
                f" and {self.skipped_failed} failed (add --retry-failed)"
                if self.skipped_failed
                else ""
            )
        ]
        if self.running:
            lines.append(f"{len(self.running)} are marked running by another or a stopped run")
        if names:
            for label, group in (("new", self.new), ("todo", self.todo), ("failed", self.failed)):
                lines += [f"  {label:7} {n}" for n in group]
            lines += [f"  changed {n}" for n in self.changed]
        return "\n".join(lines)


def plan(
    state: State,
    named: dict[str, tuple[Any, dict[str, Any]]],
    *,
    retry_failed: bool,
    only: str | None,
    rerun_changed: bool,
    fingerprint: str | None,
) -> Plan:
    """Decide which configs a run takes; reads the state, changes nothing."""
    from resweep import provenance

    result = Plan([], [], [], [], 0, 0, [])
    for name in select(list(named), only):
        record = state.configs.get(name)
        status = record["status"] if record is not None else None
        if record is None:
            result.new.append(name)
        elif status in ("todo", "running"):
            # A config left running by a dead run is todo again (or done, once settled).
            result.todo.append(name)
            if status == "running":
                result.running.append(name)
        elif status == "failed":
            if retry_failed:
                result.failed.append(name)
            else:
                result.skipped_failed += 1
        elif (
            rerun_changed
            and fingerprint is not None
            and provenance.compare(record.get("fingerprint"), fingerprint) is not None
        ):
            # A fingerprint that cannot be compared (an unknown format) is not a change.
            result.changed.append(name)
        else:
            result.done += 1
    return result


def finished_key(experiment: Experiment) -> str | None:
    """What a finished sweep's marker must match: its configs, default names, name, description.

    None when the configs come from the state file or from config_naming, which no digest
    of the configs can vouch for.
    """
    configs = experiment.configs
    if not isinstance(configs, Sequence) or experiment.config_naming is not None:
        return None
    digest = identity.configs_digest(configs)
    if digest is None:
        return None
    about = encode_flow([experiment.name, experiment.description])
    return f"{digest}.{hashlib.sha256(about.encode()).hexdigest()[:16]}"


def run_experiment(
    experiment: Experiment,
    named: dict[str, tuple[Any, dict[str, Any]]] | None,
    *,
    max_workers: int,
    retry_failed: bool,
    backend: str,
    only: str | None,
    fresh: bool,
    progress: bool,
    break_lock: bool,
    scheduler: str | None,
    rerun_changed: bool = False,
    finished: str | None = None,
) -> RunReport:
    """One run: take the lock, bring the state up to date, run what is pending, compact.

    named None: name the configs only if the finished marker does not match `finished`, the
    key the caller got from finished_key.
    """
    if backend == "dask":
        import importlib.util

        if importlib.util.find_spec("distributed") is None:
            raise ResweepError(
                "the dask backend needs Dask, which is not installed: pip install 'resweep[dask]'"
            )
    elif scheduler is not None:
        raise ResweepError(
            f"a scheduler address is for the dask backend, not {backend!r}; "
            "add --backend dask (backend='dask')"
        )
    if experiment.timeout_s is not None and backend not in ("loky", "dask"):
        warnings.warn(
            f"timeout_s is enforced by killing worker processes; backend {backend!r} runs configs "
            "in this process, so they run without a time limit",
            stacklevel=3,
        )
    store = experiment.store
    try:
        store.ensure_dir()
        with store.lock(break_lock=break_lock):
            if finished is not None and only is None and not rerun_changed:
                counts = store.finished_counts(finished)
                if counts is not None and not (retry_failed and counts["failed"]):
                    # The sweep this state finished is unchanged: nothing to name, read or run.
                    return RunReport(
                        done=counts["done"],
                        failed=counts["failed"],
                        todo=counts["todo"] + counts["running"],
                        interrupted=0,
                    )
            if named is None:
                named = experiment.named_configs()
            return _run_locked(
                experiment,
                named,
                store,
                max_workers=max_workers,
                retry_failed=retry_failed,
                backend=backend,
                only=only,
                fresh=fresh,
                progress=progress,
                rerun_changed=rerun_changed,
                scheduler_address=scheduler,
                finished=finished,
            )
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS:
            raise
        where = f" while writing {error.filename}" if error.filename else ""
        raise StorageError(
            f"stopped: {os.strerror(error.errno or 0)}{where}; free space or fix the disk, then "
            "run again (every finished config is saved)"
        ) from None


def _run_locked(
    experiment: Experiment,
    named: dict[str, tuple[Any, dict[str, Any]]],
    store: Store,
    *,
    max_workers: int,
    retry_failed: bool,
    backend: str,
    only: str | None,
    fresh: bool,
    progress: bool,
    rerun_changed: bool,
    scheduler_address: str | None = None,
    finished: str | None = None,
) -> RunReport:
    from resweep import provenance

    existed = store.exists()
    state = store.read() if existed else State()
    dirty = _merge(state, experiment, named) or not existed
    dirty = bool(store.settle_interrupted(state, count=True)) or dirty
    # A journal on disk means the last run did not end cleanly: fold it in now.
    dirty = dirty or store.journal_path.exists()
    fingerprint = provenance.fingerprint(experiment.function)
    names = plan(
        state,
        named,
        retry_failed=retry_failed,
        only=only,
        rerun_changed=rerun_changed,
        fingerprint=fingerprint,
    ).to_run
    with contextlib.suppress(FileNotFoundError):
        (store.root / RUN_FAILURE_FILE).unlink()
    scheduler = None
    if not names:
        if dirty:  # nothing to run and nothing new: a resume of a finished sweep writes nothing
            store.compact(state)
    else:
        store.forget_finished()
        if backend == "loky":
            # Start the workers now: they import Python and resweep while this process records
            # the session and compacts the state.
            _executor(backend, max_workers).submit(_worker_started)
        session, session_record = provenance.new_session(
            experiment.function, backend=backend, max_workers=max_workers
        )
        state.sessions[session] = session_record
        store.compact(state)
        if fresh:
            cache.drop(store.root, names)
        setup = experiment.setup
        setup_value = setup.common() if setup is not None and setup.common else None
        # The last run's markers were read when settling; this run's workers write anew.
        shutil.rmtree(store.root / WORKERS_DIR, ignore_errors=True)
        markers_dir = None
        if backend == "loky":
            markers_dir = store.root / WORKERS_DIR
            markers_dir.mkdir()
        job = Job(
            function=experiment.function,
            takes_ctx=takes_context(experiment.function),
            output_dir=str(store.root),
            shared=experiment.context,
            setup_value=setup_value,
            per_worker=setup.per_worker if setup is not None else None,
            cache=experiment.cache,
            coordinator_pid=os.getpid(),
            markers_dir=str(markers_dir) if markers_dir else None,
            session=session,
            fingerprint=fingerprint,
        )
        recorder = Recorder(store, state)
        pool = None
        try:
            if backend == "dask":
                from resweep.cluster import DaskPool

                pool = DaskPool.connect(scheduler_address, max_workers)
            scheduler = _Scheduler(
                job,
                [Task(n, named[n][0]) for n in names],
                recorder,
                backend=backend,
                max_workers=max_workers,
                retries=experiment.retries,
                progress=progress,
                timeout_s=experiment.timeout_s,
                pool=pool,
            )
            with routed_output():
                scheduler.run()
        except BaseException as error:
            # Save what can be saved first: the journal already holds every outcome.
            session_record["end_time"] = now_iso()
            with contextlib.suppress(OSError):
                recorder.close()
            _write_run_failure(store, error)
            raise
        finally:
            if pool is not None:
                pool.close()
        session_record["end_time"] = now_iso()
        recorder.close()
        if markers_dir is not None:
            shutil.rmtree(markers_dir, ignore_errors=True)
    counts = state.counts()
    from resweep import summary

    summary_missing = not (store.root / summary.SUMMARY_FILE).exists()
    if counts["done"] == len(state.configs) and (scheduler is not None or summary_missing):
        summary.save_summary(store, force=True, state=state)
    if not (counts["todo"] or counts["running"]):
        key = finished if finished is not None else finished_key(experiment)
        if key is not None:
            store.mark_finished(key, counts)
    stop = scheduler.stop if scheduler is not None else None
    return RunReport(
        done=counts["done"],
        failed=counts["failed"],
        todo=counts["todo"] + counts["running"],
        interrupted=scheduler.interrupted if scheduler is not None else 0,
        executed=scheduler.executed if scheduler is not None else 0,
        signal=stop.signal_name if stop is not None and stop.requested else None,
    )


def _write_run_failure(store: Store, error: BaseException) -> None:
    """Leave the reason a run stopped on its own error next to the saved state."""
    if isinstance(error, KeyboardInterrupt):
        return
    text = f"{now_iso()} run stopped by an error inside resweep\n" + "".join(
        traceback.format_exception(error)
    )
    with contextlib.suppress(OSError):
        write_atomic(store.root / RUN_FAILURE_FILE, text, durable=False)
