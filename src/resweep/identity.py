"""Canonical form of a config and its name: what makes two configs the same."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import math
import pickle
import re
import types
import typing
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from resweep.errors import ConfigError

# Longest default name: key=value pairs, or a readable prefix of them and a hash.
MAX_READABLE_NAME_CHARS = 64
# Longest name accepted at all: room for a file name on every common filesystem.
MAX_NAME_CHARS = 200
# A file name's limit on common filesystems (ext4, XFS, APFS, NTFS in UTF-16 units aside).
MAX_NAME_BYTES = 255
# 48 bits: a million configs sharing one readable prefix still get distinct names.
HASH_HEX_DIGITS = 12
# Between a long name's readable prefix and its hash: model=a,prompt=cot,…-0123456789ab.
ABBREVIATION = ",\u2026-"
# What of a long name the prefix may take, so that prefix, ABBREVIATION and hash fit.
_PREFIX_CHARS = MAX_READABLE_NAME_CHARS - len(ABBREVIATION) - HASH_HEX_DIGITS
_PREFIX_BYTES = MAX_NAME_BYTES - len(ABBREVIATION.encode()) - HASH_HEX_DIGITS

Params = dict[str, Any]

_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.+-]+\Z")
_SAFE_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-")
_SCALAR_WORDS = {"true", "false", "none", "null", "yes", "no", "on", "off", "~"}
# Names made only of these characters, not starting with '-', pass every check of check_name.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.,=+][A-Za-z0-9_.,=+-]*\Z")
_UNSAFE_NAME_CHARS = re.compile(r"[/\\\x00-\x1f\x7f-\x9f]")
_MISSING = dataclasses.MISSING


class _FieldInfo(typing.NamedTuple):
    name: str
    kind: type | None  # float or int when the declared type makes 1 and 1.0 differ
    default: Any  # canonical default, or _MISSING


_FIELD_CACHE: dict[type, tuple[_FieldInfo, ...]] = {}


def _numeric_kind(hint: Any) -> type | None:
    """The one numeric type a field declares, or None when it declares several or none."""
    if hint is float or hint is int:
        return typing.cast(type, hint)
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        numeric = [a for a in typing.get_args(hint) if a in (int, float)]
        if len(numeric) == 1:
            return typing.cast(type, numeric[0])
    return None


def _fields_of(cls: type) -> tuple[_FieldInfo, ...]:
    cached = _FIELD_CACHE.get(cls)
    if cached is not None:
        return cached
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to no type information
        hints = {}
    infos = []
    for f in dataclasses.fields(cls):
        kind = _numeric_kind(hints.get(f.name))
        if f.default is not _MISSING:
            default = _canon_pair(f.default, kind, f.name)[0]
        elif f.default_factory is not _MISSING:
            default = _canon_pair(f.default_factory(), kind, f.name)[0]
        else:
            default = _MISSING
        infos.append(_FieldInfo(f.name, kind, default))
    result = tuple(infos)
    _FIELD_CACHE[cls] = result
    return result


def _same(a: Any, b: Any) -> bool:
    """Equality of canonical values as their canonical text has it: 1, 1.0 and True differ,
    NaN equals NaN and -0.0 differs from 0.0."""
    cls = type(a)
    if cls is not type(b):
        return False
    if cls is float:
        if a == b:
            return bool(a != 0 or math.copysign(1.0, a) == math.copysign(1.0, b))
        return bool(a != a and b != b)
    if cls is dict or cls is list:
        return canonical_json(a) == canonical_json(b)
    return bool(a == b)


def _canon_pair(value: Any, kind: type | None, where: str) -> tuple[Any, Any]:
    """The canonical form of a value without and with defaults, in one pass; shared where they
    agree. kind is float or int when the declared type makes 1 and 1.0 differ."""
    cls = type(value)
    if cls is str or cls is float or cls is bool or value is None:
        return value, value
    if cls is int:
        number = _as_float(value, where) if kind is float else value
        return number, number
    if cls is dict:
        return _canon_mapping_pair(value, where)
    if cls is list or cls is tuple:
        return _canon_sequence_pair(value, where)
    # Subclasses of the plain types, then every other kind of value a config may hold.
    if isinstance(value, str):  # a StrEnum member stays as it is: it dumps as its value
        return value, value
    if isinstance(value, int):  # IntEnum members and other subclasses of int
        number = _as_float(value, where) if kind is float else int(value)
        return number, number
    if isinstance(value, float):
        number = float(value)
        return number, number
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canon_dataclass_pair(value)
    if isinstance(value, Mapping):
        return _canon_mapping_pair(value, where)
    if isinstance(value, list | tuple):
        return _canon_sequence_pair(value, where)
    if isinstance(value, enum.Enum):
        return _canon_pair(value.value, kind, where)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item):
        return _canon_pair(item(), kind, where)
    raise ConfigError(
        f"{where}: {type(value).__name__} is not YAML-safe; use str, int, float, bool, None, "
        "lists, dicts or nested dataclasses"
    )


def _as_float(value: int, where: str) -> float:
    """An int given to a field declared float, as that float."""
    try:
        return float(value)
    except OverflowError:
        raise ConfigError(
            f"{where}: an int of {value.bit_length()} bits is too large for a float field"
        ) from None


def _canon_mapping_pair(value: Mapping[Any, Any], where: str) -> tuple[Params, Params]:
    ident: Params = {}
    full: Params = {}
    shared = True
    for k, v in value.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: key {k!r} is not a string; config keys must be strings")
        cls = type(v)
        if cls is str or cls is float or cls is int or cls is bool or v is None:
            ident[k] = full[k] = v  # the common case, without building `where`
            continue
        ident[k], full[k] = _canon_pair(v, None, f"{where}.{k}")
        shared = shared and ident[k] is full[k]
    full = dict(sorted(full.items()))
    return (full if shared else dict(sorted(ident.items()))), full


def _canon_sequence_pair(value: Sequence[Any], where: str) -> tuple[list[Any], list[Any]]:
    pairs = [_canon_pair(v, None, f"{where}[{i}]") for i, v in enumerate(value)]
    full = [f for _, f in pairs]
    if all(i is f for i, f in pairs):
        return full, full
    return [i for i, _ in pairs], full


def _canon_dataclass_pair(obj: Any) -> tuple[Params, Params]:
    ident: Params = {}
    full: Params = {}
    for info in _fields_of(type(obj)):
        value, full[info.name] = _canon_pair(getattr(obj, info.name), info.kind, info.name)
        if info.default is not _MISSING and _same(value, info.default):
            continue  # adding a field with a default keeps every identity
        ident[info.name] = value
    return dict(sorted(ident.items())), dict(sorted(full.items()))


def canonical(config: Any, *, keep_defaults: bool = False) -> Params:
    """The config as plain sorted data, defaults left out: its identity.

    With keep_defaults, every field is kept: the params a person reads in the state and summary.
    """
    ident, full = _canonical_pair(config)
    return full if keep_defaults else ident


def _canonical_pair(config: Any) -> tuple[Params, Params]:
    """canonical(config) and canonical(config, keep_defaults=True), in one pass."""
    if type(config) is dict:
        return _canon_mapping_pair(config, "config")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return _canon_dataclass_pair(config)
    if isinstance(config, Mapping):
        return _canon_mapping_pair(config, "config")
    raise ConfigError(
        f"a config is a {type(config).__name__}; configs must be dataclass instances or dicts"
    )


def canonical_json(value: Any) -> str:
    """The canonical form as text: sorted keys, no spaces, ASCII; what a name's hash is of."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(params: Params) -> str:
    """A 12-hex-digit digest of the canonical form, the same on every machine."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:HASH_HEX_DIGITS]


def _safe_text(text: str) -> bool:
    """Whether text may stand in a name as it is: ASCII letters, digits and _.+-, or letters and
    digits of any script in their composed (NFC) form, so one text has one spelling."""
    if _SAFE_TOKEN.match(text):
        return True
    if not text or text.isascii():
        return False
    return unicodedata.is_normalized("NFC", text) and all(
        c in _SAFE_ASCII or c.isalnum() for c in text
    )


def _token(value: Any) -> str | None:
    """A value as an unambiguous file-name token, or None when it has none."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int | float):
        text = repr(value)
        return text if _SAFE_TOKEN.match(text) else None
    if isinstance(value, str) and _safe_text(value):
        # A string that reads as a number or a keyword would collide with that value's token.
        if value.lower() in _SCALAR_WORDS:
            return None
        try:
            float(value)
        except ValueError:
            return value
    return None


