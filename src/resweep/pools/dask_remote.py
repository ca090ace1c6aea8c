"""What runs on a Dask worker: a run's job set up once per worker, and each config's shipment."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from resweep import cache
from resweep.clock import now_iso
from resweep.durable import is_write_fault
from resweep.errors import ResweepError
from resweep.files import CONFIGS_DIR, WORKERS_DIR, Marker, config_path, log_header
from resweep.worker import (
    Job,
    Outcome,
    Task,
    call_config,
    error_line,
    faulted,
    install_router,
    not_started,
    setup_worker,
    stopping,
)

# A config that prints more than this keeps the head of its log; the rest is counted, not sent.
LOG_LIMIT_CHARS = 8_000_000
SCRATCH_PREFIX = "resweep-"


@dataclass(slots=True)
class Shipment:
    """What a config run on a Dask worker sends back for the coordinator to write."""

    # This attempt's part of log.txt; empty when the config printed and logged nothing.
    log: str
    # The traceback for exception.txt, when the config raised.
    trace: str | None
    # Calls this attempt recorded that the coordinator's cache does not hold yet: (key, answer).
    entries: cache.Calls


@dataclass
class _Remote:
    """One run as a worker process holds it: the Job, unpickled and set up once."""

    job: Job
    setup_error: str | None
    # This worker process's scratch directory for the run (local disk): cache and ctx.dir.
    scratch: Path
    # The worker sees the coordinator's output_dir (a shared filesystem): ctx.dir is the real one.
    shared: bool
    report_starts: bool
    # Where each thread of this process says which config it runs, when it sees output_dir: a
    # later run that finds one still held after this run died stops this process first.
    markers: dict[int, Marker] = field(default_factory=dict)

    def marker(self) -> Marker | None:
        """This thread's marker: a worker with several threads runs several configs at once."""
        if not self.shared:
            return None
        ident = threading.get_ident()
        marker = self.markers.get(ident)
        if marker is None:
            with contextlib.suppress(OSError):
                name = f"dask-{socket.gethostname()}-{os.getpid()}-{ident}"
                marker = self.markers[ident] = Marker(Path(self.job.output_dir, WORKERS_DIR), name)
        return marker


# Filled by JobPlugin on every worker, including those that join later (adaptive scaling).
_payloads: dict[str, tuple[bytes, bool]] = {}
_prepared: dict[str, _Remote] = {}
_prepare_lock = threading.Lock()


class JobPlugin(WorkerPlugin):
    """Hands a run's pickled Job to each worker once, instead of with every config."""

    def __init__(self, token: str, blob: bytes, report_starts: bool, own_cluster: bool) -> None:
        self.token = token
        self.blob = blob
        self.report_starts = report_starts
        # Workers of the cluster a run started share its terminal: Ctrl-C is for the run alone.
        self.own_cluster = own_cluster

    def setup(self, worker: distributed.Worker) -> None:
        _payloads[self.token] = (self.blob, self.report_starts)
        if self.own_cluster:
            with contextlib.suppress(ValueError):  # not the main thread: nothing to protect
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    def teardown(self, worker: distributed.Worker) -> None:
        _payloads.pop(self.token, None)
        with _prepare_lock:
            remote = _prepared.pop(self.token, None)
        if remote is not None:
            for marker in remote.markers.values():
                marker.close()
            with contextlib.suppress(Exception):
                cache.close_cache(remote.scratch)
            shutil.rmtree(remote.scratch, ignore_errors=True)


def topic(token: str) -> str:
    return f"{SCRATCH_PREFIX}{token}-started"


def _sees_output_dir(job: Job) -> bool:
    """Whether this worker sees the coordinator's output_dir itself and may write ctx.dir there."""
    probe = Path(job.output_dir, WORKERS_DIR, f"probe-{job.token}")
    try:
        found = probe.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return found == job.token and os.access(Path(job.output_dir, CONFIGS_DIR), os.W_OK | os.X_OK)


def _prepare_remote(token: str) -> _Remote:
    """This worker process's copy of the run, unpickled and set up on its first config."""
    remote = _prepared.get(token)
    if remote is not None:
        return remote
    with _prepare_lock:
        remote = _prepared.get(token)
        if remote is not None:
            return remote
        try:
            blob, report_starts = _payloads[token]
        except KeyError:
            raise ResweepError(
                "this Dask worker never received the experiment (its worker plugin is missing)"
            ) from None
        job = pickle.loads(blob)
        assert isinstance(job, Job)
        # print() inside a config goes to that config's log; elsewhere to the real stream.
        install_router()
        scratch = Path(distributed.get_worker().local_directory, f"{SCRATCH_PREFIX}{token}")
        scratch.mkdir(parents=True, exist_ok=True)
        setup_error = setup_worker(job)
        remote = _Remote(job, setup_error, scratch, _sees_output_dir(job), report_starts)
        _prepared[token] = remote
        return remote


