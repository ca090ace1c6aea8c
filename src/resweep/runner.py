"""The scheduling loop: configs to a pool in batches, every outcome recorded as it arrives."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from resweep import cache, planning, provenance, status
from resweep.clock import now_iso
from resweep.durable import fault_text, write_atomic
from resweep.errors import HookError, PluginError, ResweepError
from resweep.files import (
    CONFIGS_DIR,
    RESULTS_DIR,
    RUN_FAILURE_FILE,
    STOP_FILE,
    WORKERS_DIR,
    check_layout,
    remove_worker_files,
    request_stop,
)
from resweep.hooks import ConfigOutcome, Hooks, HookSpecs, prepare
from resweep.identity import NamedConfig
from resweep.options import RunOptions
from resweep.pools.base import Pool, PoolStopped, Returned
from resweep.pools.registry import open_pool
from resweep.recovery import finished_results, settle, settle_left_running, stop_orphans
from resweep.selection import Selection
from resweep.state import State
from resweep.store import StateWriter, Store
from resweep.worker import (
    Job,
    Task,
    WorkerSetup,
    close_result_log,
    routed_output,
    storage_error,
    takes_context,
)

# Group commit: outcomes reach the journal file at once (safe from a process crash) and the
# disk within this window (safe from a power cut), with one fdatasync for all of them.
SYNC_EVERY_S = 0.05
# Fold the journal into experiment.yaml at least this often while running.
COMPACT_EVERY_S = 10.0
# How often the loop looks up from waiting: timeouts, a lost cluster, a stop.
POLL_S = 0.1
# How often the bar is drawn again while no config finishes, so that its clock keeps going.
TICK_S = 1.0


class Declared(Protocol):
    """What the runner needs of an experiment (resweep.Experiment is one)."""

    @property
    def function(self) -> Callable[..., Any]: ...

    @property
    def configs(self) -> Sequence[Any] | None: ...

    @property
    def name(self) -> str | None: ...

    @property
    def description(self) -> str | None: ...

    @property
    def config_naming(self) -> Callable[[Any], str] | None: ...

    @property
    def context(self) -> Any: ...

    @property
    def setup(self) -> WorkerSetup | None: ...

    @property
    def cache(self) -> bool: ...

    @property
    def timeout_s(self) -> float | None: ...

    @property
    def retries(self) -> int: ...

    @property
    def store(self) -> Store: ...

    def named_configs(self) -> dict[str, NamedConfig]: ...

    def hook_specs(self) -> HookSpecs: ...


@dataclass(frozen=True)
class RunReport:
    """Counts over the whole experiment once a run has stopped."""

    done: int
    failed: int
    todo: int
    # Configs that were running when the run was stopped by a signal.
    interrupted: int
    # Configs executed by this run, retries included.
    executed: int = 0
    # "SIGINT" or "SIGTERM" when a signal stopped the run.
    signal: str | None = None
    # Configs not done that the state holds but the script no longer declares (clean_index).
    absent: tuple[str, ...] = ()
    # Cached calls of this run's configs answered from earlier attempts, and made for real.
    cache_hits: int = 0
    cache_misses: int = 0
    # Where summary.csv is, when every config is done.
    summary: str | None = None

    @property
    def exit_code(self) -> int:
        if self.signal == "SIGTERM":
            return 143
        if self.signal is not None:
            return 130
        return 0 if self.failed == 0 and self.todo == 0 else 1


class Stop:
    """What the signal handlers asked for: a graceful stop, then a hard one."""

    def __init__(
        self,
        *,
        raise_on_hard: bool,
        on_first: Callable[[], int] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        # Called at the first Ctrl-C: tells workers to start nothing more, returns how many
        # configs are still running.
        self.on_first = on_first
        # How the first Ctrl-C's message reaches the user: above the progress bar, if any.
        self.say = say
        self.requested = False
        self.hard = False
        self.signal_name: str | None = None
        # In-process runs have no workers to kill: a hard stop interrupts the config itself.
        self.raise_on_hard = raise_on_hard
        self.critical = 0
        self.hard_pending = False
        # Set while hooks run in this thread: a hook that hangs yields to nothing but this.
        self.in_hooks = False
        # A hard stop interrupted a hook: no further config event fires in this run.
        self.hook_interrupted = False

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested or signum == signal.SIGTERM:
            self.requested = self.hard = True
            self.signal_name = name if signum == signal.SIGTERM else (self.signal_name or name)
            if self.raise_on_hard or self.in_hooks:
                if self.critical:
                    self.hard_pending = True  # raised once the state is consistent again
                else:
                    self.hook_interrupted = self.in_hooks
                    raise KeyboardInterrupt
            return
        self.requested = True
        self.signal_name = name
        running = self.on_first() if self.on_first is not None else None
        waiting = "the running configs" if running is None else f"{running} running configs"
        message = (
            f"resweep: stopping: starting no new config, waiting for {waiting} to finish; "
            "Ctrl-C again to stop at once"
        )
        if self.say is not None:
            self.say(message)
        else:
            print(f"\n{message}", file=sys.__stderr__, flush=True)

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
    def hooks_running(self) -> Iterator[None]:
        """Hooks run in here: a hard stop raises KeyboardInterrupt in them, whatever the pool."""
        self.in_hooks = True
        try:
            yield
        finally:
            self.in_hooks = False

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


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (or JupyterLite), as tqdm.autonotebook tells it."""
    if "ipykernel.zmqshell" in sys.modules:
        # Qt console and Spyder show text, not widgets.
        return not any(key == "QT_API" or key.startswith("SPYDER") for key in os.environ)
    return "IPython.utils._process_emscripten" in sys.modules


