"""What a sweep is doing now, and everything known of one config: what status and show print."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resweep import provenance
from resweep.files import WORKERS_DIR, read_markers
from resweep.lock import RunInfo
from resweep.recovery import read_one_settled, read_settled
from resweep.selection import Selection
from resweep.state import State
from resweep.store import Store


@dataclass(frozen=True)
class StatusReport:
    """The experiment's state as `status` shows it; a notebook gets the same from the API."""

    name: str | None
    # Counts by status: todo, running, done, failed.
    counts: dict[str, int]
    total: int
    # Configs running now, by name: when they really started (ISO time), if known.
    running: dict[str, str | None]
    # Handed to a busy worker process, not started yet.
    queued: list[str]
    # The run holding the experiment, or None.
    active_run: RunInfo | None
    # Configs a run that is gone left running, by name: the status they settle to.
    left_running: dict[str, str]
    # Failed configs by name: their error.
    failures: dict[str, str | None]
    cache_hits: int
    cache_misses: int
    # Done configs produced by code that differs from the current code, by name: what changed.
    changed: dict[str, str] = field(default_factory=dict)
    # The functions, classes and constants that changed since the configs whose function changed
    # were run, by name; None when the sessions that ran them did not record their code.
    changed_code: list[str] | None = None

    @property
    def function_changed(self) -> int:
        """Done configs whose function, or code it calls inside the project, has changed since."""
        return sum(why == provenance.FUNCTION_CHANGED for why in self.changed.values())

    @property
    def changed_warning(self) -> str | None:
        """The warning about done configs that another version of the function produced."""
        count = self.function_changed
        if not count:
            return None
        if self.changed_code:
            what = f"before changes to {', '.join(self.changed_code[:8])}"
            what += ", ..." if len(self.changed_code) > 8 else ""
        else:
            what = "by a different version of the experiment function or code it calls"
        return (
            f"warning: {count} done configs were produced {what}; "
            "`run --rerun-changed` re-runs them, `run --dry-run --rerun-changed` lists them"
        )

    @property
    def changed_note(self) -> str | None:
        """One quiet line about done configs whose module changed elsewhere, or None."""
        count = len(self.changed) - self.function_changed
        if not count:
            return None
        return (
            f"{count} done configs were produced before edits elsewhere in the function's module; "
            "the function and the code it calls are unchanged, so they count as current"
        )

    def as_json(self, *, failed: bool = False) -> dict[str, Any]:
        """The report as plain data: what `status --json` prints."""
        warning = self.changed_warning
        payload: dict[str, Any] = {
            "name": self.name,
            "counts": self.counts,
            "total": self.total,
            "running": self.running,
            "queued": self.queued,
            "active_run": self.active_run.__dict__ if self.active_run else None,
            "left_running": self.left_running,
            "cache": {"hits": self.cache_hits, "misses": self.cache_misses},
            "changed": len(self.changed),
            "function_changed": self.function_changed,
            "changed_code": self.changed_code,
            "warnings": [warning] if warning else [],
            "notes": [note] if (note := self.changed_note) else [],
        }
        if failed:
            payload["failed"] = self.failures
        return payload


def status_report(
    store: Store,
    fingerprint: str | None,
    selection: Selection | None = None,
    *,
    code: Mapping[str, str] | None = None,
) -> StatusReport:
    """Read the experiment once and say what it is doing; fingerprint: the current code's, and
    code its provenance.code_digests, to name what changed.

    With a selection, only the configs it selects count.
    """
    state, left = read_settled(store)
    if selection is not None and not selection.everything:
        chosen = selection.choose({n: r.get("params") for n, r in state.configs.items()})
        state.configs = {n: state.configs[n] for n in chosen}
        left = [n for n in left if n in state.configs]
    running: dict[str, str | None] = {
        n: r.get("start_time") for n, r in state.configs.items() if r["status"] == "running"
    }
    active = store.active_run()
    # With worker processes, a config handed to a busy worker is queued, not running yet.
    queued: list[str] = []
    markers = store.root / WORKERS_DIR
    if running and active is not None and markers.is_dir():
        executing = read_markers(markers)
        queued = sorted(n for n in running if n not in executing)
        for name in queued:
            del running[name]
        for name in running:
            started = datetime.datetime.fromtimestamp(executing[name][1]).astimezone()
            running[name] = started.isoformat(timespec="milliseconds")
    records = state.configs.values()
    changed = provenance.changed_configs(state.configs, fingerprint) if fingerprint else {}
    return StatusReport(
        name=state.name,
        counts=state.counts(),
        total=len(state.configs),
        running=running,
        queued=queued,
        active_run=active,
        left_running={n: state.configs[n]["status"] for n in left},
        failures={n: r.get("error") for n, r in state.configs.items() if r["status"] == "failed"},
        cache_hits=sum(r.get("cache_hits") or 0 for r in records),
        cache_misses=sum(r.get("cache_misses") or 0 for r in records),
        changed=changed,
        changed_code=_changed_code(state, changed, code),
    )


def _changed_code(
    state: State, changed: Mapping[str, str], code: Mapping[str, str] | None
) -> list[str] | None:
    """What changed since the sessions that ran the configs whose function changed, by name."""
    if code is None:
        return None
    names: set[str] = set()
    sessions = {
        state.configs[n].get("session")
        for n, why in changed.items()
        if why == provenance.FUNCTION_CHANGED
    }
    for session in sessions:
        record = state.sessions.get(session) if isinstance(session, str) else None
        differ = provenance.changed_code(
            record.get("code") if isinstance(record, Mapping) else None, code
        )
        if differ is None:
            return None  # run by a resweep that did not record it: no telling
        names.update(differ)
    return sorted(names) or None


def config_report(
    store: Store, name: str, fingerprint: str | None, *, code: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Everything recorded about one config, with its run's provenance: what `show` prints."""
    state: State = read_one_settled(store, name)
    record = state.lookup(name)
    shown: dict[str, Any] = {"name": name, **record}
    shown["provenance"] = provenance.describe_session(record.get("session"), state.sessions)
    if record.get("fingerprint") is not None and fingerprint is not None:
        if not provenance.comparable(record["fingerprint"]):
            shown["code"] = "cannot tell, its fingerprint is in an older or unknown format"
        else:
            why = provenance.compare(record["fingerprint"], fingerprint)
            shown["code"] = "matches the current code" if why is None else f"differs, {why}"
            session = state.sessions.get(record.get("session") or "")
            if why == provenance.FUNCTION_CHANGED and isinstance(session, Mapping) and code:
                differ = provenance.changed_code(session.get("code"), code)
                if differ:
                    shown["code"] += f" ({', '.join(differ)})"
    return shown
