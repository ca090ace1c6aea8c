"""What became of configs a run left running: the one rule for settling them."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from resweep.clock import now_iso
from resweep.files import WORKERS_DIR, config_path, read_markers, read_result
from resweep.state import State
from resweep.store import Store

# done: its result file made it; not_started: queued behind a busy worker, so that attempt did
# not happen; interrupted: cut off while it ran, so it runs again.
Fate = Literal["done", "not_started", "interrupted"]


@dataclass(frozen=True)
class Settled:
    """A config's fate and the fields its record takes for it."""

    fate: Fate
    fields: dict[str, Any]


def settle(
    root: str, name: str, attempt: int, executing: Collection[str] | None, *, interruptions: int
) -> Settled:
    """The fate of one attempt that no outcome reported.

    executing: the configs worker processes said they were running, or None when unknown
    (threads and remote workers leave no trace); interruptions: the record's count so far.
    """
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
    return set(read_markers(markers)) if os.path.isdir(markers) else None


def settle_left_running(state: State, root: str, *, count: bool = True) -> list[str]:
    """Settle in state the configs a dead run left running; returns their names.

    Without count, an interruption is not added to the record: a reader shows the state as
    the next run will settle it, without writing it.
    """
    left = [name for name, record in state.configs.items() if record["status"] == "running"]
    if not left:
        return []
    executing = executing_configs(root)
    for name in left:
        record = state.configs[name]
        settled = settle(
            root,
            name,
            record.get("attempts", 1),
            executing,
            interruptions=record.get("interruptions", 0),
        )
        fields = settled.fields
        if settled.fate == "interrupted" and not count:
            fields = {k: v for k, v in fields.items() if k != "interruptions"}
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