class _TextLog(io.TextIOBase):
    """A remote config's log.txt, kept in memory until it travels back with the outcome."""

    def __init__(self, attempt: int) -> None:
        self._attempt = attempt
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            if not self._parts:
                self._parts.append(log_header(self._attempt, remote=True))
            if self._size + len(text) > LOG_LIMIT_CHARS:
                self._dropped += len(text)
            else:
                self._parts.append(text)
                self._size += len(text)
        return len(text)

    def writable(self) -> bool:
        return True

    def text(self) -> str:
        with self._lock:
            tail = f"\n[{self._dropped} more characters not kept]\n" if self._dropped else ""
            return "".join(self._parts) + tail


def run_remote(
    token: str, tasks: list[Task], recorded: dict[str, cache.Calls]
) -> list[tuple[Outcome, Shipment]]:
    """Run a batch of configs on a Dask worker; what they leave travels back with the outcomes.

    The coordinator hears when the batch starts (an attempt that never started is not counted),
    or, with timeout_s or hooks that hear each start, when each config starts (the limit counts
    from its own start; a config a stop leaves unstarted is never said to have started).
    """
    remote = _prepare_remote(token)
    worker = distributed.get_worker()
    key = worker.get_current_task()
    if not remote.report_starts:
        worker.log_event(topic(token), [key, [[t.name, t.attempt] for t in tasks], worker.address])
    shipped = []
    for task in tasks:
        if remote.shared and stopping(remote.job):
            shipped.append((not_started(task), Shipment("", None, [])))
            continue
        if remote.report_starts:
            worker.log_event(topic(token), [key, [[task.name, task.attempt]], worker.address])
        shipped.append(_execute_remote(remote, task, recorded.get(task.name, [])))
    return shipped


def _execute_remote(remote: _Remote, task: Task, recorded: cache.Calls) -> tuple[Outcome, Shipment]:
    """Run one config in the worker's scratch; nothing under output_dir but ctx.dir when shared."""
    job = remote.job
    start_time = now_iso()
    started = time.perf_counter()
    # Not made here: ctx.dir makes it when the config first asks for it.
    if remote.shared:
        config_dir = config_path(job.output_dir, task.name)
    else:
        config_dir = config_path(remote.scratch, task.name)
        # A re-run after a lost worker, or a config's second attempt here, starts clean.
        shutil.rmtree(config_dir, ignore_errors=True)
    log = _TextLog(task.attempt)
    stats = cache.CallStats()
    handle = None
    entries: cache.Calls = []
    setup_error = remote.setup_error
    try:
        if job.cache:
            # The scratch cache holds this config's calls so far: a retry pays only for new ones.
            handle = cache.open_cache(remote.scratch)
            handle.evict(task.name, retry=True)
            cache.add_calls(handle, task.name, recorded)
    except OSError as exc:
        if is_write_fault(exc):  # the worker's disk failed, not the config
            return faulted(task, start_time, exc), Shipment("", None, [])
        setup_error = f"cannot prepare the config on this worker: {error_line(exc)}"
    marker = remote.marker()
    if marker is not None:
        marker.mark(task.name)
    try:
        call = call_config(job, task, config_dir, log, remote.scratch, stats, setup_error)
    finally:
        if marker is not None:
            marker.mark("")
    if isinstance(call, OSError):
        return faulted(task, start_time, call), Shipment("", None, [])
    ok, result, error, trace = call
    duration_s = time.perf_counter() - started
    if handle is not None:
        seeded = {key for key, _ in recorded}
        entries = [e for e in cache.calls_of(handle, task.name) if e[0] not in seeded]
        handle.evict(task.name, retry=True)
    if not remote.shared:
        shutil.rmtree(config_dir, ignore_errors=True)
    outcome = Outcome(
        task.name, ok, result, error, start_time, now_iso(), duration_s, task.attempt,
        stats.hits, stats.misses, worker=distributed.get_worker().address,
    )  # fmt: skip
    return outcome, Shipment(log.text(), trace, entries)
