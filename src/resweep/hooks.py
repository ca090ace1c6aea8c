"""Lifecycle hooks: how they are named and loaded, what they are given, one dispatcher per run.

Every event runs in the coordinating process (the one that runs `python exp.py run`), in its
main thread, one hook after another in the order declared, whatever the backend:

    on_error(context, error)             a run that cannot start: bad setup, a lock refused
    on_run_start(context)                the lock is held, the state read, the session known
      on_config_start(context)           once per attempt that really started, never one queued
      on_config_end(context, outcome)    once per attempt ended, after its record is synced
    on_run_end(context, report)          the run ended with a report (a stop by Ctrl-C too)
    on_error(context, error)             or it ended by an error: on_error instead of on_run_end

Hooks never write the state file; they write under output_dir/hooks/<hook id>/ through
context.artifacts.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import logging
import os
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from resweep import plugins
from resweep.artifacts import ArtifactWriter
from resweep.errors import ConfigError, HookError, PluginError, ResweepError, ResweepWarning

Event = Literal["on_run_start", "on_config_start", "on_config_end", "on_run_end", "on_error"]
EVENTS: tuple[Event, ...] = (
    "on_run_start",
    "on_config_start",
    "on_config_end",
    "on_run_end",
    "on_error",
)
log = logging.getLogger("resweep.hooks")


@dataclass(frozen=True)
class HookContext:
    """What a hook is told with every event; the config fields only for config events."""

    # The hook's own id: its plugin id, or the dotted path of its class or function.
    hook: str
    # The run session (as in the state's sessions); None before it is recorded, or when a run
    # has nothing to run.
    session: str | None
    experiment: str | None
    output_dir: Path
    backend: str
    max_workers: int
    # The experiment's extensions: settings by namespace, for every hook.
    extensions: Mapping[str, Any]
    # The code fingerprint recorded with every done config of this run.
    fingerprint: str | None = None
    config: str | None = None
    attempt: int | None = None
    # Where the config ran: "host:pid", with the thread for the threading backend.
    worker: str | None = None
    # The config's full params, as the state records them.
    params: Mapping[str, Any] | None = None

    @property
    def settings(self) -> Mapping[str, Any]:
        """extensions[<hook id>], or an empty mapping."""
        value = self.extensions.get(self.hook)
        return value if isinstance(value, Mapping) else {}

    @property
    def artifacts(self) -> ArtifactWriter:
        """Atomic JSON and CSV writes under output_dir/hooks/<hook id>/."""
        return ArtifactWriter.for_hook(self.output_dir, self.hook)


@dataclass(frozen=True)
class ConfigOutcome:
    """How one attempt of a config ended, as the state now durably records it."""

    name: str
    # "done", "failed", or "todo" for a failed attempt that a retry within this run follows.
    status: Literal["done", "failed", "todo"]
    attempt: int
    result: Any = None
    error: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    duration_s: float | None = None

    @property
    def final(self) -> bool:
        """Whether this is the config's outcome for this run (no retry follows)."""
        return self.status != "todo"


@dataclass(frozen=True)
class HookSpecs:
    """The hooks an experiment declares, before they are loaded."""

    hooks: Sequence[Any] = ()
    fail_fast: bool = True
    extensions: Mapping[str, Any] = field(default_factory=dict)


class Hook:
    """One loaded hook: an object with on_* methods, or a function (event, context, payload)."""

    def __init__(self, id: str, target: Any) -> None:
        self.id = id
        self.target = target
        # An object with any on_* method is an object hook, even if it is callable too.
        self.is_function = callable(target) and not any(
            callable(getattr(target, event, None)) for event in EVENTS
        )

    def handler(self, event: Event) -> Callable[..., Any] | None:
        if self.is_function:
            target = self.target

            def call(context: HookContext, payload: Any = None) -> Any:
                return target(event, context, payload)

            return call
        method = getattr(self.target, event, None)
        return method if callable(method) else None