_SAFE_KEYS: set[str] = set()
# Tokens of the strings seen lately: a grid repeats the same few values many times.
_STRING_TOKENS: dict[str, str | None] = {}
_STRING_TOKENS_MAX = 4096


def _fast_token(value: Any) -> str | None:
    """_token, with the common types first and string tokens remembered."""
    cls = type(value)
    if cls is int or cls is float or cls is bool or value is None:
        return repr(value)  # a repr of these is always made of safe characters
    if cls is str:
        if value in _STRING_TOKENS:
            return _STRING_TOKENS[value]
        if len(_STRING_TOKENS) >= _STRING_TOKENS_MAX:
            _STRING_TOKENS.clear()
        token = _STRING_TOKENS[value] = _token(value)
        return token
    return _token(value)


def default_name(params: Params) -> str:
    """Readable key=value pairs when short and unambiguous; else the longest readable prefix of
    them that fits, cut at a pair, then a hash of the canonical form: a,b,…-0123456789ab.

    Every name fits in MAX_READABLE_NAME_CHARS characters and MAX_NAME_BYTES bytes; a config
    whose first pair is not readable, or does not fit, is named by the hash alone, and so is a
    config with a dot in a key, whose flattened pairs could be another config's. In a sweep,
    name_configs gives configs whose names differ only in case the hashed form (distinct_name).
    """
    return _readable_name(params, dotted=False)


