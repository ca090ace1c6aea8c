"""The state file: load, save atomically, journal, lock."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from resweep.errors import LockedError, StateError

# Bumped whenever the state file changes shape; older versions stay readable.
FORMAT_VERSION = 1
Status = Literal["todo", "running", "done", "failed"]
STATUSES: tuple[Status, ...] = ("todo", "running", "done", "failed")

STATE_FILE = "experiment.yaml"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = ".lock"
RUN_FILE = "run.json"
CONFIGS_DIR = "configs"
RESULT_FILE = "result.yaml"
LOG_FILE = "log.txt"
EXCEPTION_FILE = "exception.txt"
RESULT_META_PREFIX = "# resweep: "

_HEADER = (
    "# resweep experiment state, one config per line. You may edit a status by hand\n"
    "# (say failed -> todo) while no run is active; the next run honours it.\n"
)
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
# Numbers such as 1e-05 that YAML 1.1 would read as strings; they get a ".0".
_BARE_EXPONENT = re.compile(r'("(?:[^"\\]|\\.)*")|(?<![\w.])(-?\d+)([eE][-+]?\d+)')
# Cheap test for a number token like 1e-05; a string that merely looks so costs the full pass.
_DIGIT_EXPONENT = re.compile(r"(?:^|[ \[])-?\d+[eE]")
_SURROGATE_ESCAPE = re.compile(r"\\ud[89a-f]", re.IGNORECASE)


def now_iso() -> str:
    """Local wall-clock time with its offset, to the millisecond."""
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


def _fix_exponent(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return match.group(1)
    return f"{match.group(2)}.0{match.group(3)}"


def encode_flow(value: Any) -> str:
    """One-line text that json.loads and yaml.safe_load both read back as value."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    except ValueError:  # NaN or infinity: only YAML spells them
        return _yaml_flow(value)
    if _DIGIT_EXPONENT.search(text):
        text = _BARE_EXPONENT.sub(_fix_exponent, text)
    if "\\ud" in text and _SURROGATE_ESCAPE.search(text):
        return _yaml_flow(value)  # YAML does not join JSON's surrogate pairs
    return text


def _yaml_flow(value: Any) -> str:
    text: str = yaml.dump(
        value, Dumper=_YAML_DUMPER, default_flow_style=True, width=2**31 - 1, allow_unicode=False
    )
    return text.removesuffix("\n").removesuffix("\n...")


def decode_flow(text: str) -> Any:
    """Read back what encode_flow wrote, or a hand edit of it."""
    try:
        return json.loads(text)
    except ValueError:
        return yaml.load(text, Loader=_YAML_LOADER)


@dataclass
class State:
    """Everything experiment.yaml holds: the experiment and one record per config."""

    name: str | None = None
    description: str | None = None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The last journal entry already folded into this state.
    journal_seq: int = 0
    format_version: int = FORMAT_VERSION
    # Every run session by id: who ran it, where, with which code (provenance).
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for record in self.configs.values():
            counts[record["status"]] += 1
        return counts


def dump_state(state: State) -> str:
    """The state as YAML, one config per line so that it is fast to write and to read."""
    lines = [
        _HEADER,
        f"format_version: {FORMAT_VERSION}\n",
        f"name: {encode_flow(state.name)}\n",
        f"description: {encode_flow(state.description)}\n",
        f"journal_seq: {state.journal_seq}\n",
        f"sessions: {encode_flow(state.sessions)}\n",
    ]
    if not state.configs:
        lines.append("configs: {}\n")
    else:
        lines.append("configs:\n")
        lines.extend(
            f"  {encode_flow(name)}: {encode_flow(record)}\n"
            for name, record in state.configs.items()
        )
    return "".join(lines)


def _parse_fast(text: str) -> dict[str, Any] | None:
    """Parse the layout dump_state writes; None when a hand edit changed that layout."""
    head, sep, body = text.partition("\nconfigs:\n")
    if not sep:
        head, sep, body = text.partition("\nconfigs: {}\n")
        if not sep or body.strip():
            return None
    data: dict[str, Any] = {}
    for line in head.splitlines():
        if not line or line.startswith("#"):
            continue
        key, colon, value = line.partition(": ")
        if not colon or not key.isidentifier():
            return None
        data[key] = decode_flow(value)
    lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if any(not ln.startswith("  ") or ln[2] in " \t" for ln in lines):
        return None
    try:
        configs = json.loads("{" + ",".join(lines) + "}")
    except ValueError:
        configs = {}
        for ln in lines:  # one hand-edited line should not cost the whole fast path
            try:
                configs.update(json.loads("{" + ln + "}"))
            except ValueError:
                entry = yaml.load(ln, Loader=_YAML_LOADER)
                if not isinstance(entry, dict):
                    return None
                configs.update(entry)
    data["configs"] = configs
    return data


