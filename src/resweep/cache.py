"""@cached, the per-config request cache, and replay mode."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import enum
import functools
import inspect
import json
import math
import os
import pathlib
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from resweep.errors import CacheKeyError, CacheMiss, ResweepError

if TYPE_CHECKING:
    from resweep.experiment import Experiment

CacheMode = Literal["record", "replay"]
CACHE_DIR = "cache"
F = TypeVar("F", bound=Callable[..., Any])
_MISSING = object()
# Longest argument text shown in a CacheMiss message.
_PREVIEW_CHARS = 300


@dataclass
class CallStats:
    """Cache hits and misses of one config's run."""

    hits: int = 0
    misses: int = 0
    # The first call that replay mode could not answer, raised again after the function returns.
    miss: CacheMiss | None = None


@dataclass
class _Scope:
    cache: Any  # diskcache.Cache, or None when caching is off
    config: str
    mode: CacheMode
    stats: CallStats
    counts: dict[str, int] = field(default_factory=dict)


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "resweep_cache", default=None
)
_open_caches: dict[str, Any] = {}
_open_lock = threading.Lock()


def open_cache(output_dir: str | os.PathLike[str]) -> Any:
    """This process's handle on <output_dir>/cache, opened once and under a file lock."""
    directory = str(Path(output_dir, CACHE_DIR))
    handle = _open_caches.get(directory)
    if handle is not None:
        return handle
    with _open_lock:
        handle = _open_caches.get(directory)
        if handle is None:
            import diskcache
            import filelock

            Path(directory).mkdir(parents=True, exist_ok=True)
            # Many processes creating the SQLite schema at once fail with "database is locked".
            with filelock.FileLock(directory + ".lock", is_singleton=False):
                handle = diskcache.Cache(directory, eviction_policy="none", size_limit=2**62)
                handle.create_tag_index()
            _open_caches[directory] = handle
    return handle


def close_caches() -> None:
    """Close every cache this process opened (tests and long-lived notebooks)."""
    with _open_lock:
        for handle in _open_caches.values():
            handle.close()
        _open_caches.clear()


@contextlib.contextmanager
def scope(
    output_dir: str | os.PathLike[str] | None, config: str, mode: CacheMode, stats: CallStats
) -> Iterator[CallStats]:
    """Make cached calls inside this block belong to one config's cache."""
    handle = open_cache(output_dir) if output_dir is not None else None
    token = _scope.set(_Scope(handle, config, mode, stats))
    try:
        yield stats
    finally:
        _scope.reset(token)
    if stats.miss is not None:
        raise stats.miss  # even when the function swallowed it


def drop(output_dir: str | os.PathLike[str], names: list[str]) -> None:
    """Forget the recorded calls of these configs (run --fresh)."""
    if not Path(output_dir, CACHE_DIR).exists():
        return
    handle = open_cache(output_dir)
    for name in names:
        handle.evict(name)