def _readable_name(params: Params, *, dotted: bool = True) -> str:
    """The default name; with dotted, as naming version 3 gave it, which spelled out dotted keys."""
    parts, readable = _readable_pairs(params, dotted)
    if readable and parts:
        name = ",".join(parts)
        if len(name) <= MAX_READABLE_NAME_CHARS and (
            name.isascii() or len(name.encode()) <= MAX_NAME_BYTES
        ):
            return name
    return _abbreviated(parts, params)


def _readable_pairs(params: Params, dotted: bool = False) -> tuple[list[str], bool]:
    """The flattened key=value pairs up to the first unreadable one, and whether all are readable.

    A name must not start with '-' (a command line would take it for an option): a first key
    that does is unreadable, which leaves the hash alone. So is any key of a config with a dot
    in a key, unless dotted.
    """
    parts: list[str] = []
    length = -1
    checked = dotted
    for key, value in flatten(params).items():
        token = _fast_token(value)
        if token is None:
            return parts, False
        if key not in _SAFE_KEYS:  # safe keys with neither a dot nor a leading '-'
            if not _safe_text(key) or (not parts and key.startswith("-")):
                return parts, False
            if "." in key:
                if not checked:  # a dot of nesting, or one in a key: look once
                    if _has_dotted_key(params):
                        return [], False
                    checked = True
            elif not key.startswith("-") and len(_SAFE_KEYS) < _STRING_TOKENS_MAX:
                _SAFE_KEYS.add(key)
        part = f"{key}={token}"
        length += len(part) + 1
        parts.append(part)
        if length > MAX_READABLE_NAME_CHARS:
            break  # too long already: the pairs past the prefix are never read
    return parts, length <= MAX_READABLE_NAME_CHARS


def distinct_name(params: Params) -> str:
    """The name of a config whose readable name differs from another's only in case: the
    readable prefix that fits and the hash, so that the two differ on every filesystem."""
    return _abbreviated(_readable_pairs(params)[0], params)