def parse_state(text: str, path: Path) -> State:
    """Check and read a state file; any problem is a StateError that says how to fix it."""
    try:
        data = _parse_fast(text)
    except yaml.YAMLError:
        data = None
    if data is None:
        try:
            data = yaml.load(text, Loader=_YAML_LOADER)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise StateError(
                f"{path} is not valid YAML{where}; fix it by hand or restore it from a backup"
            ) from None
    if not isinstance(data, dict):
        raise StateError(f"{path} is not a resweep state file (no mapping at the top)")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StateError(
            f"{path} has format_version {version!r}, newer than this resweep reads "
            f"({FORMAT_VERSION}); upgrade resweep"
        )
    configs = data.get("configs") or {}
    if not isinstance(configs, dict):
        raise StateError(f"{path}: 'configs' must be a mapping from name to record")
    for name, record in configs.items():
        _check_record(name, record, path)
    seq = data.get("journal_seq", 0)
    sessions = data.get("sessions") or {}
    if not isinstance(sessions, dict):
        raise StateError(f"{path}: 'sessions' must be a mapping from session id to its record")
    for key in ("name", "description"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise StateError(f"{path}: '{key}' must be a string")
    return State(
        name=data.get("name"),
        description=data.get("description"),
        configs={str(k): v for k, v in configs.items()},
        journal_seq=seq if isinstance(seq, int) else 0,
        sessions=sessions,
    )


def _check_record(name: Any, record: Any, path: Path) -> None:
    if not isinstance(record, dict):
        raise StateError(f"{path}: config {name!r} must be a mapping with params and status")
    status = record.get("status")
    if status not in STATUSES:
        raise StateError(
            f"{path}: config {name!r} has unknown status {status!r}; "
            f"use one of {', '.join(STATUSES)}"
        )
    if not isinstance(record.get("params", {}), dict):
        raise StateError(f"{path}: config {name!r} has params that are not a mapping")
    attempts = record.setdefault("attempts", 0)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        raise StateError(f"{path}: config {name!r} has attempts {attempts!r}; use a whole number")
    record.setdefault("params", {})


# Test hook for the kill-point suite: with RESWEEP_CRASH_AFTER_STEP=N set, the coordinating
# process dies (os._exit) right after its N-th persistence step (a write, fsync, rename, ...).
CRASH_EXIT_CODE = 86
_crash_after_step = int(os.environ.get("RESWEEP_CRASH_AFTER_STEP") or 0)
_steps_taken = 0


def persisted(step: str) -> None:
    """Count one persistence step; the kill-point tests crash the process here."""
    global _steps_taken
    if _crash_after_step:
        _steps_taken += 1
        if _steps_taken == _crash_after_step:
            os._exit(CRASH_EXIT_CODE)


def disable_crash_hook() -> None:
    """Worker processes inherit the environment but are not the process under test."""
    global _crash_after_step
    _crash_after_step = 0


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in path survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    persisted("fsync-dir")


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace path with text so that a reader sees the old file or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            persisted("write")
            if durable:
                os.fsync(handle.fileno())
                persisted("fsync")
        os.replace(tmp, path)
        persisted("rename")
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def read_journal(path: Path, after_seq: int) -> list[tuple[int, str, dict[str, Any]]]:
    """The journal entries newer than after_seq; a torn last line (a crash mid-write) is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    entries = []
    lines = data.split(b"\n")
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            seq, name, fields = decode_flow(line.decode("utf-8"))
        except (ValueError, TypeError, yaml.YAMLError):
            if index != len(lines) - 1:
                warnings.warn(f"{path}: skipped unreadable line {index + 1}", stacklevel=2)
            continue
        if seq > after_seq:
            entries.append((seq, name, fields))
    return entries


def apply_entries(state: State, entries: list[tuple[int, str, dict[str, Any]]]) -> None:
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
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if created:
            fsync_dir(path.parent)

    def append(self, name: str, fields: dict[str, Any]) -> None:
        """Queue a change; it reaches the file at the next write()."""
        with self._lock:
            self.seq += 1
            self._pending.append((encode_flow([self.seq, name, fields]) + "\n").encode("utf-8"))

    def write(self, *, sync: bool) -> None:
        """Hand queued changes to the OS in one write; with sync, to the disk too."""
        with self._lock:
            if self._pending:
                data = b"".join(self._pending)
                self._pending.clear()
                size = os.lseek(self._fd, 0, os.SEEK_END)
                view = memoryview(data)
                try:
                    while view:
                        written = os.write(self._fd, view)
                        view = view[written:]
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


def write_result(config_dir: Path, result: Any, meta: dict[str, Any]) -> None:
    """Write result.yaml atomically; a comment line keeps what a crash recovery needs."""
    text = f"{RESULT_META_PREFIX}{encode_flow(meta)}\n{encode_flow(result)}\n"
    write_atomic(config_dir / RESULT_FILE, text, durable=False)


def read_result(config_dir: Path) -> tuple[Any, dict[str, Any]] | None:
    """The result and its meta line, or None when the file is missing or unreadable."""
    try:
        text = (config_dir / RESULT_FILE).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    first, _, rest = text.partition("\n")
    if not first.startswith(RESULT_META_PREFIX):
        return None
    try:
        return decode_flow(rest), json.loads(first.removeprefix(RESULT_META_PREFIX))
    except (ValueError, yaml.YAMLError):
        return None


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
        "session": meta.get("session"),
        "fingerprint": meta.get("fingerprint"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


_RESTORE_HINT = "restore it from a backup, or fix it by hand (a plain YAML file)"
# dump_state always writes this line; a file without it was cut short.
_CONFIGS_LINE = re.compile(r"^configs:", re.MULTILINE)


def _parse_checked(text: str, path: Path) -> State:
    """parse_state, refusing a file cut before its configs, every error with a way out."""
    try:
        state = parse_state(text, path)
    except StateError as error:
        if ";" in str(error):
            raise
        raise StateError(f"{error}; {_RESTORE_HINT}") from None
    if not _CONFIGS_LINE.search(text):
        raise StateError(f"{path} has no 'configs' section, as if cut short; {_RESTORE_HINT}")
    return state


@dataclass(frozen=True)
class RunInfo:
    """Who holds the experiment: shown to a second run that finds it busy."""

    host: str
    pid: int
    start_time: str

    @staticmethod
    def current() -> RunInfo:
        return RunInfo(socket.gethostname(), os.getpid(), now_iso())

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.start_time}"


class Store:
    """The files of one experiment directory and the only code that writes the state."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.root = Path(output_dir).absolute()
        self.state_path = self.root / STATE_FILE
        self.journal_path = self.root / JOURNAL_FILE
        self.configs_dir = self.root / CONFIGS_DIR

    def config_dir(self, name: str) -> Path:
        return self.configs_dir / name

    def exists(self) -> bool:
        return self.state_path.exists()

    def ensure_dir(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StateError(
                f"output_dir {self.root} is a file; move it away or give a directory as output_dir"
            )
        try:
            self.configs_dir.mkdir(parents=True, exist_ok=True)
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

    def read(self) -> State:
        """The state file with the journal applied on top: what a reader should believe."""
        if self.root.exists() and not self.root.is_dir():
            raise StateError(
                f"output_dir {self.root} is a file, not an experiment directory; point "
                "output_dir at the experiment's directory"
            )
        for _ in range(5):
            try:
                text = self.state_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise StateError(
                    f"no experiment in {self.root} yet (no {STATE_FILE}); run it first"
                ) from None
            except UnicodeDecodeError:
                raise StateError(
                    f"{self.state_path} is not UTF-8 text; {_RESTORE_HINT}"
                ) from None
            state = _parse_checked(text, self.state_path)
            entries = read_journal(self.journal_path, state.journal_seq)
            # A compaction between our two reads leaves a gap: read again.
            if not entries or entries[0][0] == state.journal_seq + 1:
                apply_entries(state, entries)
                if state.counts()["running"] and self.active_run() is None:
                    # Left running by a run that is gone: read them as the next run will settle them.
                    self.settle_interrupted(state, count=False)
                return state
        raise StateError(f"{self.root} changed five times while being read; try again")

    def save(self, state: State) -> None:
        write_atomic(self.state_path, dump_state(state))

    def compact(self, state: State) -> None:
        """Save a state that already holds every journal entry, then drop the journal."""
        self.save(state)
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()

    @contextlib.contextmanager
    def lock(self, *, break_lock: bool = False) -> Iterator[RunInfo]:
        """Hold the experiment for one run; a lock dies with its holder's process."""
        import filelock

        lock_path = self.root / LOCK_FILE
        run_path = self.root / RUN_FILE
        if break_lock:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
        lock = filelock.FileLock(str(lock_path), is_singleton=False)
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:
            raise LockedError(
                f"another run is active on {self.root}: {self._holder(run_path)}; wait for it, "
                "or if it is dead on another host, run again with --break-lock"
            ) from None
        info = RunInfo.current()
        try:
            write_atomic(run_path, encode_flow(info.__dict__) + "\n", durable=False)
            yield info
        finally:
            with contextlib.suppress(OSError):
                run_path.unlink()
            lock.release()

    @staticmethod
    def _holder(run_path: Path) -> str:
        try:
            data = json.loads(run_path.read_text())
            return RunInfo(**data).describe()
        except (OSError, ValueError, TypeError):
            return "holder unknown"

    def active_run(self) -> RunInfo | None:
        """The run holding the experiment now; None when there is none or its process is gone."""
        try:
            info = RunInfo(**json.loads((self.root / RUN_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return None  # provably dead: same host, no such process
        return info

    def settle_interrupted(self, state: State, *, count: bool) -> list[str]:
        """Configs a dead run left running: done if their result file made it, else todo again."""
        settled = []
        for name, record in state.configs.items():
            if record["status"] != "running":
                continue
            settled.append(name)
            found = read_result(self.config_dir(name))
            if found is not None and found[1].get("attempt") == record.get("attempts"):
                record.update(recovered_fields(*found))
            else:
                record["status"] = "todo"
                if count:
                    record["interruptions"] = record.get("interruptions", 0) + 1
        return settled


class Recorder:
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
