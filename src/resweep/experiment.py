"""Experiment, WorkerSetup, Context: what a user declares and what a run sees."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from resweep import identity
from resweep.errors import ConfigError, ResweepError, UnknownConfigError
from resweep.store import State, Store

if TYPE_CHECKING:
    import pandas as pd

    from resweep.runner import Plan

T = TypeVar("T")
# The most config names an unknown name is compared with to suggest close ones.
MAX_SUGGESTION_CANDIDATES = 2000
BACKENDS = ("loky", "threading", "sequential", "dask")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


@dataclass(frozen=True)
class WorkerSetup:
    """Expensive set-up done once per run (common) and once per worker process (per_worker)."""

    # Runs once in the main process when a run starts; returns a picklable value.
    common: Callable[[], Any] | None = None
    # Runs once in every process that runs configs, with common's value, before its first config.
    per_worker: Callable[[Any], Any] | None = None


class Context:
    """What one run of one config sees: its name, directory, shared context and logger."""

    __slots__ = ("_dir", "_log", "_log_stream", "attempt", "config", "name", "shared")

    def __init__(
        self,
        *,
        name: str,
        config: Any,
        dir: str | os.PathLike[str],
        shared: Any,
        attempt: int,
        log_stream: Any,
    ) -> None:
        self.name = name
        self.config = config
        self._dir = dir
        self.shared = shared
        self.attempt = attempt
        self._log_stream = log_stream
        self._log: logging.Logger | None = None

    @property
    def dir(self) -> Path:
        """The config's own directory, for its artifacts (made a Path when first asked for)."""
        if not isinstance(self._dir, Path):
            self._dir = Path(self._dir)
        return self._dir

    @property
    def log(self) -> logging.Logger:
        """A logger whose records land in this config's log.txt."""
        if self._log is None:
            # Not from getLogger: a registered logger per config would live forever.
            logger = logging.Logger(f"resweep.{self.name}", logging.DEBUG)
            handler = logging.StreamHandler(self._log_stream)
            handler.setFormatter(logging.Formatter(_LOG_FORMAT))
            logger.addHandler(handler)
            self._log = logger
        return self._log

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call fn through this config's request cache, like a @cached function."""
        from resweep.cache import call_cached

        # No name here: cache.py names fn (a repr would hold a memory address).
        result: T = call_cached(None, fn, args, kwargs)
        return result

    def __repr__(self) -> str:
        return f"Context(name={self.name!r}, attempt={self.attempt}, dir={str(self.dir)!r})"


@dataclass(frozen=True)
class RunReport:
    """Counts over the whole experiment once a run has stopped."""

    done: int
    failed: int
    todo: int
    # Configs that were running when the run was stopped by a signal.
    interrupted: int
    # Configs executed by this run, retries included.
    executed: int = 0
    # "SIGINT" or "SIGTERM" when a signal stopped the run.
    signal: str | None = None

    @property
    def exit_code(self) -> int:
        if self.signal == "SIGTERM":
            return 143
        if self.signal is not None:
            return 130
        return 0 if self.failed == 0 and self.todo == 0 else 1


