"""@cached, the per-config request cache, and replay mode."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import datetime
import decimal
import enum
import errno
import functools
import hashlib
import inspect
import json
import math
import os
import pathlib
import pickle
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from resweep.durable import WriteFault
from resweep.errors import CacheKeyError, CacheMiss, PickleRefused, ResweepError, StateError

CacheMode = Literal["record", "replay"]
# Recorded calls as (key, stored answer), the answer JSON text or a pickle: what travels.
Calls = list[tuple[str, bytes | str]]
CACHE_DIR = "cache"
F = TypeVar("F", bound=Callable[..., Any])
_MISSING = object()
# Longest argument text shown in a CacheMiss message.
_PREVIEW_CHARS = 300
# Longer call texts are stored by their SHA-256, so huge prompts do not bloat the SQLite index.
_MAX_KEY_CHARS = 1024
# Opening waits this long for another process that is opening the same cache.
_OPEN_TIMEOUT_S = 120.0


@dataclass
class CallStats:
    """Cache hits and misses of one config's run."""

    hits: int = 0
    misses: int = 0
    # The first call that replay mode could not answer, raised again after the function returns.
    miss: CacheMiss | None = None


@dataclass
class _Scope:
    output_dir: str | os.PathLike[str] | None  # None when caching is off
    config: str
    mode: CacheMode
    stats: CallStats
    counts: dict[str, int] = field(default_factory=dict)
    # False: a recorded pickle is refused, not loaded (a result directory from someone else).
    allow_pickle: bool = True
    # Threads started with a copied context share this scope.
    lock: threading.Lock = field(default_factory=threading.Lock)
    handle: Any = None

    def cache(self) -> Any:
        """The diskcache.Cache, opened at the first cached call: configs that make none pay nothing."""
        if self.handle is None:
            assert self.output_dir is not None
            self.handle = open_cache(self.output_dir)
        return self.handle


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "resweep_cache", default=None
)
# (pid, directory) -> handle: a forked child opens its own instead of sharing its parent's.
_open_caches: dict[tuple[int, str], Any] = {}
_open_lock = threading.Lock()


def open_cache(output_dir: str | os.PathLike[str]) -> Any:
    """This process's handle on <output_dir>/cache, opened once and under a file lock."""
    directory = os.path.abspath(os.path.join(os.fspath(output_dir), CACHE_DIR))
    key = (os.getpid(), directory)
    handle = _open_caches.get(key)
    if handle is not None:
        return handle
    with _open_lock:
        handle = _open_caches.get(key)
        if handle is None:
            import diskcache
            import filelock

            Path(directory).mkdir(parents=True, exist_ok=True)
            # Opening writes the schema and settings; many processes doing it at once fail with
            # "database is locked" (diskcache issue #85 and kin), so they take turns.
            lock = filelock.FileLock(directory + ".lock", is_singleton=False)
            try:
                with lock.acquire(timeout=_OPEN_TIMEOUT_S):
                    handle = diskcache.Cache(
                        directory,
                        # Recorded calls are never evicted: eviction would silently re-pay them.
                        eviction_policy="none",
                        size_limit=2**62,
                        tag_index=True,
                    )
            except filelock.Timeout:
                raise ResweepError(
                    f"could not open the cache {directory}: another process held "
                    f"{directory}.lock for {_OPEN_TIMEOUT_S:.0f} s"
                ) from None
            _open_caches[key] = handle
    return handle


def close_caches() -> None:
    """Close every cache this process opened (tests and long-lived notebooks)."""
    with _open_lock:
        for (pid, _), handle in _open_caches.items():
            if pid == os.getpid():
                handle.close()
        _open_caches.clear()


@contextlib.contextmanager
def scope(
    output_dir: str | os.PathLike[str] | None,
    config: str,
    mode: CacheMode,
    stats: CallStats,
    *,
    allow_pickle: bool = True,
) -> Iterator[CallStats]:
    """Make cached calls inside this block belong to one config's cache (None: caching off)."""
    token = _scope.set(_Scope(output_dir, config, mode, stats, allow_pickle=allow_pickle))
    try:
        yield stats
    except BaseException as error:
        # A miss that the function caught and turned into another error is still a miss.
        if stats.miss is not None and error is not stats.miss:
            raise stats.miss from error
        raise
    finally:
        _scope.reset(token)
    if stats.miss is not None:
        raise stats.miss  # even when the function swallowed it


