"""The state file's format: its records, how it is written, and how any hand edit is read."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from resweep.encoding import encode_flow, yaml_error, yaml_load
from resweep.errors import StateError, UnknownConfigError

# Bumped whenever the state file changes shape; older versions stay readable.
FORMAT_VERSION = 1
Status = Literal["todo", "running", "done", "failed"]
STATUSES: tuple[Status, ...] = ("todo", "running", "done", "failed")
# The most config names an unknown name is compared with to suggest close ones.
MAX_SUGGESTION_CANDIDATES = 2000


class ConfigRecord(TypedDict, total=False):
    """One config's entry under `configs:` in experiment.yaml (hand edits may omit keys)."""

    params: dict[str, Any]
    status: Status
    attempts: int
    start_time: str | None
    end_time: str | None
    duration_s: float | None
    error: str | None
    result: Any
    cache_hits: int
    cache_misses: int
    # Attempts cut off by a stop or a crash while they ran.
    interruptions: int
    # The run session and the code fingerprint that produced the result.
    session: str | None
    fingerprint: str | None


_HEADER = (
    "# resweep experiment state, one config per line. You may edit a status by hand\n"
    "# (say failed -> todo) while no run is active; the next run honours it.\n"
)
# The last line of a state file: what follows it, or its absence, shows a damaged end.
_TRAILER = "# end of state: "
_TRAILER_LINE = re.compile(r"# end of state: \d+ configs\n")
# The JSON floats that YAML 1.1 reads as floats too: a dot, and a sign in the exponent.
_YAML_FLOAT = re.compile(r"-?\d+\.\d*(?:[eE][-+]\d+)?\Z")


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

    def lookup(self, name: str) -> dict[str, Any]:
        """One config's record; an unknown name is an error that suggests close ones."""
        record = self.configs.get(name)
        if record is None:
            raise UnknownConfigError(
                f"no config named {name!r}{_suggest(name, list(self.configs))}"
            )
        return record

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        for record in self.configs.values():
            counts[record["status"]] += 1
        return counts


def _sorted_pairs(name: str) -> str:
    """A key=value name with its pairs sorted, so that the same fields in any order compare equal."""
    return ",".join(sorted(name.split(","))) if "=" in name else name


def _suggest(name: str, names: list[str]) -> str:
    """'; did you mean ...?' with the names closest to name, or where to look for names.

    Names are compared with their key=value pairs sorted: seed=1,model=a finds model=a,seed=1.
    """
    import difflib

    wanted = _sorted_pairs(name)
    by_form: dict[str, list[str]] = {}
    for known in names:
        by_form.setdefault(_sorted_pairs(known), []).append(known)
    forms = list(by_form)
    if len(forms) > MAX_SUGGESTION_CANDIDATES:
        # difflib over 100,000 names takes seconds: compare with those that start alike.
        forms = [f for f in forms if f[:3] == wanted[:3]][:MAX_SUGGESTION_CANDIDATES]
    close_forms = difflib.get_close_matches(wanted, forms, n=3)
    if wanted in by_form and wanted not in close_forms:
        close_forms.insert(0, wanted)
    close = [known for form in close_forms for known in by_form[form]][:3]
    if close:
        return f"; did you mean {', '.join(map(repr, close))}?"
    return "; the keys under 'configs' in experiment.yaml are the names"


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
        return yaml_load(text)


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
                entry = yaml_load(ln)
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
    except yaml_error():
        data = None
    if data is None:
        try:
            data = yaml_load(text)
        except yaml_error() as error:
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
            and field_problem(record) is None
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


# The types a record's other fields must have when present (None is always allowed).
_FIELD_TYPES: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("cache_hits", int), ("cache_misses", int), ("interruptions", int),
    ("duration_s", (int, float)), ("session", str), ("fingerprint", str), ("error", str),
    ("start_time", str), ("end_time", str),
)  # fmt: skip


def field_problem(fields: dict[str, Any]) -> str | None:
    """What is wrong with a record's fields (or a journal entry's), or None."""
    for key, kinds in _FIELD_TYPES:
        value = fields.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"{key} {value!r} is not a {getattr(kinds, '__name__', 'number')}"
    if "params" in fields and not isinstance(fields["params"], dict):
        return "params is not a mapping"
    if "status" in fields and fields["status"] not in STATUSES:
        return f"status {fields['status']!r} is none of {', '.join(STATUSES)}"
    attempts = fields.get("attempts", 0)
    if type(attempts) is not int or attempts < 0:
        return f"attempts {attempts!r} is not a whole number"
    return None


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
    problem = field_problem(record)
    if problem is not None:
        raise StateError(f"{path}: config {name!r}: {problem}; fix it by hand")


RESTORE_HINT = "restore it from a backup, or fix it by hand (a plain YAML file)"
# dump_state always writes this line; a file without it was cut short.
_CONFIGS_LINE = re.compile(r"^configs:", re.MULTILINE)


def parse_state_checked(text: str, path: Path) -> State:
    """parse_state, refusing a file cut before its configs, every error with a way out."""
    try:
        state = parse_state(text, path)
    except StateError as error:
        if ";" in str(error):
            raise
        raise StateError(f"{error}; {RESTORE_HINT}") from None
    if not _CONFIGS_LINE.search(text):
        raise StateError(f"{path} has no 'configs' section, as if cut short; {RESTORE_HINT}")
    return state


def parse_one(text: str, name: str, path: Path) -> State | None:
    """The state with only config `name`, from one line of an intact file written by resweep.

    None when the file is damaged, hand-edited out of resweep's layout, or lacks the name: the
    full reader then decides (and says what is wrong).
    """
    text, intact = _without_trailer(text)
    if not intact:
        return None
    head_end = text.find("\nconfigs:\n")
    at = text.find(f"\n  {encode_flow(name)}: ", head_end)
    if head_end < 0 or at < 0:
        return None
    line_end = text.find("\n", at + 1)
    line = text[at + 1 : line_end if line_end >= 0 else len(text)]
    return parse_state(f"{text[:head_end]}\nconfigs:\n{line}\n", path)
