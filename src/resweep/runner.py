"""Scheduling configs over joblib backends, and what a worker does with each config."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import io
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resweep import cache
from resweep.errors import ResultError, ResweepError
from resweep.experiment import Context, Experiment, RunReport, select, takes_context
from resweep.store import (
    EXCEPTION_FILE,
    LOG_FILE,
    RESULT_FILE,
    Recorder,
    State,
    Store,
    now_iso,
    read_result,
    write_atomic,
    write_result,
)

# A batch of fast configs should keep a worker busy about this long.
TARGET_BATCH_S = 0.1
MAX_BATCH_SIZE = 2000
# Fold the journal into experiment.yaml at least this often while running.
COMPACT_EVERY_S = 10.0
ERROR_LINE_CHARS = 500
RUN_FAILURE_FILE = "run_failure.txt"


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


# -- worker side ---------------------------------------------------------------------------

_current_log: contextvars.ContextVar[_LazyLog | None] = contextvars.ContextVar(
    "resweep_log", default=None
)


class _LazyLog(io.TextIOBase):
    """A config's log.txt, opened on first write so that silent configs cost no file."""

    def __init__(self, path: Path, attempt: int) -> None:
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
            sys.stdout = _Router(sys.stdout)
            sys.stderr = _Router(sys.stderr)
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
    return [execute(job, task, setup_error) for task in tasks]


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[:ERROR_LINE_CHARS]


def execute(job: Job, task: Task, setup_error: str | None = None) -> Outcome:
    """Run one config: its result file is written before the coordinator hears of it."""
    config_dir = Path(job.output_dir, "configs", task.name)
    config_dir.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT_FILE, EXCEPTION_FILE):
        with contextlib.suppress(FileNotFoundError):
            (config_dir / stale).unlink()
    log = _LazyLog(config_dir / LOG_FILE, task.attempt)
    start_time = now_iso()
    started = time.perf_counter()
    ok, result, error = False, None, setup_error
    stats = cache.CallStats()
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
            with cache.scope(job.output_dir if job.cache else None, task.name, "record", stats):
                raw = job.function(task.config, ctx) if job.takes_ctx else job.function(task.config)
            result = to_plain_result(raw)
            ok = True
    except Exception as exc:
        error = _error_line(exc)
        text = "".join(traceback.format_exception(exc))
        write_atomic(config_dir / EXCEPTION_FILE, text, durable=False)
    finally:
        _current_log.reset(token)
        log.close()
    duration_s = time.perf_counter() - started
    outcome = Outcome(
        task.name, ok, result, error, start_time, now_iso(), duration_s, task.attempt,
        stats.hits, stats.misses,
    )  # fmt: skip
    if ok:
        meta = {"attempt": task.attempt, "end_time": outcome.end_time, "duration_s": duration_s}
        meta.update(cache_hits=stats.hits, cache_misses=stats.misses)
        write_result(config_dir, result, meta)
    return outcome


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

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.critical = 0
        self.hard_pending = False

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested or signum == signal.SIGTERM:
            self.requested = True
            self.signal_name = name if signum == signal.SIGTERM else (self.signal_name or name)
            if self.critical:
                self.hard_pending = True  # raised when the state is consistent again
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


