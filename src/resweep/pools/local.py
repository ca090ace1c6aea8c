"""The pools of this machine: loky worker processes, threads, or one config after another."""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from resweep.durable import disable_crash_hook
from resweep.errors import ResweepError
from resweep.files import (
    WORKERS_DIR,
    Marker,
    ResultsIndex,
    clear_markers,
    read_markers,
    request_stop,
    thread_marker_name,
)
from resweep.pools.base import PoolStopped, Returned, batch_size, timeout_reason
from resweep.processes import kill_tree
from resweep.recovery import finished_results, settle
from resweep.worker import (
    Job,
    Outcome,
    Task,
    execute,
    install_router,
    not_started,
    pickle_job,
    setup_worker,
    stopping,
)

# Per-config cost outside the function: directory, result file, journal line.
CONFIG_OVERHEAD_S = 50e-6
# Pool breaks in a row that no config explains before the run gives up.
MAX_UNEXPLAINED_BREAKS = 3
# How often a worker looks for the stop file within a batch (a first Ctrl-C makes it).
STOP_CHECK_S = 0.02
# How often a worker process checks that its coordinator is still alive.
ORPHAN_CHECK_S = 1.0


# -- worker side ---------------------------------------------------------------------------

_jobs: dict[str, Job] = {}
_setup_errors: dict[str, str | None] = {}
_prepare_lock = threading.Lock()
_marker: Marker | None = None
_watching: list[int] = []


def _watch_coordinator(coordinator_pid: int) -> None:
    """End this worker soon after its coordinator dies: nobody could record what it does next."""
    if coordinator_pid in _watching:
        return
    _watching.append(coordinator_pid)

    def watch() -> None:
        while os.getppid() == coordinator_pid:
            time.sleep(ORPHAN_CHECK_S)
        kill_tree(os.getpid())  # and the config's own subprocesses: nobody will record them

    threading.Thread(target=watch, name="resweep-orphan-check", daemon=True).start()


def _prepare(payload: tuple[str, Any]) -> Job:
    """This process's Job, unpickled and set up once per run, however many batches arrive."""
    global _marker
    token, blob = payload
    job = _jobs.get(token)
    if job is not None:
        return job
    with _prepare_lock:
        job = _jobs.get(token)
        if job is not None:
            return job
        job = pickle.loads(blob) if isinstance(blob, bytes) else blob
        assert isinstance(job, Job)
        if os.getpid() != job.coordinator_pid:
            # Ctrl-C belongs to the coordinator, which lets running configs finish.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            disable_crash_hook()
            install_router()
            if job.markers_dir is not None:
                _watch_coordinator(job.coordinator_pid)
                if _marker is not None:
                    _marker.close()
                _marker = Marker(job.markers_dir)
        _setup_errors[token] = setup_worker(job)
        _jobs.clear()  # one run at a time per process; drop the previous run's job
        _jobs[token] = job
        return job


class _ThreadMarks:
    """In-process backends: which config each thread runs now (the markers of a thread pool).

    With a directory, each thread also keeps a marker file there, as worker processes do, so
    that `status` in another process sees what runs now and since when.
    """

    def __init__(self) -> None:
        self._running: dict[int, str] = {}
        self._directory: str | None = None
        self._files: dict[int, Marker] = {}
        self._lock = threading.Lock()

    def open(self, directory: str) -> None:
        self.close()
        self._directory = directory

    def mark(self, name: str) -> None:
        ident = threading.get_ident()
        if name:
            self._running[ident] = name
        else:
            self._running.pop(ident, None)
        if self._directory is not None:
            marker = self._files.get(ident)
            if marker is None:
                with self._lock, contextlib.suppress(OSError):
                    file_name = thread_marker_name(os.getpid(), ident)
                    marker = Marker(self._directory, file_name, locked=False)
                    self._files[ident] = marker
            if marker is not None:
                with contextlib.suppress(OSError):
                    marker.mark(name)

    def names(self) -> set[str]:
        return set(self._running.values())

    def close(self) -> None:
        with self._lock:
            for marker in self._files.values():
                marker.close()
            self._files.clear()
            self._directory = None


_thread_marks = _ThreadMarks()