def _has_dotted_key(params: Mapping[str, Any]) -> bool:
    """Whether a key, at any depth that flatten walks, holds a dot: {"a.b": 1} and
    {"a": {"b": 1}} flatten alike, so neither pair can name such a config."""
    if "." in "".join(params):
        return True
    if dict not in set(map(type, params.values())):
        return False
    return any(type(value) is dict and _has_dotted_key(value) for value in params.values())


def fold(name: str) -> str:
    """What of a name a case-insensitive filesystem sees: two names with one fold share a
    directory on macOS or Windows. Full case folding, canonical (NFC) form."""
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())


def _abbreviated(parts: list[str], params: Params) -> str:
    """The leading pairs that fit, ABBREVIATION and the hash; the hash alone when none fits."""
    digest = config_hash(params)
    chars = -1
    size = -1
    kept = 0
    for part in parts:
        chars += len(part) + 1
        size += len(part.encode()) + 1
        if chars > _PREFIX_CHARS or size > _PREFIX_BYTES:
            break
        kept += 1
    if not kept:
        return digest
    return ",".join(parts[:kept]) + ABBREVIATION + digest


def former_name(name: str, params: Params) -> str | None:
    """The name resweep gave this config before names kept a readable prefix, if it differs.

    Up to naming version 2, a name that was not ASCII key=value pairs of at most 64 characters
    was the hash alone. A state file may hold such a name: the config keeps it.
    """
    if name.isascii():
        return None  # readable then as now, or the hash alone then as now
    if ABBREVIATION in name:
        return name[-HASH_HEX_DIGITS:]  # the same digest ends the name
    return config_hash(params)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _plain_name(name: str) -> bool:
    """Whether name is made of characters and a length that no check below objects to."""
    return len(name) <= MAX_NAME_CHARS and bool(_PLAIN_NAME.match(name)) and name not in (".", "..")


