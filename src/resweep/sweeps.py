"""grid() and load_configs(): how configs are generated."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import itertools
import json
import os
import re
import types
import typing
from collections import abc
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, SupportsIndex, overload

from resweep.errors import ConfigError

_TOP_KEYS = ("base", "axes", "seeds", "hooks", "extensions")
_HOOK_KEYS = ("plugins", "fail_fast")
_AXIS_KEYS = ("mode", "params")
_MODES = ("grid", "zip")
# Numbers that YAML 1.1 (PyYAML) reads as strings: an exponent without a dot, like 1e-3.
_NUMBER_LIKE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")


# -- the fields of a config class ---------------------------------------------------------


def _check_cls(cls: Any) -> None:
    if cls is not None and not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise ConfigError(f"{cls!r} is not a dataclass; give a dataclass or None for dicts")


@functools.cache
def _fields(cls: type) -> tuple[dict[str, dataclasses.Field[Any]], dict[str, Any]]:
    """The init fields of a dataclass and their resolved type hints (empty when unresolvable)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference that cannot be resolved: check nothing
        hints = {}
    return fields, hints


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass a field holds: its type, or the dataclass arm of an Optional/Union."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _no_field(cls: type, key: str, owner: str) -> ConfigError:
    fields, _ = _fields(cls)
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; its fields are {', '.join(fields)}"
    return ConfigError(f"{owner} has no field {key!r}{hint}")


def _field_hint(cls: type | None, key: str) -> Any:
    """The type hint of a dotted key in cls (None when unchecked); an unknown field is an error."""
    if cls is None:
        return None
    current: type | None = cls
    owner = cls.__name__
    hint: Any = None
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if current is None:
            # Inside a field that is not a dataclass: a dict or Any take any key.
            if _accepts_mapping(hint):
                return None
            inner = ".".join(parts[:depth])
            raise ConfigError(
                f"{inner!r} holds {_type_name(hint)}, not a dataclass, so it has no field {part!r}"
            )
        fields, hints = _fields(current)
        if part not in fields:
            raise _no_field(current, part, owner)
        hint = hints.get(part)
        current = _dataclass_type(hint)
        if current is not None:
            owner = f"{current.__name__} (the type of {'.'.join(parts[: depth + 1])!r})"
    return hint


# -- checking values against type hints ----------------------------------------------------