def run_batch(payload: tuple[str, Any], tasks: list[Task]) -> list[Outcome]:
    """Run a batch of configs in this worker, each isolated from the others' failures."""
    job = _prepare(payload)
    setup_error = _setup_errors.get(payload[0])
    in_coordinator = os.getpid() == job.coordinator_pid
    marker: _ThreadMarks | Marker | None = _thread_marks if in_coordinator else _marker
    outcomes = []
    stopped = False
    checked = -STOP_CHECK_S
    for task in tasks:
        if not in_coordinator and os.getppid() != job.coordinator_pid:
            os._exit(0)  # the coordinator died: start nothing it cannot record
        # At the batch's start, then every STOP_CHECK_S: a stat per config costs a no-op config
        # about 5 us, and a batch of fast configs lasts about TARGET_BATCH_S anyway.
        now = time.monotonic()
        if not stopped and now - checked >= STOP_CHECK_S:
            stopped, checked = stopping(job), now
        if stopped:
            outcomes.append(not_started(task))
            continue
        outcome = execute(job, task, setup_error, marker)
        outcomes.append(outcome)
        if job.fail_fast and not outcome.ok and task.failures >= job.retries:
            # Stop at once, not when the coordinator hears of it: configs queued behind this
            # one, here or on another worker, must not start.
            request_stop(job.output_dir)
            stopped = True
    return outcomes


def worker_started() -> None:
    """A loky worker's initializer: unpickling it imports this module while the coordinator
    still prepares the run. From its start, a worker leaves Ctrl-C to the coordinator, which
    lets running configs finish: a terminal sends it to every worker too, prepared or not."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -- coordinator side ----------------------------------------------------------------------


class _InlineExecutor:
    """The sequential backend: each batch runs in this process when submitted (for debugging)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        return None


def executor(backend: str, max_workers: int) -> Any:
    """A concurrent.futures executor for the backend."""
    if backend == "sequential":
        return _InlineExecutor()
    if backend == "threading":
        return ThreadPoolExecutor(max_workers, thread_name_prefix="resweep")
    # joblib's process pool, imported on its own: the joblib package would import numpy into this
    # process and every worker. Unlike joblib.Parallel(n_jobs=1) it keeps one worker out of process.
    from loky import get_reusable_executor

    return get_reusable_executor(max_workers=max_workers, initializer=worker_started)


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


def death_reason(error: BaseException) -> str:
    """'worker died: SIGSEGV' from loky's report of the dead worker's exit code."""
    match = re.search(r"exit codes of the workers are \{([^}]*)\}", str(error))
    codes = match.group(1) if match else ""
    signals = re.findall(r"(SIG[A-Z0-9]+)", codes)
    if signals:
        return f"worker died: {signals[0]}"
    numbers = re.findall(r"-?\d+", codes)
    return f"worker died: exit code {numbers[0]}" if numbers else "worker died"