def check_name(name: object, where: str, fix: str = "fix config_naming") -> str:
    """The name itself when it is safe as a directory name, else a ConfigError saying `fix`."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: config_naming returned {type(name).__name__}, not a str")
    if _plain_name(name):
        return name  # every default name: nothing below can object
    problem = None
    if not name or name.strip() != name:
        problem = "is empty or has leading or trailing spaces"
    elif name in (".", ".."):
        problem = "is a relative directory"
    elif _UNSAFE_NAME_CHARS.search(name):
        problem = "contains '/', '\\' or a control character"
    elif len(name) > MAX_NAME_CHARS:
        problem = f"is longer than {MAX_NAME_CHARS} characters"
    elif not _encodable(name):
        problem = "is not valid Unicode text (it holds a lone surrogate)"
    elif len(name.encode()) > MAX_NAME_BYTES:
        problem = f"takes more than {MAX_NAME_BYTES} bytes in UTF-8, too long for a file name"
    elif name.startswith("-"):
        problem = "starts with '-', which a command line would take for an option"
    if problem:
        raise ConfigError(f"{where}: config name {name!r} {problem}; {fix}")
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class NamedConfig:
    """A config as the script gave it, with its full params (defaults included) for the state."""

    config: Any
    params: Params
    # Other default names this config has or had, which a state file may hold it under: those of
    # older resweeps (see former_name), its readable name when it differs from another config's
    # only in case (see name_configs), or () for its hashed name (see keep_stored_names).
    former: tuple[str, ...] | None = None


def name_configs(
    configs: Sequence[Any], naming: Callable[[Any], str] | None = None
) -> dict[str, NamedConfig]:
    """Every config by name with its full params; unsafe or duplicate names fail here.

    Default names never clash: configs whose names differ only in case or Unicode form (which a
    case-insensitive filesystem cannot tell apart) get their distinct_name, all but the one
    whose name is its own fold (x=ss, x=a) and so the same in every sweep.
    """
    entries: list[tuple[Any, Params, Params, str]] = []
    for index, config in enumerate(configs):
        try:
            params, full = _canonical_pair(config)
        except ConfigError as error:
            raise ConfigError(f"config #{index}: {error}") from None
        try:
            name = naming(config) if naming else _readable_name(params, dotted=False)
        except ValueError as error:  # an int too long to write out (sys.set_int_max_str_digits)
            raise ConfigError(f"config #{index}: {error}") from None
        if not (type(name) is str and _plain_name(name)):
            check_name(name, f"config #{index}")
        entries.append((config, params, full, name))
    folds = [fold(e[3]) for e in entries]
    clashing = set() if naming else _shared_folds(entries, folds)
    named: dict[str, NamedConfig] = {}
    identities: dict[str, Params] = {}
    folded: dict[str, str] = {}
    for index, (config, params, full, name) in enumerate(entries):
        key = folds[index]
        former = None
        if not naming:
            readable = name  # its name up to naming version 3
            if key in clashing and name != key:
                name = distinct_name(params)
                key = fold(name)
            elif "=" not in name and _has_dotted_key(params):
                readable = _readable_name(params)
            # Most names are readable ASCII, which no older resweep named otherwise.
            ascii_pairs = name == readable and name.isascii() and "=" in name
            former = () if ascii_pairs else _former_names(name, readable, params)
        # Two names differing only in case share one directory on macOS and Windows.
        clash = folded.get(key)
        if clash is not None:
            if identities[clash] == params and clash == name:
                problem = "is the same config twice; list each config once"
            elif clash == name:
                problem = "is given to two different configs; names must be unique"
            else:
                problem = f"clashes with {clash!r}; names must be unique in more than case"
            raise ConfigError(f"config #{index}: name {name!r} {problem}")
        folded[key] = name
        identities[name] = params
        named[name] = NamedConfig(config, full, former)
    return named


def _shared_folds(entries: Sequence[tuple[Any, Params, Params, str]], folds: list[str]) -> set[str]:
    """The folds that two or more different names share."""
    first: dict[str, str] = {}
    shared = set()
    for (_, _, _, name), key in zip(entries, folds, strict=True):
        if first.setdefault(key, name) != name:
            shared.add(key)
    return shared


def _former_names(name: str, readable: str, params: Params) -> tuple[str, ...] | None:
    """The other names a state file may hold this config under (see NamedConfig.former).

    readable is the name naming version 3 gave it. A readable name is hashed where a state holds
    another config under a name that differs from it only in case: its former names are then
    empty, for keep_stored_names to look for its hashed name only when there is a state.
    """
    names = []
    if readable != name:
        names.append(readable)
    if not readable.isascii():
        older = former_name(readable, params)
        if older is not None and older != name:
            names.append(older)
    if names:
        return tuple(dict.fromkeys(names))
    return () if _spelled_out(name) else None


def _spelled_out(name: str) -> bool:
    """Whether name is readable pairs in full, without a hash."""
    return "=" in name and ABBREVIATION not in name


def keep_stored_names(
    named: dict[str, NamedConfig], stored: Mapping[str, Any]
) -> dict[str, NamedConfig]:
    """named, with each config that a state holds under another of its names under that name.

    stored maps the state's names to their records. A config is matched by its canonical form:
    a hashed name is a digest of it, and a readable one must hold the config's params. A new
    name that differs only in case from one in the state gets the config's distinct_name.
    """
    if not any(c.former is not None for c in named.values()):
        return named
    kept: dict[str, NamedConfig] = {}
    unmatched = []
    for name, config in named.items():
        if name not in stored and config.former is not None:
            for other in _other_names(name, config):
                if (
                    other in stored
                    and other not in named
                    and other not in kept
                    and _holds(stored[other], other, config)
                ):
                    name = other
                    break
        kept[name] = config
        if name not in stored:
            unmatched.append(name)
    folds = {fold(n): n for n in stored} if unmatched else {}
    clashing = {n for n in unmatched if fold(n) in folds}
    if not clashing:
        return kept
    return {
        (distinct_name(canonical(c.config)) if n in clashing else n): c for n, c in kept.items()
    }


def _other_names(name: str, config: NamedConfig) -> Iterator[str]:
    """The names a state may hold this config under besides name, likeliest first."""
    yield from config.former or ()
    if _spelled_out(name):
        yield distinct_name(canonical(config.config))


def _holds(record: Any, name: str, config: NamedConfig) -> bool:
    """Whether a state's record under name holds this config. A hashed name is a digest of the
    config's canonical form; a readable one must hold its params, but for fields added since."""
    if not _spelled_out(name):
        return True
    stored = record.get("params") if isinstance(record, Mapping) else None
    if not isinstance(stored, Mapping) or not stored.keys() <= config.params.keys():
        return False
    return canonical_json({k: config.params[k] for k in stored}) == canonical_json(stored)