def _encode(value: Any, where: str) -> Any:
    """Plain, process-independent data for value; never Python's hash()."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, list | tuple):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = {}
        for k, v in value.items():
            if not isinstance(k, str | int | float | bool):
                raise CacheKeyError(f"{where} has a key of type {type(k).__name__}")
            items[json.dumps(k)] = _encode(v, f"{where}[{k!r}]")
        return {"__map__": sorted(items.items())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
        return {"__dataclass__": type(value).__qualname__, "fields": fields}
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, enum.Enum):
        return {"__enum__": type(value).__qualname__, "value": _encode(value.value, where)}
    if isinstance(value, pathlib.PurePath):
        return {"__path__": str(value)}
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item):
        return _encode(item(), where)
    raise CacheKeyError(
        f"argument {where} is a {type(value).__name__}, which has no stable encoding for a cache "
        "key; pass plain data (str, numbers, lists, dicts, dataclasses)"
    )


_signatures: dict[Any, inspect.Signature | None] = {}


def call_key(
    fn_name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """The canonical text of a call: its function's name and its arguments, bound by name."""
    try:
        signature = _signatures[fn]
    except (KeyError, TypeError):
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None
        with contextlib.suppress(TypeError):
            _signatures[fn] = signature
    arguments: dict[str, Any]
    if signature is not None:
        try:
            arguments = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError:
            arguments = {"args": list(args), "kwargs": kwargs}
    else:
        arguments = {"args": list(args), "kwargs": kwargs}
    encoded = {name: _encode(value, f"{fn_name}({name}=...)") for name, value in arguments.items()}
    text = json.dumps([fn_name, encoded], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text


def _preview(fn_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    text = f"{fn_name}({', '.join(shown)})"
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 3] + "..."


def call_cached(
    fn_name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Answer a call from the running config's cache, or make it and record it."""
    current = _scope.get()
    if current is None or current.cache is None:
        return fn(*args, **kwargs)
    key = call_key(fn_name, fn, args, kwargs)
    # The n-th identical call replays the n-th recorded answer.
    n = current.counts.get(key, 0) + 1
    current.counts[key] = n
    full_key = f"{current.config}\x1f{n}\x1f{key}"
    value = current.cache.get(full_key, default=_MISSING, retry=True)
    if value is not _MISSING:
        current.stats.hits += 1
        return value
    if current.mode == "replay":
        current.counts[key] = n - 1
        miss = CacheMiss(
            f"config {current.config!r}: call #{n} {_preview(fn_name, args, kwargs)} "
            "was never recorded; replay makes no real call"
        )
        current.stats.miss = current.stats.miss or miss
        raise miss
    try:
        value = fn(*args, **kwargs)
    except BaseException:
        current.counts[key] = n - 1  # a call that raises is not recorded and takes no slot
        raise
    current.cache.set(full_key, value, tag=current.config, retry=True)
    current.stats.misses += 1
    return value


@overload
def cached(fn: F, /) -> F: ...
@overload
def cached(*, name: str | None = None) -> Callable[[F], F]: ...
def cached(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Record calls to fn per config, so that a finished config replays without paying again."""

    def wrap(function: F) -> F:
        key_name = name or function.__name__

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return call_cached(key_name, function, args, kwargs)

        wrapper.__resweep_cached__ = key_name  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    if fn is not None:
        if not callable(fn):
            raise TypeError("@resweep.cached takes a function, or name= as a keyword")
        return wrap(fn)
    return wrap


# -- replay ----------------------------------------------------------------------------------


@dataclass
class Replay:
    """One replayed config: its new result, the stored one, and how they differ."""

    name: str
    result: Any
    stored: Any
    differences: list[str]
    cache_hits: int

    @property
    def equal(self) -> bool:
        return not self.differences

    def describe(self) -> str:
        if self.equal:
            return f"{self.name}: replayed result equals the stored one ({self.cache_hits} cached calls)"
        lines = [f"{self.name}: replayed result differs from the stored one:"]
        lines += [f"  {d}" for d in self.differences]
        return "\n".join(lines)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "(result)": value}


def differences(new: Any, old: Any) -> list[str]:
    """Key-by-key differences between two results ('key: stored -> replayed')."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if json.dumps(va, sort_keys=True, default=repr) != json.dumps(
            vb, sort_keys=True, default=repr
        ):
            show_a = "(missing)" if va is _MISSING else repr(va)
            show_b = "(missing)" if vb is _MISSING else repr(vb)
            out.append(f"{key}: stored {show_a}, replayed {show_b}")
    return out


class _StderrLog:
    """During replay, ctx.log and its records go to the terminal of the person debugging."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def replay_experiment(experiment: Experiment, name: str | None) -> Replay | list[Replay]:
    """Re-run done configs in this process; any call missing from the cache raises CacheMiss."""
    from resweep.experiment import Context, lookup, takes_context
    from resweep.runner import to_plain_result

    state = experiment.read_state()
    if name is not None:
        record = lookup(state, str(name))
        if record["status"] != "done":
            raise ResweepError(
                f"config {name!r} is {record['status']}; only done configs can be replayed"
            )
        names = [str(name)]
    else:
        names = [n for n, r in state.configs.items() if r["status"] == "done"]
    named = experiment.named_configs() if experiment.configs is not None else {}
    setup = experiment.setup
    value = setup.common() if setup is not None and setup.common else None
    if setup is not None and setup.per_worker is not None:
        setup.per_worker(value)
    takes_ctx = takes_context(experiment.function)
    replays = []
    for config_name in names:
        record = state.configs[config_name]
        config = named[config_name][0] if config_name in named else record["params"]
        stats = CallStats()
        with tempfile.TemporaryDirectory(prefix=f"resweep-replay-{config_name[:40]}-") as tmp:
            ctx = Context(
                name=config_name,
                config=config,
                dir=Path(tmp),
                shared=experiment.context,
                attempt=record.get("attempts", 1),
                log_stream=_StderrLog(),
            )
            output_dir = experiment.store.root if experiment.cache else None
            with scope(output_dir, config_name, "replay", stats):
                raw = experiment.function(config, ctx) if takes_ctx else experiment.function(config)
        result = to_plain_result(raw)
        stored = record.get("result")
        replays.append(Replay(config_name, result, stored, differences(result, stored), stats.hits))
    return replays[0] if name is not None else replays