class LocalPool:
    """loky processes, threads, or this process: batches as futures of a local executor."""

    isolates_batches = False

    def __init__(self, backend: str, max_workers: int) -> None:
        self.backend = backend
        self.inline = backend == "sequential"
        self.n_workers = 1 if self.inline else max_workers
        self.processes = backend == "loky"
        self.futures: dict[Future[Any], list[Task]] = {}
        self.job: Job | None = None
        self.payload: tuple[str, Any] = ("", None)
        self.markers_dir: Path | None = None
        self.timeout_s: float | None = None
        self.timed_out: set[str] = set()
        self.unexplained_breaks = 0
        # What this run's workers wrote to their results files, read on as the pool breaks.
        self.results: ResultsIndex | None = None
        self._executor: Any = None
        if self.processes:
            # Start the workers now: they import Python and resweep while the coordinator
            # records the session and compacts the state.
            self._executor = executor(backend, self.n_workers)
            self._executor.submit(worker_started)

    def start(self, job: Job, *, timeout_s: float | None = None) -> None:
        self.job = job
        self.timeout_s = timeout_s
        if self.processes:
            # Each worker process says here which config it runs: for timeouts and forensics.
            self.markers_dir = Path(job.output_dir, WORKERS_DIR)
            self.markers_dir.mkdir(exist_ok=True)
            job.markers_dir = str(self.markers_dir)
            self.payload = (job.token, pickle_job(job))
        else:
            self.payload = (job.token, job)
            # Not self.markers_dir: a thread's marker names this process, which no timeout kills.
            threads_dir = Path(job.output_dir, WORKERS_DIR)
            with contextlib.suppress(OSError):
                threads_dir.mkdir(exist_ok=True)
                _thread_marks.open(str(threads_dir))
        if self._executor is None:
            self._executor = executor(self.backend, self.n_workers)

    def capacity(self) -> int:
        """One batch running and one queued per worker."""
        return 2 * self.n_workers

    def batch_size(self, mean_config_s: float | None, pending: int) -> int:
        return batch_size(mean_config_s, CONFIG_OVERHEAD_S, pending, self.n_workers)

    def submit(self, batches: list[list[Task]]) -> None:
        for batch in batches:
            self.futures[self._executor.submit(run_batch, self.payload, batch)] = batch

    def out(self) -> int:
        return len(self.futures)

    def wait(self, timeout_s: float, in_flight: dict[str, Task], *, stopping: bool) -> Returned:
        from concurrent.futures.process import BrokenProcessPool

        returned = Returned()
        finished, _ = wait(list(self.futures), timeout=timeout_s, return_when=FIRST_COMPLETED)
        try:
            for future in finished:
                outcomes = future.result()
                del self.futures[future]
                returned.outcomes += outcomes
        except BrokenProcessPool as error:
            if stopping:
                raise PoolStopped from None  # SIGTERM reached the workers too: this is the stop
            self._after_break(error, returned)
            self._executor = executor(self.backend, self.n_workers)
            return returned
        self._enforce_timeouts(in_flight)
        return returned

    def _enforce_timeouts(self, in_flight: dict[str, Task]) -> None:
        """Kill the worker of any config running longer than timeout_s; the pool break follows."""
        if self.timeout_s is None or self.markers_dir is None:
            return
        now = time.time()
        for name, (pid, started) in read_markers(self.markers_dir).items():
            if name in in_flight and now - started > self.timeout_s:
                self.timed_out.add(name)
                kill_tree(pid)  # the config's own subprocesses too: a retry must not overlap them

    def _after_break(self, error: BaseException, returned: Returned) -> None:
        """A worker died and took the pool with it: the fate of every config that was out."""
        assert self.job is not None
        # Every worker of the broken pool dead first: one still running a config would write
        # its result after this reads them, and that config would run again.
        with contextlib.suppress(Exception):
            self._executor.shutdown(wait=True, kill_workers=True)
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
        if self.results is None:
            self.results = finished_results(self.job.output_dir)
        results = self.results.refresh()  # only what was written since the last break
        for task in lost:
            settled = settle(
                self.job.output_dir, task.name, task.attempt, running, interruptions=0,
                results=results, session=self.job.session,
            )  # fmt: skip
            if settled.fate == "done":
                returned.done.append((task, settled.fields))
            elif task.name in self.timed_out:
                returned.failed.append((task, timeout_reason(self.timeout_s)))
            elif task.name == culprit:
                returned.failed.append((task, death_reason(error)))
            elif task.name in running and not timeouts:
                returned.suspects.append((task, {"status": "todo"}))
            elif settled.fate == "not_started":  # queued behind the dead worker: no attempt
                returned.again.append((task, settled.fields))
            else:  # killed with it while it ran: that attempt happened; run it again
                returned.again.append((task, {"status": "todo"}))
        explained = timeouts or culprit is not None or bool(executing)
        self.timed_out.clear()
        if self.markers_dir is not None:
            clear_markers(self.markers_dir)
        self.unexplained_breaks = 0 if explained else self.unexplained_breaks + 1
        if self.unexplained_breaks >= MAX_UNEXPLAINED_BREAKS:
            raise ResweepError(
                f"worker processes died {MAX_UNEXPLAINED_BREAKS} times outside any config "
                f"({death_reason(error)}); check setup.per_worker and the machine's memory"
            )

    def stop(self, *, kill: bool) -> None:
        """Stop the pool; with kill, running configs are stopped too where the backend can."""
        if self._executor is None:
            return
        with contextlib.suppress(Exception):
            if isinstance(self._executor, ThreadPoolExecutor):
                # Threads cannot be killed: queued batches are dropped, running ones finish.
                self._executor.shutdown(wait=True, cancel_futures=kill)
            elif kill:
                # wait=True: the workers are dead before anything is settled.
                self._executor.shutdown(wait=True, kill_workers=True)

    def executing(self) -> set[str] | None:
        if not self.processes:
            return _thread_marks.names()
        if self.markers_dir is None:
            return None
        return set(read_markers(self.markers_dir))

    def close(self, *, finished: bool) -> None:
        if not self.processes:
            _thread_marks.close()
        released = _released_pools.get()
        if finished and released is not None and self.processes and self._executor is not None:
            # The process ends with this run: the workers exit while the state and the
            # summary are written, instead of after them.
            thread = threading.Thread(target=self._executor.shutdown, name="resweep-pool-release")
            thread.start()
            released.append(thread)