# Bump when the canonical form or the default names change: older digests then match nothing.
# 2: a field at a NaN default is left out like any other; -0.0 is no longer the default 0.0.
# 3: a long name keeps a readable prefix before its hash; letters of any script are readable.
# 4: a config with a dot in a key is named by its hash; names that differ from another config's
#    only in case are hashed; a name whose first key starts with '-' is the hash alone.
NAMING_VERSION = 4


class _ClassRecorder(pickle.Pickler):
    """A pickler that notes every class whose instances it pickles (not builtins, which it
    never asks about)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.classes: set[type] = set()

    def reducer_override(self, obj: Any) -> Any:
        self.classes.add(type(obj))
        return NotImplemented


def _class_digest(cls: type) -> str:
    """What of a class the canonical form depends on: field kinds and defaults, enum values."""
    parts = [f"{cls.__module__}.{cls.__qualname__}"]
    if dataclasses.is_dataclass(cls):
        parts.extend(repr(tuple(info)) for info in _fields_of(cls))
    elif isinstance(cls, enum.EnumMeta):
        parts.extend(f"{member.name}={member.value!r}" for member in cls)  # type: ignore[var-annotated]
    return "\n".join(parts)


def configs_digest(configs: Sequence[Any]) -> str | None:
    """A digest that changes whenever the default names or params of configs could change.

    It costs about a pickling of the list, far less than naming every config, so a run can
    tell from it that a sweep it already finished is unchanged. None when configs do not pickle.
    """
    top: dict[type, int] = {}  # each config's class, by order of first appearance
    fields_only: dict[type, bool] = {}
    kinds = []
    plain = []
    for config in configs:
        cls = type(config)
        kind = top.setdefault(cls, len(top))
        kinds.append(kind)
        by_fields = fields_only.get(cls)
        if by_fields is None:
            # A dataclass is its class and its fields: pickling its __dict__ is much faster.
            by_fields = dataclasses.is_dataclass(cls) and hasattr(config, "__dict__")
            fields_only[cls] = by_fields
        plain.append(config.__dict__ if by_fields else config)
    buffer = io.BytesIO()
    recorder = _ClassRecorder(buffer)
    try:
        recorder.dump((kinds, plain))
        nested = sorted(_class_digest(cls) for cls in recorder.classes)
        classes = [_class_digest(cls) for cls in top]
    except Exception:
        return None
    digest = hashlib.sha256(f"resweep naming {NAMING_VERSION}\n".encode())
    digest.update("\n".join([*classes, "--", *nested]).encode())
    digest.update(buffer.getbuffer())
    return digest.hexdigest()


def flatten(value: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts as one level of dotted keys ({"a": {"b": 1}} -> {"a.b": 1}); {} is a value."""
    if dict not in set(map(type, value.values())) and set(map(type, value)) <= {str}:
        return dict(value)  # flat already: the common case, without a call per key
    out: dict[str, Any] = {}
    _flatten_into(value, "", out)
    return out


def _flatten_into(value: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, item in value.items():
        dotted = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            _flatten_into(item, f"{dotted}.", out)
        else:
            out[dotted] = item
