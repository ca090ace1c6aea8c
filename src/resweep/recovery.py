"""What became of configs a run left running: the one rule for settling them."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from resweep.clock import now_iso
from resweep.errors import StateError
from resweep.files import (
    RESULTS_DIR,
    WORKERS_DIR,
    ResultsIndex,
    StoredResult,
    config_path,
    marker_pid,
    read_markers,
    read_result,
    read_started,
)
from resweep.processes import kill_tree
from resweep.state import State
from resweep.store import Store

# Finished results a run's workers wrote, by (name, attempt): see finished_results.
Results = Mapping[tuple[str, int], StoredResult]

# done: its result made it to a results file; not_started: queued behind a busy worker, so that attempt did
# not happen; interrupted: cut off while it ran, so it runs again.
Fate = Literal["done", "not_started", "interrupted"]


@dataclass(frozen=True)
class Settled:
    """A config's fate and the fields its record takes for it."""

    fate: Fate
    fields: dict[str, Any]


def finished_results(root: str | os.PathLike[str]) -> ResultsIndex:
    """The results the workers of the last (or this) run wrote, read once for many settles
    (refresh() it to take in what they wrote since)."""
    return ResultsIndex(os.path.join(root, RESULTS_DIR)).refresh()


def settle(
    root: str,
    name: str,
    attempt: int,
    executing: Collection[str] | None,
    *,
    interruptions: int,
    results: Results,
    session: str | None,
) -> Settled:
    """The fate of one attempt that no outcome reported.

    executing: the configs worker processes said they were running, or None when unknown
    (threads and remote workers leave no trace); interruptions: the record's count so far;
    results: finished_results(root); session: the run session that started the attempt,
    whose workers' results alone count (None: a run of an earlier version, which kept none).
    """
    found = results.get((name, attempt))
    if found is not None and found.session != session:
        found = None  # a line from another run's files (copied in, or linked): not this attempt's
    if found is None:
        # A directory that an earlier version of resweep left running keeps results there.
        found = read_result(config_path(root, name))
    if found is not None and found.attempt == attempt:
        return Settled("done", found.fields())
    if executing is not None and name not in executing:
        return Settled("not_started", {"status": "todo", "attempts": max(0, attempt - 1)})
    fields = {"status": "todo", "end_time": now_iso(), "interruptions": interruptions + 1}
    return Settled("interrupted", fields)


def executing_configs(root: str) -> set[str] | None:
    """The configs worker processes of the last run were running, or None when it had none."""
    markers = os.path.join(root, WORKERS_DIR)
    if not os.path.isdir(markers):
        return None
    # Worker processes leave markers; a Dask run also lists what its workers were heard to start.
    return set(read_started(markers) or ()) | set(read_markers(markers))


# How long a run waits for a worker of a dead run to die once it was sent SIGKILL, or for one on
# another host to end its config, before it gives up and says so.
ORPHAN_WAIT_S = 60.0


def stop_orphans(root: str, wait_s: float = ORPHAN_WAIT_S) -> list[int]:
    """Kill the worker processes a dead run left running configs, and wait until they are gone.

    A worker holds an flock on its marker file while it runs a config, so a held lock is a
    living worker inside a config (a pid alone could have been reused). Workers on this host
    are killed with what they started; for one on another host that shares output_dir, the run
    waits. Returns the pids that were stopped. Two executions of one config never overlap: the
    new run starts none before this returns.
    """
    import fcntl
    import socket
    import time

    markers = os.path.join(root, WORKERS_DIR)
    try:
        entries = list(os.scandir(markers))
    except (FileNotFoundError, NotADirectoryError):
        return []
    here = socket.gethostname()
    stopped = []
    for entry in entries:
        owner = marker_pid(entry.name)
        if owner is None:
            continue
        host, pid = owner
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            deadline = time.monotonic() + wait_s
            killed = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break  # nobody holds it: that process is gone
                except BlockingIOError:
                    pass
                if host == here and pid != os.getpid() and not killed:
                    kill_tree(pid)  # with what the config started: none of its work goes on
                    killed = True
                    stopped.append(pid)
                if time.monotonic() > deadline:
                    where = "" if host == here else f" on host {host}"
                    raise StateError(
                        f"a worker process of a run that is gone (pid {pid}{where}) still runs a "
                        f"config of {root}; stop it, then run again"
                    )
                time.sleep(0.01)
        finally:
            os.close(fd)
    return stopped


def settle_left_running(state: State, root: str, *, count: bool = True) -> list[str]:
    """Settle in state the configs a dead run left running; returns their names.

    Without count, an interruption is not added to the record: a reader shows the state as
    the next run will settle it, without writing it.
    """
    left = [name for name, record in state.configs.items() if record["status"] == "running"]
    if not left:
        return []
    executing = executing_configs(root)
    results = finished_results(root)
    for name in left:
        record = state.configs[name]
        settled = settle(
            root,
            name,
            record.get("attempts", 1),
            executing,
            interruptions=record.get("interruptions", 0),
            results=results,
            session=record.get("session"),
        )
        fields = settled.fields
        if settled.fate == "interrupted" and not count:
            # A reader shows the state as a run will settle it, without counting or stamping.
            fields = {"status": fields["status"]}
        record.update(fields)
    return left


def read_settled(store: Store) -> tuple[State, list[str]]:
    """The state a reader should believe, and the configs a dead run left running in it.

    With no run active, configs left running read as the next run will settle them.
    """
    state = store.read()
    left: list[str] = []
    if state.counts()["running"] and store.active_run() is None:
        left = settle_left_running(state, str(store.root), count=False)
    return state, left


def read_one_settled(store: Store, name: str) -> State:
    """store.read_one, with the config settled if a dead run left it running."""
    state = store.read_one(name)
    if state.counts()["running"] and store.active_run() is None:
        settle_left_running(state, str(store.root), count=False)
    return state
