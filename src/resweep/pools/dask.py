"""The Dask pool: a cluster to run configs on, whose outcomes are landed here."""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import distributed

from resweep import cache
from resweep.clock import now_iso
from resweep.durable import fault_text, is_write_fault, write_atomic
from resweep.errors import ResweepError
from resweep.files import (
    WORKERS_DIR,
    append_log,
    clear_earlier_attempt,
    config_path,
    note_started,
    write_failure,
)
from resweep.pools.base import Returned, batch_size, timeout_reason
from resweep.pools.dask_remote import SCRATCH_PREFIX, JobPlugin, Shipment, run_remote, topic
from resweep.worker import (
    Job,
    Outcome,
    Task,
    error_line,
    keep_result,
    pickle_job,
    unstorable,
)

# Configs out on the cluster per worker thread (running or queued at the scheduler).
DASK_QUEUED_PER_THREAD = 8
# Configs faster than this on average travel several to a task (a lost worker re-runs its
# whole batch, so slower ones go one per task). Each also costs about DASK_CONFIG_OVERHEAD_S
# outside its function: scratch directory, scratch cache, shipping back, landing.
DASK_BATCH_BELOW_S = 0.02
DASK_CONFIG_OVERHEAD_S = 0.001
# distributed's API is only partly annotated; resweep calls the unannotated part through Any.
_distributed: Any = distributed
# How long connecting to a scheduler may take before the run gives up.
CONNECT_TIMEOUT_S = 20.0
# How often the coordinator asks the scheduler how many threads the cluster has now.
CLUSTER_SIZE_EVERY_S = 2.0
# How long closing the client and a local cluster may take at the end of a run.
CLOSE_TIMEOUT_S = 10.0
# How long configs may wait on a cluster without a single worker before the run says so.
NO_WORKERS_NOTICE_S = 5.0


# -- coordinator side ----------------------------------------------------------------------


