"""Hooks and backends by id: entry points of installed packages, and register_* at run time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from resweep.errors import PluginError

Kind = Literal["hook", "backend"]
# The entry-point groups a pip-installed package declares its plugins under.
GROUPS: dict[Kind, str] = {"hook": "resweep.hooks", "backend": "resweep.backends"}
# The backends resweep ships: not plugins, but ids like theirs.
BUILTIN_BACKENDS = ("loky", "threading", "sequential", "dask")

_registered: dict[Kind, dict[str, Callable[..., Any]]] = {"hook": {}, "backend": {}}


@dataclass(frozen=True)
class Plugin:
    """One hook or backend that an id names, and where it comes from."""

    kind: Kind
    id: str
    # "module:attribute" of the factory, as the entry point says it (or as registered).
    target: str
    # The distribution that declares it, "name version"; "registered" for register_*.
    source: str
    # An entry point with the id of one of resweep's own backends: never used, only listed.
    shadowed: bool = False


def register_hook(id: str, factory: Callable[..., Any]) -> None:
    """Make hook id available to this process: a hook class, a function, or a factory."""
    _register("hook", id, factory)


def register_backend(id: str, factory: Callable[..., Any]) -> None:
    """Make backend id available to this process: factory(options) returns a Pool."""
    if id in BUILTIN_BACKENDS:
        raise PluginError(f"backend id {id!r} is resweep's own; choose another")
    _register("backend", id, factory)


def _register(kind: Kind, id: str, factory: Callable[..., Any]) -> None:
    if not isinstance(id, str) or not id or not id.replace("-", "_").isidentifier():
        raise PluginError(f"a {kind} id is a short name like 'my-cluster', not {id!r}")
    if not callable(factory):
        raise PluginError(f"{kind} {id!r}: register a callable, not {type(factory).__name__}")
    _registered[kind][id] = factory


def _entry_points(kind: Kind) -> dict[str, Any]:
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    for point in entry_points(group=GROUPS[kind]):
        found.setdefault(point.name, point)  # the first on sys.path wins, as imports do
    return found


def _source(point: Any) -> str:
    dist = getattr(point, "dist", None)
    if dist is None:
        return "(unknown distribution)"
    return f"{dist.metadata['Name'] or dist.name} {dist.version}"


def installed(kind: Kind) -> list[Plugin]:
    """Every plugin of a kind, registered ones first (they take precedence), sorted by id."""
    plugins = {
        id: Plugin(kind, id, _qualified(factory), "registered")
        for id, factory in _registered[kind].items()
    }
    for id, point in _entry_points(kind).items():
        shadowed = kind == "backend" and id in BUILTIN_BACKENDS
        plugins.setdefault(id, Plugin(kind, id, point.value, _source(point), shadowed))
    return [plugins[id] for id in sorted(plugins)]


def known_ids(kind: Kind) -> list[str]:
    """The ids a kind accepts, each once: for backends, resweep's own first."""
    ids = [p.id for p in installed(kind) if not p.shadowed]
    return [*BUILTIN_BACKENDS, *ids] if kind == "backend" else ids


def is_known(kind: Kind, id: str) -> bool:
    if kind == "backend" and id in BUILTIN_BACKENDS:
        return True
    return id in _registered[kind] or id in _entry_points(kind)


def load(kind: Kind, id: str) -> Callable[..., Any]:
    """The factory that id names; an unknown id is a PluginError listing the known ones."""
    factory = _registered[kind].get(id)
    if factory is not None:
        return factory
    point = _entry_points(kind).get(id)
    if point is None:
        known = ", ".join(known_ids(kind)) or "none installed"
        raise PluginError(f"unknown {kind} {id!r}; known {kind}s: {known}")
    try:
        loaded: Callable[..., Any] = point.load()
    except (Exception, SystemExit) as error:  # a module that calls sys.exit() as it loads
        raise PluginError(
            f"{kind} {id!r} from {_source(point)} cannot be loaded ({point.value}): "
            f"{type(error).__name__}: {error}"
        ) from None
    return loaded


def _qualified(factory: Callable[..., Any]) -> str:
    module = getattr(factory, "__module__", None) or "?"
    name = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    return f"{module}:{name}"