class _Scheduler:
    """Feeds batches of configs to a joblib pool and records every outcome as it arrives."""

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
    ) -> None:
        self.job = job
        self.pending: deque[Task] = deque(tasks)
        self.in_flight: dict[str, Task] = {}
        self.recorder = recorder
        self.backend = backend
        self.n_jobs = 1 if backend == "sequential" else max_workers
        self.retries = retries
        self.lock = threading.Lock()
        self.stop = _Stop()
        self.mean_config_s: float | None = None
        self.executed = 0
        self.done = 0
        self.failed = 0
        self.last_compaction = time.monotonic()
        self.compaction_s = 0.0
        self.interrupted = 0
        if backend == "loky":
            import cloudpickle

            self.payload: tuple[str, Any] = (job.token, cloudpickle.dumps(job))
        else:
            self.payload = (job.token, job)
        from tqdm.auto import tqdm

        self.bar = tqdm(
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
        # Per-config overhead outside the function: directory, result file, journal line.
        per_config = self.mean_config_s + 50e-6
        size = int(TARGET_BATCH_S / per_config)
        balance = len(self.pending) // (4 * self.n_jobs)
        return max(1, min(size, balance, MAX_BATCH_SIZE))

    def _next_batch(self) -> list[Task]:
        with self.lock:
            size = self._batch_size()
            batch = [self.pending.popleft() for _ in range(min(size, len(self.pending)))]
            if not batch:
                return batch
            start_time = now_iso()
            for task in batch:
                task.attempt = self.recorder.state.configs[task.name]["attempts"] + 1
                fields = {"status": "running", "attempts": task.attempt, "start_time": start_time}
                fields["end_time"] = None
                self.recorder.update(task.name, fields)
                self.in_flight[task.name] = task
            # Written, not yet synced: a crash now still shows these configs as running.
            self.recorder.write(sync=False)
        return batch

    def _batches(self) -> Iterator[Any]:
        from joblib import delayed

        while not self.stop.requested:
            batch = self._next_batch()
            if not batch:
                return
            yield delayed(run_batch)(self.payload, batch)

    def _absorb(self, outcomes: list[Outcome]) -> None:
        with self.stop.critical_section(), self.lock:
            for outcome in outcomes:
                task = self.in_flight.pop(outcome.name)
                self.executed += 1
                fields = outcome.fields()
                fields["session"] = self.job.session
                if outcome.ok:
                    fields["fingerprint"] = self.job.fingerprint
                    self.done += 1
                elif task.failures < self.retries:
                    task.failures += 1
                    fields["status"] = "todo"
                    self.pending.append(task)
                    self.bar.total += 1
                else:
                    self.failed += 1
                self.recorder.update(outcome.name, fields)
            self.recorder.write(sync=True)
            durations = [o.duration_s for o in outcomes]
            mean = sum(durations) / len(durations)
            self.mean_config_s = (
                mean if self.mean_config_s is None else 0.7 * self.mean_config_s + 0.3 * mean
            )
            self.bar.update(len(outcomes))
            self._postfix()
            if time.monotonic() - self.last_compaction > max(
                COMPACT_EVERY_S, 20 * self.compaction_s
            ):
                started = time.monotonic()
                self.recorder.compact()
                self.last_compaction = time.monotonic()
                self.compaction_s = self.last_compaction - started

    def run(self) -> None:
        from joblib import Parallel

        with self.stop.installed():
            try:
                with Parallel(
                    n_jobs=self.n_jobs,
                    backend=self.backend,
                    return_as="generator_unordered",
                    batch_size=1,
                    pre_dispatch=f"{2 * self.n_jobs}",
                ) as parallel:
                    while self.pending and not self.stop.requested:
                        for outcomes in parallel(self._batches()):
                            self._absorb(outcomes)
            except KeyboardInterrupt:
                self.stop.requested = True
                self.stop.signal_name = self.stop.signal_name or "SIGINT"
            finally:
                self.bar.close()
                self._settle_in_flight()

    def _settle_in_flight(self) -> None:
        """Configs cut off by a stop: done if their result file made it, else todo again."""
        store = Store(self.job.output_dir)
        for name, task in list(self.in_flight.items()):
            found = read_result(store.config_dir(name))
            if found is not None and found[1].get("attempt") == task.attempt:
                result, meta = found
                self.recorder.update(name, recovered_fields(result, meta))
                self.done += 1
            else:
                self.recorder.update(name, {"status": "todo", "end_time": now_iso()})
        self.interrupted = len(self.in_flight)
        self.in_flight.clear()


def recovered_fields(result: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """State fields for a config whose result file was written but never recorded."""
    return {
        "status": "done",
        "result": result,
        "error": None,
        "end_time": meta.get("end_time"),
        "duration_s": meta.get("duration_s"),
        "cache_hits": meta.get("cache_hits", 0),
        "cache_misses": meta.get("cache_misses", 0),
    }


def _merge(
    state: State, experiment: Experiment, named: dict[str, tuple[Any, dict[str, Any]]]
) -> None:
    """Add configs that are new as todo; an existing name must not change its params."""
    from resweep.errors import ConfigError

    if experiment.name is not None:
        state.name = experiment.name
    if experiment.description is not None:
        state.description = experiment.description
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
            continue
        stored = record["params"]
        if stored == params:
            continue
        # Fields added (with a default) or removed since keep the identity; a changed value does not.
        changed = [k for k in stored.keys() & params.keys() if stored[k] != params[k]]
        if changed:
            raise ConfigError(
                f"config name {name!r} is stored with {changed[0]}={stored[changed[0]]!r}, but "
                f"now has {changed[0]}={params[changed[0]]!r}; config_naming must give different "
                "configs different names"
            )
        record["params"] = params


def _recover(store: Store, state: State) -> int:
    """Settle the configs a dead run left running; return how many."""
    count = 0
    for name, record in state.configs.items():
        if record["status"] != "running":
            continue
        count += 1
        found = read_result(store.config_dir(name))
        if found is not None and found[1].get("attempt") == record.get("attempts"):
            record.update(recovered_fields(*found))
        else:
            record["status"] = "todo"
            record["interruptions"] = record.get("interruptions", 0) + 1
    return count


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
        elif rerun_changed and record.get("fingerprint") not in (None, fingerprint):
            result.changed.append(name)
        else:
            result.done += 1
    return result


def run_experiment(
    experiment: Experiment,
    named: dict[str, tuple[Any, dict[str, Any]]],
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
) -> RunReport:
    """One run: take the lock, bring the state up to date, run what is pending, compact."""
    from resweep import provenance

    if backend == "dask":
        raise ResweepError("the dask backend is not available in this version of resweep")
    store = experiment.store
    store.ensure_dir()
    with store.lock(break_lock=break_lock):
        state = store.read() if store.exists() else State()
        _merge(state, experiment, named)
        _recover(store, state)
        fingerprint = provenance.fingerprint(experiment.function)
        names = plan(
            state,
            named,
            retry_failed=retry_failed,
            only=only,
            rerun_changed=rerun_changed,
            fingerprint=fingerprint,
        ).to_run
        scheduler_obj = None
        if not names:
            store.compact(state)
        else:
            session, session_record = provenance.new_session(
                experiment.function, backend=backend, max_workers=max_workers
            )
            state.sessions[session] = session_record
            store.compact(state)
            if fresh:
                cache.drop(store.root, names)
            setup = experiment.setup
            setup_value = setup.common() if setup is not None and setup.common else None
            job = Job(
                function=experiment.function,
                takes_ctx=takes_context(experiment.function),
                output_dir=str(store.root),
                shared=experiment.context,
                setup_value=setup_value,
                per_worker=setup.per_worker if setup is not None else None,
                cache=experiment.cache,
                coordinator_pid=os.getpid(),
                session=session,
                fingerprint=fingerprint,
            )
            tasks = [Task(n, named[n][0]) for n in names]
            recorder = Recorder(store, state)
            try:
                scheduler_obj = _Scheduler(
                    job,
                    tasks,
                    recorder,
                    backend=backend,
                    max_workers=max_workers,
                    retries=experiment.retries,
                    progress=progress,
                )
                with routed_output():
                    scheduler_obj.run()
            except BaseException as error:
                _write_run_failure(store, error)
                raise
            finally:
                session_record["end_time"] = now_iso()
                recorder.close()
        counts = state.counts()
        summary_missing = not (store.root / "summary.csv").exists()
        if counts["done"] == len(state.configs) and (scheduler_obj is not None or summary_missing):
            from resweep import summary

            summary.save_summary(store, force=True, state=state)
    stop = scheduler_obj.stop if scheduler_obj is not None else None
    return RunReport(
        done=counts["done"],
        failed=counts["failed"],
        todo=counts["todo"] + counts["running"],
        interrupted=scheduler_obj.interrupted if scheduler_obj is not None else 0,
        executed=scheduler_obj.executed if scheduler_obj is not None else 0,
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
