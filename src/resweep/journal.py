"""The journal: every change to a config's record, appended between compactions."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from resweep.durable import fsync_dir, open_fd, persisted, write_all
from resweep.encoding import decode_flow, encode_line, yaml_error
from resweep.errors import ResweepWarning, StateError
from resweep.state import State, field_problem

# (sequence number, config name, the fields that changed)
Entry = tuple[int, str, dict[str, Any]]


def read_journal(path: Path, after_seq: int) -> list[Entry]:
    """The journal entries newer than after_seq; a torn last line (a crash mid-write) is skipped.

    A line that parses but is not a journal entry is a StateError: it was not written by resweep.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise StateError(f"cannot read {path}: {error.strerror}; {_JOURNAL_HINT}") from None
    entries = []
    lines = data.split(b"\n")
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = decode_flow(line.decode("utf-8"))
        except (ValueError, TypeError, yaml_error()):
            if index != len(lines) - 1:
                warnings.warn(
                    f"{path}: skipped unreadable line {index + 1}", ResweepWarning, stacklevel=2
                )
            continue
        if not _is_entry(entry):
            shown = line[:80].decode("utf-8", "replace")
            raise StateError(
                f"{path} line {index + 1} is not a resweep journal entry ({shown!r}); "
                f"{_JOURNAL_HINT}"
            )
        seq, name, fields = entry
        if seq > after_seq:
            entries.append((seq, name, fields))
    return entries


_JOURNAL_HINT = (
    "restore it, or move it away to keep the state as of its last compaction (configs that "
    "changed since run again unless their result files say done)"
)


def _is_entry(entry: Any) -> bool:
    """[sequence number >= 1, config name, fields], with a known status and attempts if any."""
    if not (isinstance(entry, list) and len(entry) == 3):
        return False
    seq, name, fields = entry
    if type(seq) is not int or seq < 1 or type(name) is not str or type(fields) is not dict:
        return False
    return field_problem(fields) is None


def apply_entries(state: State, entries: list[Entry]) -> None:
    """Bring state up to date with journal entries newer than it."""
    for seq, name, fields in entries:
        record = state.configs.get(name)
        if record is not None:
            record.update(fields)
        state.journal_seq = max(state.journal_seq, seq)


class Journal:
    """Append-only record of changes between compactions, made durable in groups."""

    def __init__(self, path: Path, last_seq: int) -> None:
        self.path = path
        self.seq = last_seq
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        created = not path.exists()
        self._fd = open_fd(path, append=True)
        if created:
            fsync_dir(path.parent)

    def append(self, name: str, fields: dict[str, Any]) -> None:
        """Queue a change; it reaches the file at the next write()."""
        with self._lock:
            self.seq += 1
            self._pending.append((encode_line([self.seq, name, fields]) + "\n").encode("utf-8"))

    def append_same(self, names: list[str], fields: dict[str, Any]) -> None:
        """Queue the same change to many configs, with fields encoded once for all of them."""
        text = encode_line(fields)
        with self._lock:
            for name in names:
                self.seq += 1
                line = f"[{self.seq}, {encode_line(name)}, {text}]\n"
                self._pending.append(line.encode("utf-8"))

    def write(self, *, sync: bool) -> None:
        """Hand queued changes to the OS in one write; with sync, to the disk too."""
        with self._lock:
            if self._pending:
                data = b"".join(self._pending)
                self._pending.clear()
                size = os.lseek(self._fd, 0, os.SEEK_END)
                try:
                    write_all(self._fd, data)
                except OSError:
                    # A full disk may take half a line: cut it, so later lines stay whole.
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, size)
                    raise
                persisted("journal-write")
            if sync:
                os.fdatasync(self._fd)
                persisted("journal-sync")

    def truncate(self) -> None:
        """Empty the journal once a compaction has folded it into the state file."""
        with self._lock:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            persisted("journal-truncate")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
