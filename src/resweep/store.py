"""The state file: load, save atomically, journal, lock."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from resweep.errors import LockedError, StateError

# Bumped whenever the state file changes shape; older versions stay readable.
FORMAT_VERSION = 1
Status = Literal["todo", "running", "done", "failed"]
STATUSES: tuple[Status, ...] = ("todo", "running", "done", "failed")

STATE_FILE = "experiment.yaml"
JOURNAL_FILE = "journal.jsonl"
# Left by a run after which nothing was left to run: the next run can skip naming and reading.
FINISHED_FILE = ".finished.json"
LOCK_FILE = ".lock"
RUN_FILE = "run.json"
CONFIGS_DIR = "configs"
RESULT_FILE = "result.yaml"
LOG_FILE = "log.txt"
EXCEPTION_FILE = "exception.txt"
RESULT_META_PREFIX = "# resweep: "
# The meta line's key for the length of the result line, which tells a whole file from a cut one.
RESULT_BYTES_KEY = "bytes"
# Where each worker process of a run says which config it is running now.
WORKERS_DIR = ".workers"
MARKER_BYTES = 1024

_HEADER = (
    "# resweep experiment state, one config per line. You may edit a status by hand\n"
    "# (say failed -> todo) while no run is active; the next run honours it.\n"
)
# The last line of a state file: what follows it, or its absence, shows a damaged end.
_TRAILER = "# end of state: "
_TRAILER_LINE = re.compile(r"# end of state: \d+ configs\n")
# Numbers such as 1e-05 that YAML 1.1 would read as strings; they get a ".0".
_BARE_EXPONENT = re.compile(r'("(?:[^"\\]|\\.)*")|(?<![\w.])(-?\d+)([eE][-+]?\d+)')
# A float's repr always signs its exponent (1e-05), so text without "e-" or "e+" needs no fix;
# a string that merely looks so costs the full pass, which leaves strings alone.
_EXPONENT = re.compile(r"e[-+]\d")
_SURROGATE_ESCAPE = re.compile(r"\\ud[89a-f]", re.IGNORECASE)
# In JSON text: an escaped backslash, a surrogate pair's escape, or a lone surrogate's.
_JSON_SURROGATES = re.compile(
    r"(\\\\)|\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|(\\ud[89a-f][0-9a-f]{2})"
)
# The JSON floats that YAML 1.1 reads as floats too: a dot, and a sign in the exponent.
_YAML_FLOAT = re.compile(r"-?\d+\.\d*(?:[eE][-+]\d+)?\Z")


def _yaml() -> Any:
    """PyYAML, imported at first use: a run writes and reads its own files as JSON lines, and
    the import would add about 25 ms to the start of the coordinator and of every worker."""
    import yaml

    return yaml


def _yaml_load(text: str) -> Any:
    yaml = _yaml()
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        if not _SURROGATE_ESCAPE.search(text):
            raise
        # libyaml refuses an escaped lone surrogate, which PyYAML's own reader takes.
        return yaml.load(text, Loader=yaml.SafeLoader)


def _yaml_error() -> type[Exception]:
    """PyYAML's error class, for except clauses: evaluated only once something was raised."""
    error: type[Exception] = _yaml().YAMLError
    return error


# (second, its local date and time, its UTC offset) as text: one datetime a second, not one a call,
# because formatting one costs a worker about 4 us, twice per config.
_second_text: tuple[int, str, str] = (-1, "", "")


def now_iso() -> str:
    """Local wall-clock time with its offset, to the millisecond."""
    global _second_text
    now = time.time()
    second = math.floor(now)
    micro = round((now - second) * 1e6)  # rounded to the microsecond first, as datetime does
    if micro == 1_000_000:
        second, micro = second + 1, 0
    cached_second, date_time, offset = _second_text
    if second != cached_second:
        zone = datetime.timezone(datetime.timedelta(seconds=time.localtime(second).tm_gmtoff))
        text = datetime.datetime.fromtimestamp(second, zone).isoformat()
        date_time, offset = text[:19], text[19:]
        _second_text = (second, date_time, offset)
    return f"{date_time}.{micro // 1000:03d}{offset}"