def _accepts_mapping(hint: Any) -> bool:
    if hint is None or hint is Any:
        return True
    origin = typing.get_origin(hint) or hint
    if origin is typing.Union or origin is types.UnionType:
        return any(_accepts_mapping(a) for a in typing.get_args(hint))
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether value fits hint; True whenever the hint is beyond what a sweep can check."""
    if hint is None or hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        # bool is an int to Python, but True where a number is expected is a mistake.
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence):
        if not isinstance(value, list | tuple):
            return False
        items = [a for a in args if a is not Ellipsis]
        return len(items) != 1 or all(_matches(v, items[0]) for v in value)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return isinstance(value, Mapping)
    dc = _dataclass_type(hint)
    if dc is not None:
        return isinstance(value, dc | Mapping)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or any(value == m.value for m in hint)
    return True


def _why(value: Any, hint: Any) -> str:
    """A hint at the YAML pitfall behind a mismatch, if there is a likely one."""
    if isinstance(value, str) and _NUMBER_LIKE.match(value) and _matches(1.0, hint):
        if "." not in value and "e" in value.lower():
            return f" (YAML reads {value} as a string; write it with a dot, like 1.0e-3)"
        return " (it is quoted in the file; write it without quotes)"
    if isinstance(value, bool) and _matches("x", hint):
        return " (YAML reads yes, no, on and off as booleans; quote the word)"
    return ""


def _mismatch(value: Any, hint: Any) -> str:
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{value!r} is {article} {kind}, expected {_type_name(hint)}{_why(value, hint)}"


def _check_value(cls: type | None, key: str, value: Any, where: str) -> None:
    """A ConfigError naming where and key when value cannot go into the field key of cls."""
    try:
        hint = _field_hint(cls, key)
    except ConfigError as error:
        raise ConfigError(f"{where}, key {key!r}: {error}") from None
    sub = _dataclass_type(hint)
    if sub is not None and isinstance(value, Mapping):
        for name, item in value.items():
            _check_value(cls, f"{key}.{name}", item, where)
        return
    if not _matches(value, hint):
        raise ConfigError(f"{where}, key {key!r}: {_mismatch(value, hint)}")


# -- building configs ----------------------------------------------------------------------


def _set_dotted(target: dict[str, Any], key: str, value: Any, where: str) -> None:
    """target[a][b] = value for key 'a.b'; a mapping value merges into a mapping already there."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{where}, key {key!r}: a dotted key has an empty part")
    node = target
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            inner = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"{where}, key {key!r}: sets a field inside {inner!r}, which holds {child!r}"
            )
        node = child
    last = parts[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for name, item in value.items():
            _set_dotted(node, f"{last}.{name}", item, where)
    else:
        node[last] = copy.deepcopy(value)


def _nest(flat: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    """{'opt.lr': 1} -> {'opt': {'lr': 1}}; later keys override earlier ones."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        _set_dotted(out, str(key), value, where)
    return out


def build(cls: type | None, params: Mapping[str, Any], where: str = "config") -> Any:
    """A config from (possibly dotted) params: a dataclass of cls, or nested dicts."""
    _check_cls(cls)
    nested = _nest(params, where)
    if cls is None:
        return nested
    return _build(cls, nested, where)


def _build(cls: type, nested: Mapping[str, Any], where: str) -> Any:
    fields, hints = _fields(cls)
    kwargs = {}
    for key, value in nested.items():
        if key not in fields:
            raise ConfigError(f"{where}: {_no_field(cls, key, cls.__name__)}")
        hint = hints.get(key)
        sub = _dataclass_type(hint)
        if sub is not None and isinstance(value, Mapping):
            value = _build(sub, value, f"{where}, field {key!r}")
        elif not _matches(value, hint):
            raise ConfigError(f"{where}, key {key!r}: {_mismatch(value, hint)}")
        elif isinstance(hint, type) and issubclass(hint, enum.Enum):
            value = hint(value)  # a sweep file spells an enum member by its value
        elif hint is float and isinstance(value, int):
            value = float(value)  # lr: 1 in a file means 1.0 for a float field
        kwargs[key] = value
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{where}: no value for {cls.__name__} field(s) {', '.join(map(repr, missing))}; "
            "set them in base or on an axis"
        )
    return cls(**kwargs)


# -- axes -----------------------------------------------------------------------------------


def _axis_values(values: Any, where: str) -> list[Any]:
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        raise ConfigError(f"{where}: give a list of values, not {values!r}")
    out = list(values)
    if not out:
        raise ConfigError(f"{where}: the list is empty, so the sweep would be empty")
    return out


def _value_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _check_distinct(rows: list[Any], where: str, what: str) -> None:
    """Two equal values on an axis would make two identical configs."""
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        key = _value_key(row)
        if key in seen:
            raise ConfigError(
                f"{where}: {what} #{seen[key]} and #{index} are both {row!r}, which would make "
                "the same config twice"
            )
        seen[key] = index


def _overlap(key: str, other: str) -> bool:
    """'opt' and 'opt.lr' set the same field, as do 'lr' and 'lr'."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


def _claim(key: Any, owner: str, claimed: dict[str, str], where: str) -> str:
    """Record that owner sets key; a key another axis already sets is an error."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: key {key!r} is not a field name")
    for other, other_owner in claimed.items():
        if _overlap(key, other):
            same = "the same key" if key == other else f"key {other!r}, which overlaps it,"
            raise ConfigError(
                f"{where}, key {key!r}: {same} is already set by {other_owner}; "
                "each key may vary on one axis only"
            )
    claimed[key] = owner
    return key


def grid(cls: type | None = None, /, **axes: Any) -> list[Any]:
    """Every combination of the axes (the last one varies fastest), as cls instances or dicts.

    Dotted axis names set nested fields: ``grid(Cfg, **{"opt.lr": [0.1, 0.01]})``.
    """
    _check_cls(cls)
    claimed: dict[str, str] = {}
    columns: dict[str, list[Any]] = {}
    for key, raw in axes.items():
        where = f"grid, key {key!r}"
        _claim(key, f"axis {key!r}", claimed, "grid")
        values = _axis_values(raw, where)
        for value in values:
            _check_value(cls, key, value, "grid")
        _check_distinct(values, where, "values")
        columns[key] = values
    keys = list(columns)
    return [
        build(cls, dict(zip(keys, combo, strict=True)), f"grid: config #{index}")
        for index, combo in enumerate(itertools.product(*columns.values()))
    ]


# -- sweep files ------------------------------------------------------------------------------


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        keys: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in keys:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"line {line}: key {key!r} is given twice in one mapping")
            keys.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def load_configs(path: str | os.PathLike[str], cls: type | None = None) -> list[Any]:
    """Expand a sweep file (base, axes of grid or zip, seeds) into configs, in a fixed order."""
    import yaml

    _check_cls(cls)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"sweep file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"sweep file {file} cannot be read: {error}") from None
    try:
        spec = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise ConfigError(f"sweep file {file} is not valid YAML{where}: {problem}") from None
    configs = expand(spec, cls, str(file))
    hooks, fail_fast, extensions = _hook_settings(spec, str(file))
    return SweepConfigs(configs, hooks=hooks, hooks_fail_fast=fail_fast, extensions=extensions)


class SweepConfigs(list[Any]):
    """The configs of a sweep file, with the hooks it declares: Experiment takes both."""

    def __init__(
        self,
        configs: Iterable[Any] = (),
        *,
        hooks: list[str] | None = None,
        hooks_fail_fast: bool | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(configs)
        # Hook ids and dotted paths, as the file's `hooks:` lists them.
        self.hooks: list[str] = list(hooks or [])
        # The file's `hooks: {fail_fast: ...}`; None when it says nothing.
        self.hooks_fail_fast = hooks_fail_fast
        # Settings by namespace, handed to every hook.
        self.extensions: dict[str, Any] = dict(extensions or {})

    @overload
    def __getitem__(self, index: SupportsIndex) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> SweepConfigs: ...

    def __getitem__(self, index: SupportsIndex | slice) -> Any:
        """A config; a slice keeps the file's hooks and extensions (`load_configs(...)[:2]`)."""
        if isinstance(index, slice):
            return SweepConfigs(
                super().__getitem__(index),
                hooks=self.hooks,
                hooks_fail_fast=self.hooks_fail_fast,
                extensions=self.extensions,
            )
        return super().__getitem__(index)


def _hook_settings(spec: Any, where: str) -> tuple[list[str], bool | None, dict[str, Any]]:
    """A sweep file's `hooks:` (a list, or {plugins, fail_fast}) and `extensions:`."""
    if not isinstance(spec, Mapping):
        return [], None, {}
    hooks = spec.get("hooks")
    fail_fast = None
    if isinstance(hooks, Mapping):
        _check_keys(hooks, _HOOK_KEYS, f"{where}: hooks", "use plugins and fail_fast")
        fail_fast = hooks.get("fail_fast")
        if fail_fast is not None and not isinstance(fail_fast, bool):
            raise ConfigError(f"{where}: hooks: fail_fast must be true or false, not {fail_fast!r}")
        hooks = hooks.get("plugins")
    hooks = [] if hooks is None else hooks
    if not isinstance(hooks, list) or not all(isinstance(h, str) and h for h in hooks):
        raise ConfigError(
            f"{where}: hooks must be a list of hook ids and dotted paths, or a mapping with "
            "plugins (that list) and fail_fast"
        )
    extensions = spec.get("extensions")
    extensions = {} if extensions is None else extensions
    if not isinstance(extensions, Mapping) or not all(isinstance(k, str) for k in extensions):
        raise ConfigError(f"{where}: extensions must be a mapping of namespace to settings")
    return list(hooks), fail_fast, dict(extensions)


def expand(spec: Any, cls: type | None, where: str = "sweep") -> list[Any]:
    """The configs a sweep specification (the parsed YAML of a sweep file) stands for.

    Axes combine as a Cartesian product, the first axis varying slowest; inside a grid axis the
    last key varies fastest; seeds, when given, vary fastest of all.
    """
    _check_cls(cls)
    if spec is None:
        raise ConfigError(f"{where}: the sweep file is empty; give base, axes and/or seeds")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: a sweep file holds a mapping with base, axes and seeds")
    _check_keys(spec, _TOP_KEYS, where, "use base, axes, seeds, hooks, extensions")
    base = spec.get("base")
    base = {} if base is None else base
    if not isinstance(base, Mapping):
        raise ConfigError(f"{where}: base must be a mapping of field to value, not {base!r}")
    for key, value in base.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: base: key {key!r} is not a field name")
        _check_value(cls, key, value, f"{where}: base")
    axes = spec.get("axes")
    axes = [] if axes is None else axes
    if not isinstance(axes, list):
        raise ConfigError(f"{where}: axes must be a list of {{mode, params}} entries")
    claimed: dict[str, str] = {}
    blocks = [_axis_block(axis, index, cls, claimed, where) for index, axis in enumerate(axes)]
    seeds = spec.get("seeds")
    if seeds is not None:
        at = f"{where}: seeds"
        _claim("seed", "seeds", claimed, at)
        values = _axis_values(seeds, at)
        for value in values:
            _check_value(cls, "seed", value, at)
        _check_distinct(values, at, "seeds")
        blocks.append([{"seed": s} for s in values])
    configs = []
    for index, parts in enumerate(itertools.product(*blocks)):
        at = f"{where}: config #{index}"
        nested = _nest(base, f"{where}: base")
        for part in parts:
            for key, value in part.items():
                _set_dotted(nested, key, value, at)
        configs.append(nested if cls is None else _build(cls, nested, at))
    return configs


def _check_keys(mapping: Mapping[Any, Any], allowed: Any, where: str, fallback: str) -> None:
    """An unknown key is an error that suggests the closest allowed one."""
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"did you mean {close[0]!r}?" if close else fallback
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}")


def _axis_block(
    axis: Any, index: int, cls: type | None, claimed: dict[str, str], where: str
) -> list[dict[str, Any]]:
    """The rows one axis contributes: every combination (grid) or element-wise tuples (zip)."""
    at = f"{where}: axes[{index}]"
    if not isinstance(axis, Mapping):
        raise ConfigError(f"{at} must be a mapping with mode and params, not {axis!r}")
    _check_keys(axis, _AXIS_KEYS, at, "use mode and params")
    mode = axis.get("mode", "grid")
    if mode not in _MODES:
        raise ConfigError(f"{at}: mode {mode!r} is neither grid nor zip")
    at = f"{at} ({mode})"
    params = axis.get("params")
    if not isinstance(params, Mapping) or not params:
        raise ConfigError(f"{at}: params must be a non-empty mapping of key to list of values")
    columns: dict[str, list[Any]] = {}
    for raw_key, raw_values in params.items():
        key = _claim(raw_key, f"axes[{index}]", claimed, at)
        values = _axis_values(raw_values, f"{at}, key {key!r}")
        for value in values:
            _check_value(cls, key, value, at)
        if mode == "grid":
            _check_distinct(values, f"{at}, key {key!r}", "values")
        columns[key] = values
    keys = list(columns)
    if mode == "grid":
        return [dict(zip(keys, c, strict=True)) for c in itertools.product(*columns.values())]
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k!r} has {n}" for k, n in lengths.items())
        raise ConfigError(f"{at}: zip needs lists of equal length, but {shown}")
    rows = [dict(zip(keys, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    _check_distinct(rows, at, "rows")
    return rows
