"""What a sweep is doing now, and everything known of one config: what status and show print."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resweep import provenance
from resweep.files import LOG_FILE, WORKERS_DIR, config_path, read_markers, read_started
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
    # The attempt of each config running now, and the last line of its log.txt, if any.
    attempts: dict[str, int] = field(default_factory=dict)
    last_log_lines: dict[str, str] = field(default_factory=dict)
    # The failed configs, the last to fail first.
    recent_failures: list[str] = field(default_factory=list)

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
            "running_details": {
                name: {
                    "start_time": start_time,
                    "attempt": self.attempts.get(name),
                    "last_log_line": self.last_log_lines.get(name),
                }
                for name, start_time in self.running.items()
            },
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
    # With workers, a config handed to a busy worker is queued, not running yet: running are
    # those a worker marks (loky, threads, Dask on a shared filesystem) or was heard to start
    # (Dask), since the time it says.
    queued: list[str] = []
    markers = store.root / WORKERS_DIR
    if running and active is not None and markers.is_dir():
        executing = {name: stamp for name, (_, stamp) in read_markers(markers).items()}
        for name, (attempt, stamp) in (read_started(markers) or {}).items():
            if name not in running or name in executing:
                continue
            # Heard to start in this attempt (an older file gives no attempt, 0).
            if attempt in (0, state.configs[name].get("attempts")):
                executing[name] = stamp
        queued = sorted(n for n in running if n not in executing)
        for name in queued:
            del running[name]
        for name in running:
            if executing[name]:
                started = datetime.datetime.fromtimestamp(executing[name]).astimezone()
                running[name] = started.isoformat(timespec="milliseconds")
    # Longest-running first; those whose start is unknown last.
    running = dict(sorted(running.items(), key=lambda item: _timestamp(item[1])))
    records = state.configs.values()
    failed = [
        (r.get("end_time") or "", n) for n, r in state.configs.items() if r["status"] == "failed"
    ]
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
        attempts={n: state.configs[n].get("attempts") or 1 for n in running},
        last_log_lines={
            n: line for n in running if (line := last_log_line(str(store.root), n)) is not None
        },
        recent_failures=[n for _, n in sorted(failed, reverse=True)],
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


# How far from its end log.txt is read for its last line.
LOG_TAIL_BYTES = 4096


def last_log_line(root: str, name: str) -> str | None:
    """The last non-empty line of a config's log.txt, or None when it has none (yet)."""
    path = os.path.join(config_path(root, name), LOG_FILE)
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - LOG_TAIL_BYTES))
            tail = log.read().decode("utf-8", "replace")
    except OSError:
        return None
    # A line cut by the tail's start is still its end: better than nothing.
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line and not line.startswith("--- attempt ")]
    return lines[-1] if lines else None


def duration_text(seconds: float) -> str:
    """12s, 3m05s, 2h07m: how long something has run, as a clock would say it."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _timestamp(iso_time: str | None) -> float:
    """Seconds since the epoch of an ISO time; infinity when unknown or unreadable."""
    if iso_time:
        try:
            return datetime.datetime.fromisoformat(iso_time).timestamp()
        except ValueError:
            pass
    return float("inf")


def _seconds_since(iso_time: str | None, now: float) -> float | None:
    stamp = _timestamp(iso_time)
    return None if stamp == float("inf") else now - stamp


def _since(iso_time: str, now: float) -> str:
    """'started 10:12:34 (13s ago)': the clock time alone when it was today."""
    stamp = _timestamp(iso_time)
    if stamp == float("inf"):
        return f"started {iso_time}"
    started = datetime.datetime.fromtimestamp(stamp).astimezone()
    today = datetime.datetime.fromtimestamp(now).astimezone().date() == started.date()
    shown = started.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S")
    return f"started {shown} ({duration_text(now - stamp)} ago)"


# A snapshot shows this many failures, the most recent ones.
SNAPSHOT_FAILURES = 5
BAR_WIDTH = 30
# Config names shorter than this are padded to the longest running one.
NAME_COLUMN = 40


def snapshot_lines(
    report: StatusReport,
    *,
    width: int = 100,
    height: int | None = None,
    now: float | None = None,
) -> list[str]:
    """What a sweep is doing now, a few lines that fit width (and height): the counts and a
    bar, the configs running now with their elapsed time, attempt and last log line (longest
    running first), and the recent failures. `status --watch` and Enter during a run print it."""
    now = time.time() if now is None else now
    counts = report.counts
    finished = counts.get("done", 0) + counts.get("failed", 0)
    filled = BAR_WIDTH * finished // report.total if report.total else 0
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    title = report.name or "experiment"
    head = [
        f"{title}: [{bar}] {finished}/{report.total}  "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    ]
    active = report.active_run
    if active is None:
        head.append("no run is active")
    else:
        head.append(
            f"run: pid {active.pid} on host {active.host}, {_since(active.start_time, now)}"
        )
    body: list[str] = []
    if report.running:
        body.append(f"running now ({len(report.running)}):")
        # Names padded to a column, so that the last log lines start one under the other.
        column = min(NAME_COLUMN, max(len(name) for name in report.running))
        for name, start_time in report.running.items():
            elapsed = _seconds_since(start_time, now)
            shown = duration_text(elapsed) if elapsed is not None else "?"
            line = f"  {shown:>7}  attempt {report.attempts.get(name, 1)}  {name:<{column}}"
            last = report.last_log_lines.get(name)
            body.append((line + (f"  | {last}" if last else "")).rstrip())
    if report.queued:
        body.append(f"{len(report.queued)} more handed to busy workers, not started yet")
    if report.recent_failures:
        shown_failures = report.recent_failures[:SNAPSHOT_FAILURES]
        body.append(f"recent failures ({len(shown_failures)} of {len(report.recent_failures)}):")
        for name in shown_failures:
            body.append(f"  {name}: {report.failures.get(name) or 'failed'}")
    if height is not None and len(head) + len(body) > height:
        # Keep the head and the first lines of the body; say how many are left out.
        keep = max(0, height - len(head) - 1)
        body = [*body[:keep], f"... {len(body) - keep} more lines (a taller terminal shows them)"]
    return [_fit(line, width) for line in head + body]


def _fit(line: str, width: int) -> str:
    """line cut to width columns, so that a redraw in place knows how many lines it wrote
    (a CJK character or an emoji takes two, a combining mark none)."""
    line = "".join(c if c.isprintable() else " " for c in line)
    if sum(map(_columns, line)) <= width:
        return line
    room = max(0, width - 3)
    kept, used = [], 0
    for character in line:
        if used + _columns(character) > room:
            break
        kept.append(character)
        used += _columns(character)
    return "".join(kept) + "..."[: max(0, width - used)]


def _columns(character: str) -> int:
    """How many terminal columns a printable character takes."""
    import unicodedata

    if unicodedata.combining(character):
        return 0
    return 2 if unicodedata.east_asian_width(character) in ("W", "F") else 1


def printable(text: str) -> str:
    """text with every control character escaped (\\x1b), so that no error line a config
    raised can move the cursor or clear the screen of whoever reads status."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