def _copied(value: Any) -> Any:
    """A deep copy for a hook to change freely: the state's records and the user's settings
    stay as they are. What cannot be copied (a client in extensions) is handed as it is, the
    dicts and lists around it copied."""
    try:
        return copy.deepcopy(value)
    except Exception:
        if isinstance(value, Mapping):
            return {key: _copied(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set):
            items = [_copied(item) for item in value]
            return type(value)(items) if type(value) in (list, tuple, set) else items
        return value


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def _import_path(path: str) -> Any:
    """The object a dotted path ("pkg.mod.Name", or "pkg.mod:Name") names."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(f"hook {path!r}: give a hook id or a dotted path like pkg.mod.Hook")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"hook {path!r}: cannot import {module_name}: {error}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"hook {path!r}: {module_name} has no {attribute}") from None
    return target


def _from_target(id: str, target: Any) -> Hook:
    if inspect.isclass(target):
        if not any(callable(getattr(target, event, None)) for event in EVENTS) and not any(
            "__call__" in vars(base) for base in inspect.getmro(target)
        ):
            # A typo (on_run_finish) would leave a hook that never fires: refuse it now.
            others = sorted(n for n in vars(target) if n.startswith("on_"))
            defined = f" ({', '.join(others)} is no event)" if others else ""
            raise ConfigError(
                f"hook {id!r}: class {target.__qualname__} defines no event method{defined}; "
                f"define any of {', '.join(EVENTS)}"
            )
        try:
            instance = target()
        except ResweepError:
            raise
        except (Exception, SystemExit) as error:
            raise ConfigError(
                f"hook {id!r}: {target.__qualname__}() failed: {type(error).__name__}: {error}"
            ) from None
        return Hook(id, instance)
    if callable(target) or any(callable(getattr(target, event, None)) for event in EVENTS):
        return Hook(id, target)  # a function (a partial, a callable object) or an object hook
    raise ConfigError(
        f"hook {id!r} ({type(target).__name__}) is not a hook: give a class with on_* methods, an instance "
        "of one, a function (event, context, payload=None), a hook id or a dotted path"
    )


def spec_id(spec: Any) -> str:
    """The id a hook spec loads as: the id or path as written, else the dotted path of the
    class or function (of an instance's class)."""
    if isinstance(spec, str):
        return spec
    if inspect.isclass(spec) or inspect.isfunction(spec):
        return _qualified(spec)
    if isinstance(spec, functools.partial):
        return _qualified(spec.func)
    return _qualified(type(spec))


def load_hook(spec: Any) -> Hook:
    """A hook from what a user wrote: an id, a dotted path, a class, a function, an instance."""
    if isinstance(spec, str):
        if "." in spec or ":" in spec:
            return _from_target(spec, _import_path(spec))
        return _from_target(spec, plugins.load("hook", spec))
    return _from_target(spec_id(spec), spec)


def merge_hooks(own: Sequence[Any], from_file: Sequence[Any]) -> list[Any]:
    """An experiment's hooks, then those of its sweep file that it does not declare already: a
    file's id or dotted path naming one of the experiment's hooks would run it twice."""
    declared = {spec_id(spec).replace(":", ".") for spec in own}
    return [
        *own,
        *(s for s in from_file if not (isinstance(s, str) and s.replace(":", ".") in declared)),
    ]


def load_hooks(specs: Sequence[Any]) -> list[Hook]:
    """Every hook loaded, each with an id of its own (a repeated one gets -2, -3, ...).

    The same id, path or object twice is refused: it would run twice, the second reading no
    settings. Two instances of one class are two hooks, the second with id <class path>-2.
    """
    if isinstance(specs, str | bytes) or not isinstance(specs, Sequence):
        raise ConfigError(f"hooks must be a list, not {type(specs).__name__}")
    loaded: list[Hook] = []
    seen: Counter[str] = Counter()
    paths: set[str] = set()
    objects: list[Any] = []
    for spec in specs:
        if isinstance(spec, str):
            repeated = spec.replace(":", ".") in paths
            paths.add(spec.replace(":", "."))
        else:
            repeated = any(given is spec for given in objects)
            objects.append(spec)
        if repeated:
            raise ConfigError(f"hook {spec_id(spec)!r} is declared twice in hooks; declare it once")
        hook = load_hook(spec)
        seen[hook.id] += 1
        if seen[hook.id] > 1:
            hook.id = f"{hook.id}-{seen[hook.id]}"
        loaded.append(hook)
    return loaded


class Hooks:
    """The hooks of one run and what they are told; hooks_fail_fast decides what a raise does.

    fire() never raises a hook's exception: with fail_fast the first one becomes `failure`,
    which the run checks to stop; without, each is logged (the first of each hook and event in
    full, the rest counted and reported when the run ends). The one exception is a PluginError
    from on_run_start: a hook that cannot work in this setup refuses the run as bad input does.
    """

    def __init__(
        self,
        hooks: list[Hook],
        *,
        fail_fast: bool,
        extensions: Mapping[str, Any],
        output_dir: str | os.PathLike[str],
        experiment: str | None,
        backend: str,
        max_workers: int,
    ) -> None:
        self.hooks = hooks
        self.fail_fast = fail_fast
        self.extensions = dict(extensions)
        self.output_dir = Path(output_dir)
        self.experiment = experiment
        self.backend = backend
        self.max_workers = max_workers
        self.session: str | None = None
        self.fingerprint: str | None = None
        # The first hook exception under fail_fast: the run stops with it.
        self.failure: HookError | None = None
        self.run_started = False
        self.ended = False
        self._repeats: Counter[tuple[str, str]] = Counter()
        # Set while on_error fires: fail_fast has nothing left to stop.
        self._in_error = False

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def wants(self, event: Event) -> bool:
        return any(hook.handler(event) is not None for hook in self.hooks)

    def context(self, hook: Hook, **config: Any) -> HookContext:
        """What one hook is told: copies of params and extensions, its own to change."""
        if config.get("params") is not None:
            config["params"] = _copied(config["params"])
        return HookContext(
            hook=hook.id,
            session=self.session,
            experiment=self.experiment,
            output_dir=self.output_dir,
            backend=self.backend,
            max_workers=self.max_workers,
            extensions=_copied(self.extensions),
            fingerprint=self.fingerprint,
            **config,
        )

    def fire(self, event: Event, payload: Any = None, **config: Any) -> None:
        """Tell every hook, in order; config: config, attempt, worker, params."""
        for hook in self.hooks:
            handler = hook.handler(event)
            if handler is None:
                continue
            context = self.context(hook, **config)
            try:
                if event in ("on_run_start", "on_config_start"):
                    handler(context)
                elif isinstance(payload, ConfigOutcome):
                    # The result as the state holds it: each hook gets a copy of its own.
                    handler(context, dataclasses.replace(payload, result=_copied(payload.result)))
                else:
                    handler(context, payload)
            except (Exception, SystemExit, GeneratorExit) as error:
                # sys.exit() in a hook is a hook failure like any other: it must not end the run
                # with that status, unheard by on_error and on_run_end.
                if isinstance(error, PluginError) and event == "on_run_start":
                    raise  # a hook that cannot work here (no store, say): a bad setup, exit 2
                self._raised(hook, event, context, error)

    def run_start(self) -> None:
        if not self.run_started:
            self.run_started = True
            self.fire("on_run_start")

    def run_end(self, report: Any) -> None:
        """on_run_end once; then a HookError if a hook stopped the run (fail_fast)."""
        self.run_start()
        if not self.ended:
            self.ended = True
            self.fire("on_run_end", report)
        self._report_repeats()

    def error(self, error: BaseException) -> None:
        """on_error once for a run that ends by an error; a hook raising here is only logged."""
        if self.ended:
            return
        self.ended = True
        # The run is ending by an error already: a hook raising now can only be logged.
        self._in_error = True
        try:
            self.fire("on_error", error)
        finally:
            self._in_error = False
        self._report_repeats()

    def _raised(self, hook: Hook, event: str, context: HookContext, error: BaseException) -> None:
        where = f"hook {hook.id!r} raised in {event}"
        if context.config is not None:
            where += f" for config {context.config!r} (attempt {context.attempt})"
        if self.session is not None:
            where += f", session {self.session}"
        text = str(error).strip().splitlines()
        line = f"{where}: {type(error).__name__}" + (f": {text[0]}" if text else "")
        if self.fail_fast and not self._in_error:
            if self.failure is None:
                stopped = (
                    "the replay stopped (hooks fail_fast is on)"
                    if self.backend == "replay"
                    else "the run stopped (hooks fail_fast is on); state saved, details in "
                    "run_failure.txt"
                )
                self.failure = HookError(
                    f"{line}; {stopped}",
                    f"{line}\n" + "".join(traceback.format_exception(error)),
                )
            return
        key = (hook.id, event)
        self._repeats[key] += 1
        if self._repeats[key] == 1:
            if self._in_error:
                log.warning("%s; the run was already stopping", line)
            else:
                log.warning("%s; the run goes on (hooks fail_fast is off)", line)

    def _report_repeats(self) -> None:
        for (hook_id, event), count in self._repeats.items():
            if count > 1:
                log.warning("hook %r raised %d more times in %s", hook_id, count - 1, event)
        self._repeats.clear()

    def check(self) -> None:
        """Raise the HookError of a hook that stopped the run."""
        if self.failure is not None:
            raise self.failure


def prepare(
    specs: HookSpecs, *, output_dir: str | os.PathLike[str], experiment: str | None,
    backend: str, max_workers: int,
) -> Hooks:  # fmt: skip
    """The dispatcher of one run; an unknown id or a bad hook is an error before anything runs."""
    if not isinstance(specs.extensions, Mapping):
        raise ConfigError(f"extensions must be a mapping, not {type(specs.extensions).__name__}")
    loaded = load_hooks(specs.hooks)
    ids = [hook.id for hook in loaded]
    for namespace in specs.extensions:
        if loaded and namespace not in ids:
            # Likely a namespace written for a hook under another name ("Notify" for a class
            # whose id is "__main__.Notify"): its context.settings would be empty.
            warnings.warn(
                f"extensions namespace {namespace!r} is no hook's id (this run's hooks: "
                f"{', '.join(ids)}); a hook's context.settings is extensions[<its id>]",
                ResweepWarning,
                stacklevel=4,
            )
    return Hooks(
        loaded,
        fail_fast=bool(specs.fail_fast),
        extensions=specs.extensions,
        output_dir=output_dir,
        experiment=experiment,
        backend=backend,
        max_workers=max_workers,
    )