def takes_context(function: Callable[..., Any]) -> bool:
    """Whether function wants ctx: it accepts a second positional argument."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


@dataclass(kw_only=True)
class Experiment:
    """A function, the configs to run it on, and the directory that keeps every outcome."""

    function: Callable[..., Any]
    configs: Sequence[Any] | None
    output_dir: str | os.PathLike[str]
    name: str | None = None
    description: str | None = None
    config_naming: Callable[[Any], str] | None = None
    # Handed to every run as ctx.shared.
    context: Any = None
    setup: WorkerSetup | None = None
    cache: bool = True
    timeout_s: float | None = None
    retries: int = 0
    _named: dict[str, tuple[Any, dict[str, Any]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise ConfigError("Experiment.function must be callable")
        if isinstance(self.configs, str | bytes) or (
            self.configs is not None and not isinstance(self.configs, Sequence)
        ):
            # Not iterable at all (configs=42): named_configs refuses it, inside the CLI's care.
            with contextlib.suppress(TypeError):
                self.configs = list(self.configs) if self.configs is not None else None
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be a whole number >= 0, not {self.retries!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(
                f"timeout_s must be a positive number of seconds or None, not {self.timeout_s!r}"
            )
        if self.setup is not None and not isinstance(self.setup, WorkerSetup):
            raise ConfigError("setup must be a resweep.WorkerSetup(common, per_worker)")

    @property
    def store(self) -> Store:
        return Store(self.output_dir)

    def named_configs(self) -> dict[str, tuple[Any, dict[str, Any]]]:
        """Every config by name with its canonical params; bad names fail here, before any run."""
        if self._named is None:
            if self.configs is None:
                state = self.store.read()
                self._named = {n: (r["params"], r["params"]) for n, r in state.configs.items()}
            else:
                if not isinstance(self.configs, Sequence):
                    raise ConfigError(
                        f"configs is a {type(self.configs).__name__}; give a list of dataclass "
                        "instances or dicts"
                    )
                try:
                    self._named = identity.name_configs(self.configs, self.config_naming)
                except ConfigError as error:
                    if ";" in str(error):
                        raise
                    raise ConfigError(f"{error}; fix configs or config_naming") from None
        return self._named

    def read_state(self) -> State:
        return self.store.read()

    # -- running --------------------------------------------------------------------------

    def run(
        self,
        max_workers: int = 1,
        *,
        retry_failed: bool = False,
        backend: str = "loky",
        only: str | None = None,
        fresh: bool = False,
        progress: bool = True,
        break_lock: bool = False,
        scheduler: str | None = None,
        rerun_changed: bool = False,
    ) -> RunReport:
        """Run every todo config (and failed ones with retry_failed); resumable at any point.

        Beyond the contract: break_lock takes over a lock whose holder cannot be proven dead,
        scheduler is a Dask scheduler address, rerun_changed also runs done configs whose code
        fingerprint differs from the current code.
        """
        if backend not in BACKENDS:
            raise ResweepError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ResweepError(
                f"max_workers must be a whole number >= 1, not {max_workers!r}; "
                "pass --max-workers 1 or more"
            )
        if only is not None:
            only = str(only)
        from resweep import runner

        # A finished sweep run again need not be named: its marker vouches for the names.
        finished = runner.finished_key(self) if self.store.finished_path.exists() else None
        named = None if finished is not None else self.named_configs()
        return runner.run_experiment(
            self,
            named,
            finished=finished,
            max_workers=max_workers,
            retry_failed=retry_failed,
            backend=backend,
            only=only,
            fresh=fresh,
            progress=progress,
            break_lock=break_lock,
            scheduler=scheduler,
            rerun_changed=rerun_changed,
        )

    def plan(
        self, *, retry_failed: bool = False, only: str | None = None, rerun_changed: bool = False
    ) -> Plan:
        """What run() would do now, by category; reads the state and writes nothing."""
        from resweep import provenance, runner

        named = self.named_configs()
        store = self.store
        state = store.read() if store.exists() else State()
        return runner.plan(
            state,
            named,
            retry_failed=retry_failed,
            only=None if only is None else str(only),
            rerun_changed=rerun_changed,
            fingerprint=provenance.fingerprint(self.function),
        )

    def status(self) -> dict[str, int]:
        """Counts of configs by status: todo, running, done, failed."""
        return self.read_state().counts()

    def replay(self, name: str | None = None) -> Any:
        """Re-run one done config (or all) here, every cached call answered from the cache."""
        from resweep import cache

        return cache.replay_experiment(self, name)

    # -- summaries and maintenance -------------------------------------------------------

    def save_summary(self, force: bool = False) -> Path:
        """Write summary.csv; without force it refuses while any config is not done."""
        from resweep import summary

        return summary.save_summary(self.store, force=force)

    def load_summary(self) -> pd.DataFrame:
        """summary.csv as a DataFrame with proper dtypes."""
        from resweep import summary

        return summary.load_summary(self.output_dir)

    def clean_index(self) -> list[str]:
        """Drop from the state the configs that are no longer in configs; return their names."""
        if self.configs is None:
            raise ResweepError("clean_index needs the experiment's configs; configs is None")
        named = self.named_configs()
        store = self.store
        with store.lock():
            state = store.read()
            dropped = [n for n in state.configs if n not in named]
            for n in dropped:
                del state.configs[n]
            if dropped:
                store.compact(state)
        return dropped

    def record(self, name: str) -> dict[str, Any]:
        """The state's record of one config; an unknown name is an error that lists close ones."""
        state = self.store.read_one(str(name))
        return lookup(state, str(name))

    def run_cli(self) -> None:
        """The command line: run, status, replay, force_summary, clean_index, show."""
        from resweep import cli

        cli.main(self)


def lookup(state: State, name: str) -> dict[str, Any]:
    """One record by name, or an UnknownConfigError that suggests close names."""
    record = state.configs.get(name)
    if record is None:
        import difflib

        names = list(state.configs)
        if len(names) > MAX_SUGGESTION_CANDIDATES:
            # difflib over 100,000 names takes seconds: compare with those that start alike.
            names = [n for n in names if n[:3] == name[:3]][:MAX_SUGGESTION_CANDIDATES]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        hint = hint or "; the keys under 'configs' in experiment.yaml are the names"
        raise UnknownConfigError(f"no config named {name!r}{hint}")
    return record


def select(names: Sequence[str], only: str | None) -> list[str]:
    """The names matching the glob only (all of them when only is None)."""
    if only is None:
        return list(names)
    return [n for n in names if fnmatch.fnmatchcase(n, only)]