def progress_bar() -> tuple[Any, Any]:
    """tqdm's bar class and the stream it draws on: a notebook widget under Jupyter when
    ipywidgets is there, else a text bar (on the cell's stderr in a notebook), with no warning.

    tqdm.autonotebook makes the same choice but warns "IProgress not found" where ipywidgets is
    missing, and tqdm.auto adds an asyncio import, about 30 ms of every run's start.
    """
    if in_notebook():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from tqdm.notebook import IProgress
                from tqdm.notebook import tqdm as notebook_tqdm
            except Exception:  # IPython too old or broken: text it is
                IProgress = None
        if IProgress is not None:
            return notebook_tqdm, sys.stderr
        from tqdm.std import tqdm

        # The cell shows the kernel's sys.stderr; sys.__stderr__ is the terminal behind Jupyter.
        return tqdm, sys.stderr
    from tqdm.std import tqdm

    return tqdm, sys.__stderr__


class Ticker:
    """A thread beside the scheduling loop: draws the bar again every TICK_S, and prints a
    snapshot of the sweep when Enter is pressed in the terminal of the run."""

    def __init__(self, bar: Any, stream: Any, snapshot: Callable[[], list[str]]) -> None:
        self.bar = bar
        self.stream = stream
        self.snapshot = snapshot
        self.ended = threading.Event()
        self.stdin = _terminal_stdin()
        self.wake: tuple[int, int] | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.bar.disable and self.stdin is None:
            return  # nothing to draw, no key to hear
        if self.stdin is not None:
            # Written to by stop(): the thread returns at once rather than at its next tick.
            self.wake = os.pipe()
        self.thread = threading.Thread(target=self._run, name="resweep-ticker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.bar.get_lock():
            self.ended.set()  # under the bar's lock: nothing is drawn once stop() returned
        if self.wake is not None:
            with contextlib.suppress(OSError):
                os.write(self.wake[1], b"x")
        if self.thread is not None:
            self.thread.join(timeout=2 * TICK_S)
        if self.wake is not None:
            for fd in self.wake:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.wake = None

    def _run(self) -> None:
        while not self.ended.is_set():
            fd = self.stdin
            if fd is not None and self.wake is not None and _in_foreground(fd):
                try:
                    ready, _, _ = select.select([fd, self.wake[0]], [], [], TICK_S)
                except (OSError, ValueError):
                    ready, self.stdin = [], None
                if fd in ready and not self.ended.is_set():
                    self._read(fd)
            else:
                self.ended.wait(TICK_S)
            with self.bar.get_lock():
                if not self.ended.is_set() and not self.bar.disable:
                    with contextlib.suppress(Exception):
                        self.bar.refresh(nolock=True)

    def _read(self, fd: int) -> None:
        try:
            typed = os.read(fd, 4096)
        except OSError:
            typed = b""
        if not typed:
            self.stdin = None  # end of input (Ctrl-D): nothing more to hear
            return
        if b"\n" not in typed and b"\r" not in typed:
            return
        try:
            lines = self.snapshot()
        except Exception as error:  # a snapshot must never stop the run
            lines = [f"resweep: no snapshot now ({type(error).__name__}: {error})"]
        with self.bar.get_lock():
            if self.ended.is_set():
                return
            if not self.bar.disable and _isatty(self.stream):
                # The echoed Enter moved the cursor below the bar: write over the bar's old line.
                self.stream.write("\x1b[A\r\x1b[J")
            self.bar.write("\n".join(lines), file=self.stream)


def _terminal_stdin() -> int | None:
    """stdin's file descriptor when it is a terminal, else None: a closed or piped stdin is
    never read."""
    try:
        stdin = sys.stdin
        if stdin is None or not stdin.isatty():
            return None
        fd: int = stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd


def _in_foreground(fd: int) -> bool:
    """Whether this process may read the terminal: a background job that reads it is stopped."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


class Scheduler:
    """Feeds batches of configs to a pool and records every outcome as it arrives."""

    def __init__(
        self,
        job: Job,
        tasks: list[Task],
        writer: StateWriter,
        pool: Pool,
        *,
        retries: int,
        progress: bool,
        fail_fast: bool = False,
        hooks: Hooks | None = None,
    ) -> None:
        self.job = job
        self.fail_fast = fail_fast
        self.hooks = hooks
        # Attempts whose on_config_start has fired, and ended attempts whose on_config_end
        # waits for their record to be synced.
        self.hooks_started: set[tuple[str, int]] = set()
        self.hooks_ended: list[tuple[str, ConfigOutcome, str | None]] = []
        # Set by the first failure under fail_fast: no further config is handed out.
        self.halted = False
        self.pending: deque[Task] = deque(tasks)
        # Configs that were running when a worker died: each re-runs alone to find the culprit.
        self.suspects: deque[Task] = deque()
        self.in_flight: dict[str, Task] = {}
        self.writer = writer
        self.pool = pool
        self.retries = retries
        # Above the bar, if there is one; else on a line of its own, below the terminal's ^C.
        say = self.say if progress else None
        self.stop = Stop(raise_on_hard=pool.inline, on_first=self._stop_starting, say=say)
        self.mean_config_s: float | None = None
        self.executed = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.done = 0
        self.failed = 0
        self.interrupted = 0
        self.fault: str | None = None
        self.last_compaction = time.monotonic()
        self.compaction_s = 0.0
        self.last_sync = 0.0
        self.unsynced = False
        # Failed attempts that went back to the queue (Experiment.retries).
        self.retried = 0
        # What the pool last said it waits for, said once.
        self.waiting: str | None = None
        bar, self.stream = progress_bar()
        # The bar counts configs this run finishes, done or failed for good: a retry adds nothing.
        self.bar = bar(
            total=len(tasks),
            disable=not progress,
            unit="config",
            dynamic_ncols=True,
            file=self.stream,
            smoothing=0.05,
        )
        self._postfix()
        self.ticker = Ticker(self.bar, self.stream, self._snapshot)

    def _stop_starting(self) -> int:
        """The first Ctrl-C: workers start no further config; how many configs still run."""
        request_stop(self.job.output_dir)
        executing = self.pool.executing()
        if executing is None:
            return len(self.in_flight)
        return len(executing & self.in_flight.keys())

    def _postfix(self) -> None:
        retried = f" retries={self.retried}" if self.retried else ""
        self.bar.set_postfix_str(f"done={self.done} failed={self.failed}{retried}", refresh=False)

    def _show(self) -> None:
        """Draw the bar with the counts as they are: n is done + failed, as the postfix says."""
        self._postfix()
        finished = self.done + self.failed
        if finished != self.bar.n:
            self.bar.update(finished - self.bar.n)

    def say(self, message: str) -> None:
        """A line for the user above the bar, which stays whole below it."""
        self.bar.write(message, file=self.stream)

    def _snapshot(self) -> list[str]:
        """What `status --watch` shows, for Enter in the terminal of the run."""
        import shutil

        size = shutil.get_terminal_size()
        report = status.status_report(self.writer.store, self.job.fingerprint)
        return status.snapshot_lines(report, width=size.columns, height=max(5, size.lines - 2))

    def _notice_waiting(self) -> None:
        """Say once what the pool waits for (a cluster with no worker), and again if it changes."""
        waiting = getattr(self.pool, "waiting", None)
        message = waiting() if waiting is not None else None
        if message is not None and message != self.waiting:
            self.say(f"resweep: {message}")
        self.waiting = message

    def _start(self, batch: list[Task]) -> None:
        """Record a batch as running before any of it can run."""
        start_time = now_iso()
        configs = self.writer.state.configs
        by_attempt: dict[int, list[str]] = {}
        for task in batch:
            task.attempt = configs[task.name]["attempts"] + 1
            by_attempt.setdefault(task.attempt, []).append(task.name)
            self.in_flight[task.name] = task
        for attempt, names in by_attempt.items():
            fields = {"status": "running", "attempts": attempt, "start_time": start_time}
            # The session too: recovery trusts only results its own workers wrote.
            fields["end_time"], fields["session"] = None, self.job.session
            self.writer.update_same(names, fields)
        # Written, not yet synced: a crash now still shows these configs as running.
        self.writer.write(sync=False)

    def _dispatch(self) -> None:
        """Keep the pool full; a suspect travels alone, and alone in the pool where fates are shared."""
        if self.stop.requested or self.fault is not None or self.halted:
            return
        pool = self.pool
        batches: list[list[Task]] = []
        while (self.suspects or self.pending) and pool.out() + len(batches) < pool.capacity():
            if self.suspects:
                # One config of a batch that killed its worker: only running alone tells which.
                if not pool.isolates_batches and (pool.out() or batches):
                    break
                batches.append([self.suspects.popleft()])
                if not pool.isolates_batches:
                    break
                continue
            size = pool.batch_size(self.mean_config_s, len(self.pending))
            batches.append([self.pending.popleft() for _ in range(min(size, len(self.pending)))])
        if not batches:
            return
        for batch in batches:
            self._start(batch)
        pool.submit(batches)

    def _finish(
        self, task: Task, fields: dict[str, Any], *, ok: bool, worker: str | None = None
    ) -> None:
        """Record one config's end; a failure with retries left goes back to the queue.

        A failed attempt's cached calls become that attempt's record: the next one asks afresh.
        """
        fields["session"] = self.job.session
        if not ok and self.job.cache:
            cache.set_aside(self.job.output_dir, task.name, task.attempt)
        if ok:
            fields["fingerprint"] = self.job.fingerprint
            self.done += 1
        elif task.failures < self.retries:
            task.failures += 1
            fields["status"] = "todo"
            self.pending.append(task)
            self.retried += 1
        else:
            fields["status"] = "failed"
            self.failed += 1
            if self.fail_fast and not self.halted:
                # Like the first Ctrl-C: nothing new starts, running configs finish.
                self.halted = True
                request_stop(self.job.output_dir)
        self.writer.update(task.name, fields)
        self._ended(task.name, task.attempt, worker)

    def absorb(self, returned: Returned) -> None:
        """Record what the pool handed back, in one group commit."""
        with self.stop.critical_section():
            outcomes = returned.outcomes
            for outcome in outcomes:
                task = self.in_flight.pop(outcome.name)
                if not outcome.started:
                    # Left alone by a stopping run: that attempt did not happen.
                    self.writer.update(
                        outcome.name, {"status": "todo", "attempts": task.attempt - 1}
                    )
                    continue
                if outcome.fault is not None:
                    # Nothing of this attempt is stored: it is todo, and the run stops.
                    self.fault = self.fault or outcome.fault
                    self.writer.update(outcome.name, {"status": "todo"})
                    continue
                self.executed += 1
                self.cache_hits += outcome.cache_hits
                self.cache_misses += outcome.cache_misses
                self._finish(task, outcome.fields(), ok=outcome.ok, worker=outcome.worker)
            self._settle_lost(returned)
            self._commit(force=bool(returned.failed or returned.done or returned.suspects))
            ran = [o.duration_s for o in outcomes if o.started and o.fault is None]
            if ran:
                self._learn(ran)
            self._show()

    def _settle_lost(self, returned: Returned) -> None:
        for task, fields in returned.done:
            self.in_flight.pop(task.name, None)
            self.writer.update(task.name, fields)
            self._ended(task.name, task.attempt, None)
            self.executed += 1
            self.done += 1
        for task, reason in returned.failed:
            self.in_flight.pop(task.name, None)
            self.executed += 1
            self._finish(task, {"error": reason, "end_time": now_iso()}, ok=False)
        for task, fields in reversed(returned.again):
            self.in_flight.pop(task.name, None)
            self.writer.update(task.name, fields)
            self.pending.appendleft(task)
        for task, fields in returned.suspects:
            self.in_flight.pop(task.name, None)
            self.writer.update(task.name, fields)
            self.suspects.append(task)

    def _learn(self, durations: list[float]) -> None:
        """A moving average of how long configs take, for the size of the next batches."""
        mean = sum(durations) / len(durations)
        previous = self.mean_config_s
        self.mean_config_s = mean if previous is None else 0.7 * previous + 0.3 * mean

    def _commit(self, *, force: bool = False) -> None:
        """Write journaled changes now; sync them unless the last sync is under SYNC_EVERY_S old."""
        now = time.monotonic()
        sync = force or now - self.last_sync >= SYNC_EVERY_S
        self.writer.write(sync=sync)
        if sync:
            self.last_sync = now
        self.unsynced = not sync

    def _maybe_compact(self) -> None:
        if time.monotonic() - self.last_compaction > max(COMPACT_EVERY_S, 20 * self.compaction_s):
            started = time.monotonic()
            self.writer.compact()
            self.last_compaction = time.monotonic()
            self.compaction_s = self.last_compaction - started

    def _ended(self, name: str, attempt: int, worker: str | None) -> None:
        """Keep an ended attempt for on_config_end, which fires once its record is synced."""
        if not self.hooks:
            return
        record = self.writer.state.configs[name]
        outcome = ConfigOutcome(
            name=name,
            status=record["status"],
            attempt=attempt,
            result=record.get("result"),
            error=record.get("error"),
            start_time=record.get("start_time"),
            end_time=record.get("end_time"),
            duration_s=record.get("duration_s"),
        )
        self.hooks_ended.append((name, outcome, worker))

    def _config_started(self, name: str, attempt: int, worker: str | None = None) -> None:
        assert self.hooks is not None
        if (name, attempt) in self.hooks_started:
            return
        self.hooks_started.add((name, attempt))
        params = self.writer.state.configs[name].get("params")
        self.hooks.fire(
            "on_config_start", config=name, attempt=attempt, worker=worker, params=params
        )

    def fire_hooks(self, *, synced: bool) -> None:
        """on_config_start for configs seen running; on_config_end for those recorded, once the
        record is synced. A hook that stops the run (fail_fast) stops it like --fail-fast."""
        hooks = self.hooks
        if not hooks:
            return
        with self.stop.hooks_running():
            self._fire_hooks(hooks, synced=synced)
        if hooks.failure is not None and not self.halted:
            self.halted = True
            request_stop(self.job.output_dir)

    def _fire_hooks(self, hooks: Hooks, *, synced: bool) -> None:
        if self.in_flight and hooks.wants("on_config_start"):
            executing = self.pool.executing() or set()
            # A retry's start waits for the end of the attempt before it, still to be synced.
            ending = {name for name, _, _ in self.hooks_ended}
            for name in (executing & self.in_flight.keys()) - ending:
                self._config_started(name, self.in_flight[name].attempt)
        if synced and self.hooks_ended:
            ended, self.hooks_ended = self.hooks_ended, []
            for name, outcome, worker in ended:
                # A config too quick to be seen running started all the same.
                self._config_started(name, outcome.attempt, worker)
                self.hooks_started.discard((name, outcome.attempt))
                params = self.writer.state.configs[name].get("params")
                hooks.fire(
                    "on_config_end",
                    outcome,
                    config=name,
                    attempt=outcome.attempt,
                    worker=worker,
                    params=params,
                )

    def run(self) -> None:
        ended = False  # the loop ran out of work, with no exception on its way out
        with self.stop.installed():
            try:
                self.ticker.start()
                while not self.stop.hard:
                    self._dispatch()
                    if not self.pool.out():
                        break
                    try:
                        returned = self.pool.wait(
                            SYNC_EVERY_S if self.unsynced else POLL_S,
                            self.in_flight,
                            stopping=self.stop.requested or self.halted,
                        )
                    except PoolStopped:
                        break
                    if returned:
                        self.absorb(returned)
                    self._notice_waiting()
                    if self.unsynced:
                        self._commit()
                    self.fire_hooks(synced=not self.unsynced)
                    self._maybe_compact()
                ended = True
            except KeyboardInterrupt:
                self.stop.requested = self.stop.hard = True
                self.stop.signal_name = self.stop.signal_name or "SIGINT"
            finally:
                # Work still out means a hard stop or an error: stop it before settling,
                # so that nothing finishes after it was recorded as todo.
                self.pool.stop(kill=bool(self.pool.out() or self.in_flight) or self.stop.hard)
                self.pool.close(finished=ended and self._finished_cleanly())
                self.ticker.stop()
                self.bar.close()
                self._settle_in_flight()
        if self.fault is not None:
            raise storage_error(self.fault)

    def _finished_cleanly(self) -> bool:
        """Every config ran and was recorded: no stop, no storage fault, nothing in flight."""
        return not (self.in_flight or self.pending or self.suspects) and not (
            self.fault is not None or self.stop.requested or self.halted
        )

    def _settle_in_flight(self) -> None:
        """Configs cut off by a stop: done if their result made it to a results file, else todo."""
        executing = self.pool.executing()
        configs = self.writer.state.configs
        results = finished_results(self.job.output_dir) if self.in_flight else {}
        for name, task in list(self.in_flight.items()):
            record = configs[name]
            settled = settle(
                self.job.output_dir,
                name,
                task.attempt,
                executing,
                interruptions=record.get("interruptions", 0),
                results=results,
                session=self.job.session,
            )
            self.writer.update(name, settled.fields)
            if settled.fate == "done":
                self._ended(name, task.attempt, None)
                self.done += 1
            elif settled.fate == "interrupted":
                self.interrupted += 1
        self.in_flight.clear()


def run_experiment(experiment: Declared, options: RunOptions) -> RunReport:
    """One run: take the lock, bring the state up to date, run what is pending, compact.

    Hooks hear of it: on_run_start and on_run_end around the run, or on_error for a run that
    ends by an error, even one that never started (a bad config, a lock held by another run).
    """
    hooks = prepare(
        experiment.hook_specs(),
        output_dir=experiment.store.root,
        experiment=experiment.name,
        backend=options.backend,
        max_workers=options.max_workers,
    )
    try:
        return _run_experiment(experiment, options, hooks)
    except (Exception, KeyboardInterrupt) as error:
        if hooks:
            hooks.error(error)
        raise


def _run_experiment(experiment: Declared, options: RunOptions, hooks: Hooks) -> RunReport:
    if experiment.timeout_s is not None and options.in_process:
        warnings.warn(
            f"timeout_s is enforced by killing worker processes; backend {options.backend!r} runs "
            "configs in this process, so they run without a time limit",
            stacklevel=3,
        )
    store = experiment.store
    # A finished sweep run again need not be named: its marker vouches for the names.
    finished = None
    if os.path.exists(store.finished_path):  # False, not an error, in a directory it cannot read
        finished = planning.finished_key(
            experiment.configs, experiment.config_naming, experiment.name, experiment.description
        )
    named = None if finished is not None else experiment.named_configs()
    selection = Selection.of(options.only, options.where)
    if not selection.everything:
        # A selection that matches nothing, or names no field, stops before anything is written.
        named = experiment.named_configs()
        selection.choose({n: c.params for n, c in named.items()})
    try:
        store.ensure_dir()
        check_layout(store.root)
        with store.lock(break_lock=options.break_lock):
            if finished is not None and selection.everything and not options.rerun_changed:
                counts = store.finished_counts(finished)
                if counts is not None and not (options.retry_failed and counts["failed"]):
                    # The sweep this state finished is unchanged: nothing to name, read or run.
                    from resweep.summary import SUMMARY_FILE

                    summary_path = store.root / SUMMARY_FILE
                    report = RunReport(
                        done=counts["done"],
                        failed=counts["failed"],
                        todo=counts["todo"] + counts["running"],
                        interrupted=0,
                        summary=str(summary_path) if summary_path.exists() else None,
                    )
                    _end_hooks(hooks, store, report)
                    return report
            if named is None:
                named = experiment.named_configs()
            report = _run_locked(experiment, named, store, options, finished, selection, hooks)
            # Still under the lock: a hook may read the state as this run leaves it.
            _end_hooks(hooks, store, report)
            return report
    except OSError as error:
        # Configs' own errors never get here: this is resweep's own writing that failed.
        raise storage_error(fault_text(error)) from None


def _run_locked(
    experiment: Declared,
    named: dict[str, NamedConfig],
    store: Store,
    options: RunOptions,
    finished: str | None,
    selection: Selection,
    hooks: Hooks,
) -> RunReport:
    existed = store.exists()
    state = store.read() if existed else State()
    dirty = planning.merge(state, named, name=experiment.name, description=experiment.description)
    dirty = dirty or not existed
    # A dead run's workers may still run its configs: none may overlap with this run's.
    stop_orphans(str(store.root))
    dirty = bool(settle_left_running(state, str(store.root))) or dirty
    # A journal on disk means the last run did not end cleanly: fold it in now.
    dirty = dirty or store.journal_path.exists()
    fingerprint = provenance.fingerprint(experiment.function)
    names = planning.plan(
        state,
        named,
        retry_failed=options.retry_failed,
        selection=selection,
        rerun_changed=options.rerun_changed,
        fingerprint=fingerprint,
    ).to_run
    with contextlib.suppress(FileNotFoundError):
        (store.root / RUN_FAILURE_FILE).unlink()
    scheduler = None
    if not names:
        if dirty:  # nothing to run and nothing new: a resume of a finished sweep writes nothing
            store.compact(state)
            # What a dead run's workers left is settled in the state now.
            remove_worker_files(store.root)
    else:
        if experiment.cache:
            # A broken cache stops the run before it writes anything: every config stays todo.
            cache.check_cache(store.root)
        store.forget_finished()
        # Started first: worker processes import Python and resweep while the state is written.
        pool = open_pool(options)
        try:
            scheduler = _run_pool(
                experiment, named, store, options, state, names, pool, fingerprint, hooks
            )
        finally:
            pool.close(finished=False)
    counts = state.counts()
    from resweep import summary

    summary_path = store.root / summary.SUMMARY_FILE
    all_done = counts["done"] == len(state.configs)
    if all_done and (scheduler is not None or not summary_path.exists()):
        summary_path = summary.save_summary(store, force=True, state=state)
    if not (counts["todo"] or counts["running"]):
        key = finished
        if key is None:
            key = planning.finished_key(
                experiment.configs,
                experiment.config_naming,
                experiment.name,
                experiment.description,
            )
        if key is not None:
            store.mark_finished(key, counts)
    stop = scheduler.stop if scheduler is not None else None
    # In the state, not in the script: nothing will ever run them, so the report names them.
    absent = [n for n, r in state.configs.items() if n not in named and r["status"] != "done"]
    return RunReport(
        absent=tuple(absent),
        done=counts["done"],
        failed=counts["failed"],
        todo=counts["todo"] + counts["running"],
        interrupted=scheduler.interrupted if scheduler is not None else 0,
        executed=scheduler.executed if scheduler is not None else 0,
        cache_hits=scheduler.cache_hits if scheduler is not None else 0,
        cache_misses=scheduler.cache_misses if scheduler is not None else 0,
        signal=stop.signal_name if stop is not None and stop.requested else None,
        summary=str(summary_path) if all_done else None,
    )


def _run_pool(
    experiment: Declared,
    named: dict[str, NamedConfig],
    store: Store,
    options: RunOptions,
    state: State,
    names: list[str],
    pool: Pool,
    fingerprint: str,
    hooks: Hooks,
) -> Scheduler:
    """Record the session, hand the run to the pool and schedule it to the end."""
    session, session_record = provenance.new_session(
        experiment.function, backend=options.backend, max_workers=options.max_workers
    )
    state.sessions[session] = session_record
    store.compact(state)
    hooks.session, hooks.fingerprint = session, fingerprint
    if options.fresh:
        cache.drop(store.root, names)
    elif options.reuse_calls and experiment.cache:
        # Answer each retried failure from the calls of the attempt that failed.
        for name in names:
            record = state.configs[name]
            if record["status"] == "failed":
                cache.reuse(store.root, name, record.get("attempts", 0))
    setup = experiment.setup
    setup_value = setup.common() if setup is not None and setup.common else None
    (store.root / CONFIGS_DIR).mkdir(exist_ok=True)
    # The last run's markers were read when settling; this run's workers write anew.
    remove_worker_files(store.root)
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
        source_file=str(provenance.source_file(experiment.function) or "") or None,
        stop_file=os.path.join(store.root, WORKERS_DIR, STOP_FILE),
        results_dir=os.path.join(store.root, RESULTS_DIR),
        fail_fast=options.fail_fast,
        retries=experiment.retries,
        report_starts=hooks.wants("on_config_start"),
    )
    writer = StateWriter(store, state)
    try:
        hooks.run_start()
        hooks.check()
        pool.start(job, timeout_s=experiment.timeout_s)
        scheduler = Scheduler(
            job,
            [Task(n, named[n].config) for n in names],
            writer,
            pool,
            retries=experiment.retries,
            progress=options.progress,
            fail_fast=options.fail_fast,
            hooks=hooks,
        )
        with routed_output():
            scheduler.run()
        if scheduler.hooks_ended and not scheduler.stop.hook_interrupted:
            writer.write(sync=True)  # on_config_end comes after the record is synced
            scheduler.fire_hooks(synced=True)
        hooks.check()
    except BaseException as error:
        # Save what can be saved first: the journal already holds every outcome.
        session_record["end_time"] = now_iso()
        with contextlib.suppress(OSError):
            writer.close()
        write_run_failure(store, error)
        raise
    finally:
        close_result_log(job)
    session_record["end_time"] = now_iso()
    writer.close()
    remove_worker_files(store.root)
    return scheduler


def _end_hooks(hooks: Hooks, store: Store, report: RunReport) -> None:
    """on_run_end; a hook that stopped the run (fail_fast) makes it end by its HookError."""
    if not hooks:
        return
    hooks.run_end(report)
    if hooks.failure is not None:
        write_run_failure(store, hooks.failure)
        raise hooks.failure


def write_run_failure(store: Store, error: BaseException) -> None:
    """Leave the reason a run stopped on its own error next to the saved state."""
    if isinstance(error, HookError):
        text = f"{now_iso()} run stopped by a hook that raised\n{error.detail}"
    elif isinstance(error, PluginError) and error.detail:
        text = f"{now_iso()} run stopped by a plugin backend that raised\n{error.detail}"
    elif isinstance(error, KeyboardInterrupt | ResweepError):
        return  # a stop, or an error resweep says in one line: nothing inside resweep failed
    else:
        text = f"{now_iso()} run stopped by an error inside resweep\n" + "".join(
            traceback.format_exception(error)
        )
    with contextlib.suppress(OSError):
        write_atomic(store.root / RUN_FAILURE_FILE, text, durable=False)
