"""grid() and load_configs(): how configs are generated."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from resweep.errors import ConfigError


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'opt.lr': 1} -> {'opt': {'lr': 1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"key {key!r} sets a field inside {part!r}, which is not nested")
            node = child
        node[parts[-1]] = value
    return out


def _dataclass_type(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _check_type(value: Any, hint: Any, where: str) -> None:
    """A clear error for the common mistakes: a string where a number is expected, and so on."""
    expected: tuple[type, ...]
    if hint is int:
        expected = (int,)
    elif hint is float:
        expected = (int, float)
    elif hint is str:
        expected = (str,)
    elif hint is bool:
        expected = (bool,)
    else:
        return
    # bool is an int to Python, but True where a number is expected is a mistake.
    if (isinstance(value, bool) and hint is not bool) or not isinstance(value, expected):
        raise ConfigError(
            f"{where}: {value!r} is a {type(value).__name__}, expected {hint.__name__}"
        )


def build(cls: type | None, params: Mapping[str, Any], where: str = "config") -> Any:
    """A config from (possibly dotted) params: a dataclass of cls, or nested dicts."""
    nested = _nest(params)
    if cls is None:
        return nested
    return _build(cls, nested, where)


def _build(cls: type, nested: Mapping[str, Any], where: str) -> Any:
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise ConfigError(f"{cls!r} is not a dataclass; give a dataclass or None")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    kwargs = {}
    for key, value in nested.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {cls.__name__} has no field {key!r}{hint}")
        sub = _dataclass_type(hints.get(key))
        if sub is not None and isinstance(value, Mapping):
            value = _build(sub, value, f"{where}.{key}")
        else:
            _check_type(value, hints.get(key), f"{where}.{key}")
        kwargs[key] = value
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: no value for {cls.__name__} field(s) {', '.join(missing)}")
    return cls(**kwargs)


def _axis_values(key: str, values: Any, where: str) -> list[Any]:
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
        raise ConfigError(f"{where}: axis {key!r} must be a list of values, not {values!r}")
    out = list(values)
    if not out:
        raise ConfigError(f"{where}: axis {key!r} has no values, so the sweep would be empty")
    return out


def grid(cls: type | None = None, /, **axes: Any) -> list[Any]:
    """Every combination of the axes (the last one varies fastest), as cls instances or dicts.

    Dotted axis names set nested fields: ``grid(Cfg, **{"opt.lr": [0.1, 0.01]})``.
    """
    keys = list(axes)
    values = [_axis_values(k, axes[k], "grid") for k in keys]
    return [
        build(cls, dict(zip(keys, combo, strict=True)), f"grid config #{i}")
        for i, combo in enumerate(itertools.product(*values))
    ]


def load_configs(path: str | os.PathLike[str], cls: type | None = None) -> list[Any]:
    """Expand a sweep file (base, axes of grid or zip, seeds) into configs."""
    import yaml

    file = Path(path)
    try:
        spec = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"sweep file {file} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"sweep file {file} is not valid YAML: {error}") from None
    return expand(spec, cls, str(file))


_TOP_KEYS = ("base", "axes", "seeds")


def expand(spec: Any, cls: type | None, where: str = "sweep") -> list[Any]:
    """The configs a sweep specification (the parsed YAML of a sweep file) stands for."""
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: a sweep file holds a mapping with base, axes and seeds")
    unknown = [k for k in spec if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; use base, axes, seeds"
        )
    base = spec.get("base") or {}
    if not isinstance(base, Mapping):
        raise ConfigError(f"{where}: base must be a mapping of field to value")
    axes = spec.get("axes") or []
    if not isinstance(axes, list):
        raise ConfigError(f"{where}: axes must be a list of {{mode, params}} entries")
    seen: dict[str, int] = {}
    blocks: list[list[dict[str, Any]]] = []
    for index, axis in enumerate(axes):
        at = f"{where}: axes[{index}]"
        if not isinstance(axis, Mapping):
            raise ConfigError(f"{at} must be a mapping with mode and params")
        mode = axis.get("mode", "grid")
        params = axis.get("params")
        extra = [k for k in axis if k not in ("mode", "params")]
        if extra:
            raise ConfigError(
                f"{at}: unknown key(s) {', '.join(map(repr, extra))}; use mode, params"
            )
        if mode not in ("grid", "zip"):
            raise ConfigError(f"{at}: mode {mode!r} is neither grid nor zip")
        if not isinstance(params, Mapping) or not params:
            raise ConfigError(f"{at}: params must be a non-empty mapping of key to list")
        for key in params:
            if key in seen:
                raise ConfigError(f"{at}: key {key!r} is already set by axes[{seen[key]}]")
            seen[key] = index
        columns = {str(k): _axis_values(str(k), v, at) for k, v in params.items()}
        if mode == "grid":
            keys = list(columns)
            block = [dict(zip(keys, c, strict=True)) for c in itertools.product(*columns.values())]
        else:
            lengths = {k: len(v) for k, v in columns.items()}
            if len(set(lengths.values())) > 1:
                shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
                raise ConfigError(f"{at}: zip needs lists of equal length, got {shown}")
            keys = list(columns)
            block = [
                dict(zip(keys, row, strict=True)) for row in zip(*columns.values(), strict=True)
            ]
        blocks.append(block)
    seeds = spec.get("seeds")
    if seeds is not None:
        if "seed" in seen:
            raise ConfigError(
                f"{where}: seeds replicates over 'seed', which axes[{seen['seed']}] sets"
            )
        blocks.append([{"seed": s} for s in _axis_values("seeds", seeds, where)])
    configs = []
    for index, parts in enumerate(itertools.product(*blocks)):
        flat = copy.deepcopy(dict(base))
        for part in parts:
            flat.update(part)
        configs.append(build(cls, flat, f"{where}: config #{index}"))
    if not configs:
        raise ConfigError(f"{where}: the sweep is empty")
    return configs