def check_cache(output_dir: str | os.PathLike[str]) -> None:
    """A StateError, before anything runs, when cache/ exists but is not a readable cache."""
    import sqlite3

    if not Path(output_dir, CACHE_DIR).exists():
        return
    try:
        open_cache(output_dir).get("\x1fresweep-check", default=None, retry=True)
    except (sqlite3.DatabaseError, OSError) as error:
        close_cache(output_dir)
        where = Path(output_dir, CACHE_DIR).absolute()
        raise StateError(
            f"{where} is not a readable request cache ({error}); restore it, or move it away "
            "to run without its recorded calls (every call is then made again)"
        ) from None


def drop(output_dir: str | os.PathLike[str], names: list[str]) -> None:
    """Forget the recorded calls of these configs (run --fresh)."""
    if not Path(output_dir, CACHE_DIR).exists():
        return
    handle = open_cache(output_dir)
    for name in names:
        handle.evict(name, retry=True)


# A failed attempt's calls are kept apart, under "<config>\x1e<attempt>": the next attempt asks
# afresh, replay and --reuse-calls can still read them.
_ATTEMPT_SEPARATOR = "\x1e"


def attempt_record(config: str, attempt: int) -> str:
    """The tag under which the calls of a failed attempt of config are kept."""
    return f"{config}{_ATTEMPT_SEPARATOR}{attempt}"


def set_aside(output_dir: str | os.PathLike[str], config: str, attempt: int) -> int:
    """Keep a failed attempt's calls as that attempt's record, out of the next attempt's way.

    Returns how many calls were set aside.
    """
    if not Path(output_dir, CACHE_DIR).exists():
        return 0
    handle = open_cache(output_dir)
    entries = calls_of(handle, config)
    if not entries:
        return 0
    record = attempt_record(config, attempt)
    with handle.transact(retry=True):
        for key, blob in entries:
            handle.set(record + key[len(config) :], blob, tag=record, retry=True)
            handle.delete(key, retry=True)
    return len(entries)


def reuse(output_dir: str | os.PathLike[str], config: str, attempt: int) -> int:
    """Answer config's next attempt from the record of its failed attempt (--reuse-calls)."""
    if not Path(output_dir, CACHE_DIR).exists():
        return 0
    handle = open_cache(output_dir)
    record = attempt_record(config, attempt)
    entries = calls_of(handle, record)
    with handle.transact(retry=True):
        for key, blob in entries:
            handle.set(config + key[len(record) :], blob, tag=config, retry=True)
    return len(entries)


def close_cache(output_dir: str | os.PathLike[str]) -> None:
    """Close this process's handle on <output_dir>/cache, if it has one."""
    directory = os.path.abspath(os.path.join(os.fspath(output_dir), CACHE_DIR))
    with _open_lock:
        handle = _open_caches.pop((os.getpid(), directory), None)
    if handle is not None:
        handle.close()


def calls_of(handle: Any, config: str) -> Calls:
    """Every call recorded for one config, as (key, stored answer: JSON text or a pickle)."""
    # diskcache has no public lookup by tag; its tag column is indexed (tag_index=True).
    rows = handle._sql("SELECT key FROM Cache WHERE tag = ? AND raw = 1", (config,)).fetchall()
    entries = []
    for (key,) in sorted(rows):
        blob = handle.get(key, default=_MISSING, retry=True)
        if blob is not _MISSING:
            entries.append((key, blob))
    return entries


def tags(handle: Any) -> set[str]:
    """The configs that have recorded calls in this cache."""
    rows = handle._sql("SELECT DISTINCT tag FROM Cache WHERE tag IS NOT NULL").fetchall()
    return {tag for (tag,) in rows if isinstance(tag, str)}


def add_calls(handle: Any, config: str, entries: Calls) -> None:
    """Store calls recorded elsewhere (on a Dask worker) as config's own."""
    if not entries:
        return
    with handle.transact(retry=True):
        for key, blob in entries:
            handle.set(key, blob, tag=config, retry=True)


# -- keys ------------------------------------------------------------------------------------


class _Unencodable(Exception):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(path, detail)
        self.path = path
        self.detail = detail