def _fix_exponent(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return match.group(1)
    return f"{match.group(2)}.0{match.group(3)}"


def _json_encoder() -> Callable[[Any], str]:
    """json.dumps(value, ensure_ascii=True, allow_nan=False), built once instead of per call."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    slow = json.JSONEncoder(ensure_ascii=True, allow_nan=False)
    if c_make_encoder is None:
        return slow.encode
    chunks = c_make_encoder(
        None, slow.default, json.encoder.encode_basestring_ascii, None, ": ", ", ",
        False, False, False,
    )  # fmt: skip

    def encode(value: Any) -> str:
        try:
            return "".join(chunks(value, 0))
        except RecursionError:  # a cycle: let the checking encoder say so
            return slow.encode(value)

    return encode


_encode_json = _json_encoder()
_encode_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _fix_exponents(text: str) -> str:
    """Give every bare-exponent number (1e-05) a ".0", leaving strings as they are."""
    if '\\"' in text:  # an escaped quote: only the full pattern tells strings apart
        return _BARE_EXPONENT.sub(_fix_exponent, text)
    pieces = []
    last = 0
    for match in _EXPONENT.finditer(text):
        at = match.start()
        # Without escaped quotes, an odd number of quotes before means inside a string.
        if at == 0 or not text[at - 1].isdigit() or text.count('"', 0, at) % 2:
            continue
        start = at - 1
        while start > 0 and text[start - 1].isdigit():
            start -= 1
        if start > 0 and text[start - 1] == ".":
            continue  # 1.5e-05 already reads as a float
        pieces.append(text[last:at])
        pieces.append(".0")
        last = at
    pieces.append(text[last:])
    return "".join(pieces)


def encode_flow(value: Any) -> str:
    """One-line text that json.loads and yaml.safe_load both read back as value."""
    if type(value) is str:  # names and most values: no number inside to fix
        text = _encode_string(value)
    else:
        try:
            text = _encode_json(value)
        except ValueError:  # NaN or infinity: only YAML spells them
            return _yaml_flow(value)
        if "e-" in text or "e+" in text:
            text = _fix_exponents(text)
    if "\\ud" in text and _SURROGATE_ESCAPE.search(text):
        # YAML reads JSON's escape of a character beyond U+FFFF as two lone surrogates.
        joined = _join_surrogate_pairs(text)
        if joined is None:
            return _yaml_flow(value)  # a lone surrogate, which only YAML keeps apart
        text = joined
    return text


def _join_surrogate_pairs(text: str) -> str | None:
    """JSON text with each escaped surrogate pair written as its character; None when an
    escaped lone surrogate remains."""
    lone = False

    def join(match: re.Match[str]) -> str:
        nonlocal lone
        if match.group(2):
            high, low = int(match.group(2), 16), int(match.group(3), 16)
            return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))
        lone = lone or match.group(4) is not None
        return match.group(0)

    joined = _JSON_SURROGATES.sub(join, text)
    return None if lone else joined


def _yaml_flow(value: Any) -> str:
    yaml = _yaml()

    def dump(dumper: Any) -> str:
        text: str = yaml.dump(
            value,
            Dumper=_quoting_dumper(dumper),
            default_flow_style=True,
            width=2**31 - 1,
            allow_unicode=False,
        )
        return text.removesuffix("\n").removesuffix("\n...")

    try:
        return dump(getattr(yaml, "CSafeDumper", yaml.SafeDumper))
    except UnicodeEncodeError:  # a lone surrogate, which only PyYAML's own writer escapes
        return dump(yaml.SafeDumper)


_QUOTING_DUMPERS: dict[type, type] = {}


def _quoting_dumper(dumper: type) -> type:
    """dumper, writing every string double-quoted: the one style that keeps a line break (which
    it escapes) from breaking the line, as a single-quoted string would."""
    quoting = _QUOTING_DUMPERS.get(dumper)
    if quoting is None:
        quoting = _QUOTING_DUMPERS[dumper] = type(f"Quoting{dumper.__name__}", (dumper,), {})

        def represent(representer: Any, text: str) -> Any:
            return representer.represent_scalar("tag:yaml.org,2002:str", text, style='"')

        quoting.add_representer(str, represent)  # type: ignore[attr-defined]
    return quoting


def encode_line(value: Any) -> str:
    """One line that decode_flow reads back as value, for files only resweep reads (the journal,
    result.yaml's meta line): plain JSON, without encode_flow's care for YAML readers."""
    try:
        return _encode_json(value)
    except ValueError:  # NaN or infinity: only YAML spells them
        return encode_flow(value)


def decode_flow(text: str) -> Any:
    """Read back what encode_flow wrote, or a hand edit of it."""
    try:
        return json.loads(text)
    except ValueError:
        return _yaml_load(text)


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
    lines.append(f"{_TRAILER}{len(state.configs)} configs\n")
    return "".join(lines)


def _without_trailer(text: str) -> tuple[str, bool]:
    """The text before its closing line, and whether that line closes it (nothing cut or added)."""
    at = text.rfind("\n" + _TRAILER)
    if at < 0 or not _TRAILER_LINE.fullmatch(text, at + 1):
        return text, False
    return text[: at + 1], True


def _yaml_float(text: str) -> float:
    if not _YAML_FLOAT.match(text):
        raise ValueError(f"YAML 1.1 reads {text} as a string")
    return float(text)


def _yaml_constant(text: str) -> float:
    raise ValueError(f"YAML reads {text} as a string")


# json.loads, refusing the numbers YAML 1.1 reads as strings (1e5, 1.5e5, NaN, Infinity).
_decode_json_as_yaml = json.JSONDecoder(
    parse_float=_yaml_float, parse_constant=_yaml_constant
).decode


def _decode_value(text: str) -> Any:
    """A top-level value as YAML reads it; fast when it is JSON, as dump_state writes it."""
    try:
        return _decode_json_as_yaml(text)
    except ValueError:
        return _yaml_load(text)


def _parse_config_lines(body: str) -> dict[str, Any] | None:
    """The config lines exactly as dump_state writes them, in one json.loads; else None."""
    body = body.removesuffix("\n")
    # Every line is two spaces and a quoted name: no deeper indent, comment or blank line.
    if not body.startswith('  "') or body.count("\n") != body.count('\n  "'):
        return None
    try:
        configs = json.loads("{" + body[2:].replace('\n  "', ', "') + "}")
    except ValueError:
        return None
    return configs if isinstance(configs, dict) else None


def _parse_fast(text: str) -> dict[str, Any] | None:
    """Parse the layout dump_state writes; None when a hand edit changed that layout."""
    text, _ = _without_trailer(text)
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
        data[key] = _decode_value(value)  # a YAML tool may have written 1e5 for the string
    configs = _parse_config_lines(body)
    if configs is not None:
        data["configs"] = configs
        return data
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
                entry = _yaml_load(ln)
                if not isinstance(entry, dict):
                    return None
                configs.update(entry)
    data["configs"] = configs
    return data


def _cut_in_trailer(text: str) -> bool:
    """Whether the file ends part way through its closing line."""
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    if not last.startswith("#") or _TRAILER_LINE.fullmatch(last + "\n"):
        return False
    return _TRAILER.startswith(last) or last.startswith(_TRAILER)


def parse_state(text: str, path: Path) -> State:
    """Check and read a state file; any problem is a StateError that says how to fix it."""
    if _cut_in_trailer(text):
        raise StateError(
            f"{path} ends part way through its last line (cut short); restore it from a backup"
        )
    try:
        data = _parse_fast(text)
    except _yaml_error():
        data = None
    if data is None:
        try:
            data = _yaml_load(text)
        except _yaml_error() as error:
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
    plain_keys = True
    for name, record in configs.items():
        # The common, well-formed record costs a few lookups; anything else gets the full check.
        if not (
            type(record) is dict
            and record.get("status") in STATUSES
            and type(record.get("attempts")) is int
            and record["attempts"] >= 0
            and type(record.get("params")) is dict
        ):
            _check_record(name, record, path)
        plain_keys = plain_keys and type(name) is str
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
        configs=configs if plain_keys else {str(k): v for k, v in configs.items()},
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


def _file_version(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten: inode, modification time, size."""
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns, info.st_size


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
        except (ValueError, TypeError, _yaml_error()):
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


def write_result(config_dir: str | os.PathLike[str], result: Any, meta: dict[str, Any]) -> None:
    """Write result.yaml, whose comment line keeps what a crash recovery needs.

    Written in place, not through a renamed temporary file: the comment line gives the result
    line's length in bytes, so a file cut short by a crash reads as no result at all.
    """
    body = encode_flow(result)
    data = body.encode("utf-8")
    meta = {**meta, RESULT_BYTES_KEY: len(data)}
    head = f"{RESULT_META_PREFIX}{encode_line(meta)}\n".encode()
    path = os.path.join(config_dir, RESULT_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(head + data + b"\n")
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    persisted("result-write")


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
        meta = json.loads(first.removeprefix(RESULT_META_PREFIX))
        size = meta.pop(RESULT_BYTES_KEY, None) if isinstance(meta, dict) else None
        if size is not None and (len(rest.encode("utf-8")) != size + 1 or rest[-1:] != "\n"):
            return None  # cut short by a crash while it was written
        return decode_flow(rest), meta
    except (ValueError, _yaml_error()):
        return None


def read_markers(markers_dir: Path) -> dict[str, tuple[int, float]]:
    """The configs that worker processes were running: name -> (pid, start time)."""
    running = {}
    try:
        entries = list(os.scandir(markers_dir))
    except FileNotFoundError:
        return {}
    for entry in entries:
        try:
            with open(entry.path, "rb") as handle:
                stamp, _, name = handle.read(MARKER_BYTES).decode().strip().partition(" ")
            running[name] = (int(entry.name), float(stamp))
        except (OSError, ValueError):
            continue
    running.pop("", None)
    return running


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


# How long a refused run waits for the lock's new holder to write run.json.
HOLDER_WAIT_S = 2.0
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
        self.finished_path = self.root / FINISHED_FILE
        self.configs_dir = self.root / CONFIGS_DIR
        # What the last read() found left running by a run that is gone (it reads them settled).
        self.left_running: list[str] = []

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

    def _state_version(self) -> list[int] | None:
        """The state file's inode, mtime and size, and a checksum: an edit within the same
        clock tick keeps the first three."""
        try:
            version = _file_version(self.state_path)
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
        for _ in range(5):
            try:
                version = _file_version(self.state_path)
                text = self.state_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise StateError(
                    f"no experiment in {self.root} yet (no {STATE_FILE}); run it first"
                ) from None
            except UnicodeDecodeError:
                raise StateError(f"{self.state_path} is not UTF-8 text; {_RESTORE_HINT}") from None
            state = _parse_checked(text, self.state_path)
            entries = read_journal(self.journal_path, state.journal_seq)
            # A compaction between our two reads leaves a gap, or a newer state file over an
            # emptied journal (the old file alone would be a step back in time): read again.
            if _file_version(self.state_path) != version:
                continue
            if not entries or entries[0][0] == state.journal_seq + 1:
                apply_entries(state, entries)
                if state.counts()["running"] and self.active_run() is None:
                    # Left running by a run that is gone: read them as the next run will settle them.
                    self.left_running = self.settle_interrupted(state, count=False)
                return state
        raise StateError(f"{self.root} changed five times while being read; try again")

    def read_one(self, name: str) -> State:
        """The state with only config `name`: reads one line, not all, on a huge sweep (show)."""
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return self.read()  # which says what is wrong
        text, intact = _without_trailer(text)
        if not intact:
            return self.read()  # an old file, or a damaged end: the full reader decides
        head_end = text.find("\nconfigs:\n")
        at = text.find(f"\n  {encode_flow(name)}: ", head_end)
        if head_end < 0 or at < 0:
            return self.read()  # a hand-edited layout, or an unknown name: the full reader says
        line_end = text.find("\n", at + 1)
        line = text[at + 1 : line_end if line_end >= 0 else len(text)]
        state = parse_state(f"{text[:head_end]}\nconfigs:\n{line}\n", self.state_path)
        entries = read_journal(self.journal_path, state.journal_seq)
        apply_entries(state, [entry for entry in entries if entry[1] == name])
        if state.counts()["running"] and self.active_run() is None:
            self.settle_interrupted(state, count=False)
        return state

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
        lock = filelock.FileLock(str(lock_path), is_singleton=False)
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:
            holder = self._holder(run_path)
            described = holder.describe() if holder else "holder unknown"
            if not break_lock:
                raise LockedError(
                    f"another run is active on {self.root}: {described}; wait for it to end, "
                    "or if it is dead on another host, run again with --break-lock"
                ) from None
            if holder is not None and holder.host == socket.gethostname():
                # flock dies with its holder: a held lock on this host has a living holder.
                raise LockedError(
                    f"another run is active on {self.root}: {described}, alive on this host; "
                    f"stop it first (kill {holder.pid}), --break-lock only takes over a dead run"
                ) from None
            # Taking over: a new lock file, so the old holder's lock no longer counts.
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            lock = filelock.FileLock(str(lock_path), is_singleton=False)
            try:
                lock.acquire(blocking=False)
            except filelock.Timeout:
                raise LockedError(
                    f"another run took {self.root} while breaking its lock; try again"
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
    def _holder(run_path: Path, wait_s: float = HOLDER_WAIT_S) -> RunInfo | None:
        """Who holds the lock, from run.json; waits a moment for a holder that just took it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                info: RunInfo | None = RunInfo(**json.loads(run_path.read_text()))
            except (OSError, ValueError, TypeError):
                info = None
            # A run.json left by a dead run names a dead pid: the new holder has not written yet.
            here = info is not None and info.host == socket.gethostname()
            if info is not None and not (here and not _pid_alive(info.pid)):
                return info
            if time.monotonic() > deadline:
                return info
            time.sleep(0.02)

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
        # A process-pool run leaves the configs its workers were executing in marker files.
        markers = self.root / WORKERS_DIR
        executing = read_markers(markers) if markers.is_dir() else None
        for name, record in state.configs.items():
            if record["status"] != "running":
                continue
            settled.append(name)
            found = read_result(self.config_dir(name))
            if found is not None and found[1].get("attempt") == record.get("attempts"):
                record.update(recovered_fields(*found))
                continue
            record["status"] = "todo"
            if executing is not None and name not in executing:
                # Queued behind a busy worker when the run died: that attempt never started.
                record["attempts"] = max(0, record.get("attempts", 1) - 1)
            elif count:
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