def _quiet_dask_logs() -> None:
    """A client that lost its scheduler logs every reconnect attempt; resweep says it once."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("distributed", "tornado"))]
    for name in ["distributed", "tornado", *names]:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


class DaskPool:
    """A Dask client as a pool: one task per batch of configs, results landed here."""

    inline = False
    # A batch that kills its worker is Dask's to re-run; other batches go on.
    isolates_batches = True

    def __init__(self, address: str | None, max_workers: int) -> None:
        self.address = address
        self.client: Any = None
        # Set when this run started the cluster itself (no --scheduler): closed at the end.
        self.cluster: Any = None
        self.where = (
            "the local Dask cluster" if address is None else f"the Dask scheduler at {address}"
        )
        self.max_workers = max_workers
        self.executor: Any = None
        self.futures: dict[Future[Any], list[Task]] = {}
        self.keys: dict[Future[Any], str] = {}
        # Task key -> (config, attempt, worker address, when its start was heard), for timeout_s:
        # the config of a batch that started last is the one running.
        self.started: dict[str, tuple[str, int, str, float]] = {}
        # The keys of the tasks out now: a start heard late from a dropped task is ignored.
        self._live: set[str] = set()
        # Config -> attempt, for every config a worker was heard to start since it was last sent
        # out: a retry sent again is not running until its own start is heard.
        self.heard: dict[str, int] = {}
        self.job: Job | None = None
        self.timeout_s: float | None = None
        self.cache: Any = None
        # The configs with recorded calls: only those need a cache lookup when sent out.
        self.recorded: set[str] = set()
        self._seq = itertools.count()
        self._size = (0, -CLUSTER_SIZE_EVERY_S)
        self._plugin: str | None = None
        # Writing results is disk-bound: a few threads keep up with many workers.
        self._writers = ThreadPoolExecutor(4, thread_name_prefix="resweep-land")
        self._probe: Path | None = None
        self.queue_dropped = False
        self._closed = False
        # Since when configs are out on a cluster that has no worker (monotonic), or None.
        self._no_workers_since: float | None = None

    def _connect(self) -> None:
        """Connect to the scheduler at address, or start a local cluster of max_workers processes."""
        if self.address is None:
            try:
                self.cluster = _distributed.LocalCluster(
                    n_workers=self.max_workers,
                    threads_per_worker=1,
                    processes=True,
                    # Any free port: a fixed one clashes with other clusters on the machine.
                    dashboard_address=":0",
                    silence_logs=logging.CRITICAL,
                )
                self.client = _distributed.Client(self.cluster)
            except Exception as error:
                _quiet_dask_logs()
                raise ResweepError(
                    f"could not start a local Dask cluster of {self.max_workers} workers "
                    f"({error_line(error)}); nothing ran, run again"
                ) from None
        else:
            try:
                self.client = _distributed.Client(self.address, timeout=CONNECT_TIMEOUT_S)
            except Exception as error:
                raise ResweepError(
                    f"cannot reach the Dask scheduler at {self.address} ({error_line(error)}); "
                    "start it, or check --scheduler"
                ) from None
        self.executor = self.client.get_executor(pure=False)

    def start(self, job: Job, *, timeout_s: float | None) -> None:
        """Hand the run to every worker, and let them tell whether they see output_dir."""
        blob = pickle_job(job)
        self._connect()
        self.job = job
        self.timeout_s = timeout_s
        # Each config's start, not its batch's: timeout_s counts from it, hooks hear of it.
        report_starts = timeout_s is not None or job.report_starts
        if job.cache:
            self.cache = cache.open_cache(job.output_dir)
            self.recorded = cache.tags(self.cache)
        probe = Path(job.output_dir, WORKERS_DIR, f"probe-{job.token}")
        probe.parent.mkdir(exist_ok=True)
        write_atomic(probe, job.token, durable=False)
        self._probe = probe
        self.client.subscribe_topic(topic(job.token), self._heard_start)
        self._plugin = f"{SCRATCH_PREFIX}{job.token}"
        plugin = JobPlugin(job.token, blob, report_starts, own_cluster=self.cluster is not None)
        self.client.register_plugin(plugin, name=self._plugin)

    def _heard_start(self, event: tuple[float, Any]) -> None:
        key, configs, worker = event[1]
        if key not in self._live:
            return
        heard = [(str(name), int(attempt)) for name, attempt in configs]
        for name, attempt in heard:
            self.heard[name] = attempt
        if self.job is not None:
            # On disk too: if this coordinator dies, the next run knows these attempts happened,
            # and `status` shows them running since the time the scheduler logged the start.
            when = event[0] if isinstance(event[0], float) else time.time()
            with contextlib.suppress(OSError):
                note_started(Path(self.job.output_dir, WORKERS_DIR), heard, when)
        name, attempt = configs[-1]
        self.started[str(key)] = (str(name), int(attempt), str(worker), time.monotonic())

    def capacity(self) -> int:
        """A Dask result crosses the network twice; more configs queued hide that delay."""
        return DASK_QUEUED_PER_THREAD * max(self.max_workers, self.slots())

    def batch_size(self, mean_config_s: float | None, pending: int) -> int:
        # A lost Dask worker re-runs its batch: a slow config is its own task.
        if mean_config_s is not None and mean_config_s >= DASK_BATCH_BELOW_S:
            return 1
        workers = max(self.max_workers, self.slots())
        return batch_size(mean_config_s, DASK_CONFIG_OVERHEAD_S, pending, workers)

    def submit(self, batches: list[list[Task]]) -> None:
        """Send batches of configs to the cluster, each with the calls its configs recorded."""
        assert self.job is not None
        for batch in batches:
            for task in batch:
                self.heard.pop(task.name, None)
            recorded = {}
            if self.cache is not None:
                for task in batch:
                    if task.name in self.recorded:
                        recorded[task.name] = cache.calls_of(self.cache, task.name)
            key = f"{SCRATCH_PREFIX}{self.job.token[:8]}-{next(self._seq)}"
            future: Future[Any] = self.executor.submit(
                run_remote, self.job.token, batch, recorded, key=key
            )
            self.keys[future] = key
            self._live.add(key)
            self.futures[future] = batch

    def out(self) -> int:
        return len(self.futures)

    def wait(self, timeout_s: float, in_flight: dict[str, Task], *, stopping: bool) -> Returned:
        """Land what came back; watch the scheduler, the stop and overdue configs."""
        returned = Returned()
        finished, _ = wait(list(self.futures), timeout=timeout_s, return_when=FIRST_COMPLETED)
        if finished:
            self._collect(finished, in_flight, returned)
        if not self.alive():
            raise self.lost()
        if stopping and not self.queue_dropped:
            # Configs no worker has started do not hold the stop up; this attempt did not happen.
            self.queue_dropped = True
            for future in self.unstarted(list(self.futures)):
                for task in self._drop(future):
                    returned.again.append((task, _not_started(task)))
        if self.timeout_s is not None:
            self._stop_overdue(in_flight, returned)
        return returned

    def _collect(
        self, finished: set[Future[Any]], in_flight: dict[str, Task], returned: Returned
    ) -> None:
        """Record every config that came back; write its files and calls under output_dir."""
        shipped: list[tuple[Outcome, Shipment]] = []
        try:
            for future in finished:
                batch = self.futures.pop(future)
                pairs = self._outcomes(future, batch)
                if pairs is None:
                    # Its batch killed every worker it ran on: the same attempt runs again, alone.
                    returned.suspects += [(task, _not_started(task)) for task in batch]
                    continue
                for outcome, shipment in pairs:
                    task = in_flight.get(outcome.name)
                    # Only the first outcome of an attempt counts.
                    if task is None or task.attempt != outcome.attempt:
                        continue
                    returned.outcomes.append(outcome)
                    if shipment is not None:
                        shipped.append((outcome, shipment))
        finally:
            # Even when the scheduler is lost, what did come back is written (and then recovered).
            if len(shipped) > 1:
                list(self._writers.map(lambda pair: self.land(*pair), shipped))
            elif shipped:
                self.land(*shipped[0])

    def _stop_overdue(self, in_flight: dict[str, Task], returned: Returned) -> None:
        """Fail configs that outlived timeout_s and restart their workers."""
        assert self.timeout_s is not None
        by_name = {task.name: future for future, batch in self.futures.items() for task in batch}
        stuck = []
        for name, worker in self.overdue(in_flight, self.timeout_s):
            future = by_name[name]
            if future not in self.futures:
                continue
            for task in self._drop(future):
                if task.name != name:
                    # The rest of its batch: outcomes lost with the task, the same attempt again.
                    returned.again.append((task, _not_started(task)))
                    continue
                returned.failed.append((task, timeout_reason(self.timeout_s)))
            stuck.append(worker)
        if stuck:
            # Code blocked in C cannot be interrupted: its worker process is restarted instead.
            self.restart(stuck)

    def _drop(self, future: Future[Any]) -> list[Task]:
        """Take a task off the cluster; its configs are no longer out."""
        batch = self.futures.pop(future)
        self.cancel(future)
        return batch

    def alive(self) -> bool:
        return self.client is not None and bool(self.client.status == "running")

    def lost(self) -> ResweepError:
        _quiet_dask_logs()
        return ResweepError(
            f"lost {self.where}; every finished config is saved, run again once it is back"
        )

    def slots(self) -> int:
        """How many configs the cluster runs at once now (its threads), asked every few seconds."""
        size, asked = self._size
        now = time.monotonic()
        if now - asked >= CLUSTER_SIZE_EVERY_S:
            with contextlib.suppress(Exception):
                size = sum(self.client.nthreads().values())
            self._size = (size, now)
        return size

    def waiting(self) -> str | None:
        """What the run waits for: a cluster that has had no worker for NO_WORKERS_NOTICE_S."""
        if not self.futures or self.slots() > 0:
            self._no_workers_since = None
            return None
        now = time.monotonic()
        if self._no_workers_since is None:
            self._no_workers_since = now
        if now - self._no_workers_since < NO_WORKERS_NOTICE_S:
            return None
        address = self.address
        with contextlib.suppress(Exception):
            address = str(self.client.scheduler.address)
        return (
            f"waiting for workers on {address}: the cluster has none; start one "
            f"(`dask worker {address}`) or press Ctrl-C"
        )

    def _outcomes(
        self, future: Future[Any], batch: list[Task]
    ) -> list[tuple[Outcome, Shipment | None]] | None:
        """One batch's outcomes and shipments; None when its configs must each run alone."""
        self._forget(future)
        which = f"config {batch[0].name!r}" + (
            f" (and {len(batch) - 1} more)" if len(batch) > 1 else ""
        )
        try:
            pairs = future.result()
        except CancelledError:
            if not self.alive():
                raise self.lost() from None
            raise ResweepError(
                f"the Dask cluster cancelled {which} (was it restarted?); "
                "every finished config is saved, run again"
            ) from None
        except distributed.KilledWorker as error:
            if len(batch) > 1:
                return None
            # Dask re-ran it on other workers first: this config kills the workers it runs on.
            (task,) = batch
            return [(Outcome(
                task.name, False, None,
                f"worker died: {error.allowed_failures + 1} Dask workers died running it",
                now_iso(), now_iso(), 0.0, task.attempt,
            ), None)]  # fmt: skip
        except Exception as error:
            if not self.alive():
                raise self.lost() from None
            raise ResweepError(
                f"a Dask worker could not run {which}: {error_line(error)}; the "
                "workers need the same Python packages as this machine"
            ) from None
        assert isinstance(pairs, list) and len(pairs) == len(batch)
        return pairs

    def land(self, outcome: Outcome, shipment: Shipment) -> None:
        """Write a remote config's calls, log and result file, before its outcome is journaled."""
        assert self.job is not None
        if land(self.job, self.cache, outcome, shipment):
            self.recorded.add(outcome.name)

    def unstarted(self, futures: Iterable[Future[Any]]) -> list[Future[Any]]:
        """The futures whose config no worker has taken yet (a graceful stop drops them)."""
        with contextlib.suppress(Exception):
            processing = {key for keys in self.client.processing().values() for key in keys}
            waiting = []
            for future in futures:
                key = self.keys.get(future)
                state = self.client.futures.get(key) if key is not None else None
                if key not in processing and getattr(state, "status", None) == "pending":
                    waiting.append(future)
            return waiting
        return []

    def _forget(self, future: Future[Any]) -> str | None:
        """The key of a task that is no longer out, which stops counting toward timeouts."""
        key = self.keys.pop(future, None)
        if key is not None:
            self._live.discard(key)
            self.started.pop(key, None)
        return key

    def overdue(self, in_flight: dict[str, Task], timeout_s: float) -> list[tuple[str, str]]:
        """(config, worker) for every config that has run longer than timeout_s on a worker."""
        now = time.monotonic()
        late = []
        for name, attempt, worker, heard in list(self.started.values()):
            task = in_flight.get(name)
            if task is not None and task.attempt == attempt and now - heard > timeout_s:
                late.append((name, worker))
        return late

    def cancel(self, future: Future[Any]) -> None:
        """Drop one batch's task; a worker already running it is restarted separately."""
        key = self._forget(future)
        future.cancel()
        if key is not None:
            with contextlib.suppress(Exception):
                self.client.cancel([key], force=True)

    def restart(self, workers: Iterable[str]) -> None:
        """Restart these workers (through their nannies) to stop configs that outlived timeout_s."""
        addresses = sorted(set(workers))

        def restart() -> None:
            try:
                states = self.client.restart_workers(addresses, raise_for_error=False)
            except Exception as error:
                states = {a: error_line(error) for a in addresses}
            for address, state in dict(states).items():
                if state != "OK":
                    print(
                        f"resweep: could not restart Dask worker {address} ({state}); a config "
                        "that timed out may still be running there",
                        file=sys.__stderr__,
                        flush=True,
                    )

        threading.Thread(target=restart, name="resweep-restart", daemon=True).start()

    def stop(self, *, kill: bool) -> None:
        """Cancel every task of this run still on the cluster (a stop, or an error)."""
        keys = list(self.keys.values())
        self.keys.clear()
        self._live.clear()
        self.futures.clear()
        if keys and self.alive():
            with contextlib.suppress(Exception):
                self.client.cancel(keys, force=True)

    def executing(self) -> set[str] | None:
        """The configs a worker was heard to start: one never started did not use an attempt."""
        return set(self.heard)  # one C-level copy: the client's thread adds to it meanwhile

    def close(self, *, finished: bool = True) -> None:
        """Take the run off the workers; close the client, and the cluster this run started."""
        if self._closed:
            return
        self._closed = True
        self._writers.shutdown(wait=True)
        if self._probe is not None:
            with contextlib.suppress(OSError):
                self._probe.unlink()
        if self.client is None:
            pass
        elif self.alive():
            self.stop(kill=True)
            if self._plugin is not None:
                with contextlib.suppress(Exception):
                    self.client.unregister_worker_plugin(self._plugin)
        else:
            _quiet_dask_logs()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close(timeout=CLOSE_TIMEOUT_S)
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close(timeout=CLOSE_TIMEOUT_S)


def _not_started(task: Task) -> dict[str, Any]:
    """The record of a config whose attempt is to run again as if it had not started."""
    return {"status": "todo", "attempts": task.attempt - 1}


def land(job: Job, calls: Any, outcome: Outcome, shipment: Shipment) -> bool:
    """Keep what a remote config shipped under output_dir; whether it recorded calls.

    A storage fault is set on the outcome: the config stays todo and the run stops.
    """
    if outcome.fault is not None:
        return False
    config_dir = config_path(job.output_dir, outcome.name)
    try:
        recorded = bool(shipment.entries and calls is not None)
        if recorded:
            cache.add_calls(calls, outcome.name, shipment.entries)
        clear_earlier_attempt(config_dir)
        append_log(config_dir, shipment.log)
        if outcome.ok:
            keep_result(job, outcome)
        elif shipment.trace is not None:
            write_failure(config_dir, outcome.attempt, outcome.end_time, shipment.trace)
    except OSError as exc:
        if not is_write_fault(exc):
            unstorable(outcome, exc)
            return False
        outcome.fault = fault_text(exc)
        return False
    except Exception as exc:  # a result that cannot be encoded: this config's failure alone
        unstorable(outcome, exc)
        return False
    return recorded