def _canonical_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _encode(value: Any, path: str) -> Any:
    """Plain, process-independent data for value; never Python's hash() or an id()."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, list | tuple):
        return [_encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = {}
        for k, v in value.items():
            if not (k is None or isinstance(k, str | int | float | bool)):
                raise _Unencodable(path, f"has a key of type {type(k).__name__}")
            items[_canonical_text(_encode(k, path))] = _encode(v, f"{path}[{k!r}]")
        return {"__map__": sorted(items.items())}
    if isinstance(value, set | frozenset):
        # Sorted by canonical text: a set's iteration order depends on PYTHONHASHSEED.
        members = [_encode(v, f"{path}{{...}}") for v in value]
        return {"__set__": sorted(members, key=_canonical_text)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # The qualified name, not the module: a script's classes live in __main__ in one
        # process and in the script's module in another.
        fields = {
            f.name: _encode(getattr(value, f.name), f"{path}.{f.name}")
            for f in dataclasses.fields(value)
        }
        return {"__dataclass__": type(value).__qualname__, "fields": fields}
    if isinstance(value, bytes | bytearray):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, enum.Enum):
        return {"__enum__": type(value).__qualname__, "value": _encode(value.value, path)}
    if isinstance(value, pathlib.PurePath):
        return {"__path__": str(value)}
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return {"__" + type(value).__name__ + "__": value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {"__timedelta__": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return {"__" + type(value).__name__.lower() + "__": str(value)}
    if type(value).__module__ == "numpy":
        shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
        if isinstance(shape, tuple) and shape and dtype is not None:
            data = _encode(value.tolist(), path)
            return {"__ndarray__": str(dtype), "shape": list(shape), "data": data}
        item = getattr(value, "item", None)
        if callable(item):
            return _encode(item(), path)
    raise _Unencodable(path, f"is a {type(value).__module__}.{type(value).__qualname__}")


def _bound_arguments(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Arguments by parameter name, defaults filled in: f(1), f(x=1) and f(1, y=2) agree."""
    if signature is not None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            pass  # the real call will raise the proper error
        else:
            bound.apply_defaults()
            return dict(bound.arguments)
    return {"*args": list(args), "**kwargs": kwargs}


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def call_key(
    fn_name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    signature: inspect.Signature | object | None = _MISSING,
) -> str:
    """The canonical text of a call: its function's name and its arguments, bound by name."""
    if signature is _MISSING:
        signature = _signature(fn)
    assert signature is None or isinstance(signature, inspect.Signature)
    arguments = _bound_arguments(signature, args, kwargs)
    try:
        encoded = {name: _encode(value, name) for name, value in arguments.items()}
    except _Unencodable as error:
        raise CacheKeyError(
            f"cached call {fn_name}(): argument {error.path} {error.detail}, which has no stable "
            "encoding for a cache key; pass plain data (str, numbers, bytes, lists, dicts, sets, "
            "dataclasses, enums, paths, numpy arrays)"
        ) from None
    except RecursionError:
        raise CacheKeyError(
            f"cached call {fn_name}(): an argument contains itself or is nested too deeply to "
            "encode as a cache key"
        ) from None
    text = _canonical_text([fn_name, encoded])
    if len(text) > _MAX_KEY_CHARS:
        text = f"{fn_name}\x1fsha256:{hashlib.sha256(text.encode()).hexdigest()}"
    return text


def _preview(fn_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    text = f"{fn_name}({', '.join(shown)})"
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 3] + "..."


def function_name(fn: Callable[..., Any]) -> str:
    """The name a call to fn is recorded under: stable across processes, never an address."""
    recorded = getattr(fn, "__resweep_cached__", None)
    if isinstance(recorded, str):
        return recorded
    if isinstance(fn, functools.partial):
        return function_name(fn.func)
    name = getattr(fn, "__name__", None)
    return str(name) if name else type(fn).__qualname__


