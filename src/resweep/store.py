"""The state's files: read with the journal applied, compacted, written by one writer."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any

from resweep import lock
from resweep.durable import file_version, write_atomic
from resweep.errors import ResweepWarning, StateError
from resweep.journal import Journal, apply_entries, read_journal
from resweep.lock import RunInfo
from resweep.state import (
    RESTORE_HINT,
    STATUSES,
    State,
    dump_state,
    parse_one,
    parse_state_checked,
)

STATE_FILE = "experiment.yaml"
JOURNAL_FILE = "journal.jsonl"
# Left by a run after which nothing was left to run: the next run can skip naming and reading.
FINISHED_FILE = ".finished.json"
# How often a reader starts again when a compaction replaced the state file under it: a run
# that compacts often, on a busy machine, can do so several times in a row.
READ_TRIES = 50


class Store:
    """The files of one experiment directory and the only code that writes the state."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.root = Path(output_dir).absolute()
        self.state_path = self.root / STATE_FILE
        self.journal_path = self.root / JOURNAL_FILE
        self.finished_path = self.root / FINISHED_FILE

    def exists(self) -> bool:
        return self.state_path.exists()

    def ensure_dir(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StateError(
                f"output_dir {self.root} is a file; move it away or give a directory as output_dir"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StateError(
                f"cannot create output_dir {self.root}: {error.strerror}; create it yourself "
                "or give an output_dir you can write to"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StateError(
                f"output_dir {self.root} is not writable; fix its permissions or give another "
                "output_dir (status and show only read it)"
            )

    def _state_version(self) -> list[int] | None:
        """The state file's inode, mtime and size, and a checksum: an edit within the same
        clock tick keeps the first three."""
        try:
            version = file_version(self.state_path)
            checksum = zlib.crc32(self.state_path.read_bytes())
        except OSError:
            return None
        return [*version, checksum]

    def mark_finished(self, key: str, counts: dict[str, int]) -> None:
        """Remember that with the configs behind key, this very state file left nothing to run."""
        version = self._state_version()
        if version is None or self.journal_path.exists():
            return
        record = {"configs": key, "state": version, "counts": counts}
        write_atomic(self.finished_path, json.dumps(record) + "\n", durable=False)

    def finished_counts(self, key: str) -> dict[str, int] | None:
        """The counts mark_finished saw, if neither the configs nor the state changed since."""
        try:
            record = json.loads(self.finished_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("configs") != key:
            return None
        # A hand edit or any write gives the state file a new inode, mtime or size.
        if self.journal_path.exists() or record.get("state") != self._state_version():
            return None
        counts = record.get("counts")
        if not isinstance(counts, dict) or set(counts) != set(STATUSES):
            return None
        if not all(type(n) is int and n >= 0 for n in counts.values()):
            return None
        return counts

    def forget_finished(self) -> None:
        """A run that will change the state first drops the marker that vouches for the old one."""
        with contextlib.suppress(FileNotFoundError):
            self.finished_path.unlink()

    def read(self) -> State:
        """The state file with the journal applied on top: what a reader should believe."""
        if self.root.exists() and not self.root.is_dir():
            raise StateError(
                f"output_dir {self.root} is a file, not an experiment directory; point "
                "output_dir at the experiment's directory"
            )
        for _ in range(READ_TRIES):
            try:
                version = file_version(self.state_path)
                text = self.state_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise StateError(
                    f"no experiment in {self.root} yet (no {STATE_FILE}); run it first"
                ) from None
            except UnicodeDecodeError:
                raise StateError(f"{self.state_path} is not UTF-8 text; {RESTORE_HINT}") from None
            except OSError as error:
                raise StateError(
                    f"cannot read {self.state_path}: {error.strerror}; {RESTORE_HINT}"
                ) from None
            state = parse_state_checked(text, self.state_path)
            entries = read_journal(self.journal_path, state.journal_seq)
            # A compaction between our two reads leaves a gap, or a newer state file over an
            # emptied journal (the old file alone would be a step back in time): read again.
            if file_version(self.state_path) != version:
                continue
            if entries and entries[0][0] != state.journal_seq + 1:
                # Not a compaction (the state file is the same): the journal lost its head, cut
                # by hand or by a failing disk. What it still holds is true; apply it.
                warnings.warn(
                    f"{self.journal_path} lacks entries {state.journal_seq + 1} to "
                    f"{entries[0][0] - 1} (it was cut); the configs they changed read as the "
                    "state file had them, and a run settles them again",
                    ResweepWarning,
                    stacklevel=2,
                )
            apply_entries(state, entries)
            return state
        raise StateError(f"{self.root} changed {READ_TRIES} times while being read; try again")

    def read_one(self, name: str) -> State:
        """The state with only config `name`: reads one line, not all, on a huge sweep (show)."""
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return self.read()  # which says what is wrong
        state = parse_one(text, name, self.state_path)
        if state is None:
            return self.read()  # an old or hand-edited layout, or an unknown name: it says
        entries = read_journal(self.journal_path, state.journal_seq)
        apply_entries(state, [entry for entry in entries if entry[1] == name])
        return state

    def save(self, state: State) -> None:
        write_atomic(self.state_path, dump_state(state))

    def compact(self, state: State) -> None:
        """Save a state that already holds every journal entry, then drop the journal."""
        self.save(state)
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()

    def lock(self, *, break_lock: bool = False) -> contextlib.AbstractContextManager[RunInfo]:
        """Hold the experiment for one run; a lock dies with its holder's process."""
        return lock.hold(self.root, break_lock=break_lock)

    def active_run(self) -> RunInfo | None:
        """The run holding the experiment now; None when there is none or its process is gone."""
        return lock.active_run(self.root)


class StateWriter:
    """The coordinator's one writer: journals every change, compacts it into the state file."""

    def __init__(self, store: Store, state: State) -> None:
        self.store = store
        self.state = state
        self._lock = threading.RLock()
        self.journal = Journal(store.journal_path, state.journal_seq)

    def update(self, name: str, fields: dict[str, Any]) -> None:
        """Change one config's record in memory and queue the change for the journal."""
        with self._lock:
            self.state.configs[name].update(fields)
            self.journal.append(name, fields)

    def update_same(self, names: list[str], fields: dict[str, Any]) -> None:
        """update() of many configs with the same fields, which are encoded once."""
        with self._lock:
            configs = self.state.configs
            for name in names:
                configs[name].update(fields)
            self.journal.append_same(names, fields)

    def write(self, *, sync: bool) -> None:
        """Group commit: every queued change in one write, and with sync one fdatasync."""
        with self._lock:
            self.journal.write(sync=sync)

    def compact(self) -> None:
        """Fold the journal into experiment.yaml (atomically), then empty the journal."""
        with self._lock:
            self.journal.write(sync=True)
            self.state.journal_seq = self.journal.seq
            self.store.save(self.state)
            self.journal.truncate()

    def close(self) -> None:
        """Final compaction; a journal left on disk means the last run did not end cleanly."""
        with self._lock:
            self.compact()
            self.journal.close()
            with contextlib.suppress(FileNotFoundError):
                self.store.journal_path.unlink()