def call_cached(
    fn_name: str | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    signature: inspect.Signature | object | None = _MISSING,
) -> Any:
    """Answer a call from the running config's cache, or make it and record it."""
    current = _scope.get()
    if current is None:
        return fn(*args, **kwargs)
    if getattr(fn, "__resweep_cached__", None) is not None:
        # ctx.call(a_cached_function, ...): record it once, under the decorator's name.
        fn_name, fn, signature = fn.__resweep_cached__, fn.__wrapped__, _MISSING  # type: ignore[attr-defined]
    while isinstance(fn, functools.partial):
        # Bound arguments of a partial are arguments like any other; its repr has an address.
        args, kwargs = fn.args + args, {**fn.keywords, **kwargs}
        fn, signature = fn.func, _MISSING
    if fn_name is None:
        fn_name = function_name(fn)
    if current.output_dir is None:
        if current.mode == "replay":
            miss = CacheMiss(
                f"config {_shown(current.config)}: {_preview(fn_name, args, kwargs)} cannot be "
                "replayed: the experiment has cache=False, so no call was recorded"
            )
            current.stats.miss = current.stats.miss or miss
            raise miss
        return fn(*args, **kwargs)
    key = call_key(fn_name, fn, args, kwargs, signature)
    with current.lock:
        # The n-th identical call replays the n-th recorded answer.
        n = current.counts.get(key, 0) + 1
        current.counts[key] = n
    full_key = f"{current.config}\x1f{n}\x1f{key}"
    try:
        blob = current.cache().get(full_key, default=_MISSING, retry=True)
    except _database_error() as error:
        raise _damaged(current, error) from None
    if blob is not _MISSING:
        with current.lock:
            current.stats.hits += 1
        if isinstance(blob, str):
            return json.loads(blob)  # stored as JSON: plain data, safe to read from anyone
        if not current.allow_pickle:
            raise PickleRefused(
                f"config {_shown(current.config)}: call #{n} {_preview(fn_name, args, kwargs)} was "
                "recorded as a pickle, which allow_pickle=False (--no-pickle) refuses to load"
            )
        return pickle.loads(blob)
    if current.mode == "replay":
        _release(current, key, n)
        miss = CacheMiss(
            f"config {_shown(current.config)}: call #{n} {_preview(fn_name, args, kwargs)} "
            "was never recorded; replay makes no real call"
        )
        current.stats.miss = current.stats.miss or miss
        raise miss
    try:
        value = fn(*args, **kwargs)
    except BaseException:
        _release(current, key, n)  # a call that raises is not recorded and takes no slot
        raise
    try:
        # JSON where it holds the value exactly (readable with sqlite3, safe to share); else
        # pickled here rather than by diskcache, which stores floats raw and SQLite turns NaN
        # into NULL, and so that an unpicklable answer gets a clear error.
        blob = _json_text(value)
        if blob is None:
            blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        _release(current, key, n)
        raise ResweepError(
            f"cached call {_preview(fn_name, args, kwargs)} returned a "
            f"{type(value).__qualname__} that cannot be pickled, so it cannot be recorded: "
            f"{type(error).__name__}: {error}"
        ) from error
    try:
        current.cache().set(full_key, blob, tag=current.config, retry=True)
    except _database_error() as error:
        raise _damaged(current, error) from None
    with current.lock:
        current.stats.misses += 1
    return value


def _exact_json(value: Any) -> bool:
    """Whether json.loads(json.dumps(value)) gives value back, types and all."""
    kind = type(value)
    if kind is str or kind is bool or kind is int or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(map(_exact_json, value))
    if kind is dict:
        return all(type(k) is str and _exact_json(v) for k, v in value.items())
    return False


def _json_text(value: Any) -> str | None:
    """The value as JSON text when JSON holds it exactly, else None (it is pickled)."""
    try:
        text = json.dumps(value, ensure_ascii=False) if _exact_json(value) else None
        if text is not None:
            text.encode()  # SQLite keeps text as UTF-8: a lone surrogate goes to pickle
        return text
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None


def _shown(config: str) -> str:
    """A config as a message names it: a failed attempt's record as 'name' (attempt N)."""
    name, _, attempt = config.partition(_ATTEMPT_SEPARATOR)
    return f"{name!r} (attempt {attempt})" if attempt else repr(name)


def _database_error() -> type[Exception]:
    """SQLite's error class, imported only once something was raised (except clauses)."""
    import sqlite3

    return sqlite3.DatabaseError


def _damaged(current: _Scope, error: Exception) -> WriteFault:
    """A damaged cache is the disk's problem, not the config's: the run stops, the config is todo."""
    assert current.output_dir is not None
    where = os.path.join(os.fspath(current.output_dir), CACHE_DIR)
    return WriteFault(errno.EIO, f"the request cache is damaged ({error})", where)


def _release(current: _Scope, key: str, n: int) -> None:
    """Give back slot n of key, unless a concurrent identical call has taken a later one."""
    with current.lock:
        if current.counts.get(key) == n:
            current.counts[key] = n - 1


@overload
def cached(fn: F, /) -> F: ...
@overload
def cached(*, name: str | None = None) -> Callable[[F], F]: ...
def cached(fn: Any = None, /, *, name: str | None = None) -> Any:
    """Record calls to fn per config, so that a finished config replays without paying again."""
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"@resweep.cached(name=...) takes a non-empty string, not {name!r}")

    def wrap(function: F) -> F:
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            raise TypeError(
                f"@resweep.cached cannot record {function.__qualname__}: it is async, and a "
                "coroutine cannot be pickled; cache the synchronous call it awaits"
            )
        key_name = name or function.__name__
        signature = _signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return call_cached(key_name, function, args, kwargs, signature)

        wrapper.__resweep_cached__ = key_name  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    if fn is not None:
        if not callable(fn):
            raise TypeError("@resweep.cached takes a function, or name= as a keyword")
        return wrap(fn)
    return wrap
