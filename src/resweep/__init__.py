"""resweep: resumable, persistent experiment sweeps that survive anything."""

from __future__ import annotations

import typing

from resweep.errors import (
    CacheKeyError,
    CacheMiss,
    ConfigError,
    HookError,
    LockedError,
    PluginError,
    ResultError,
    ResweepError,
    ResweepWarning,
    SelectionError,
    StateError,
    StorageError,
    UnknownConfigError,
)

if typing.TYPE_CHECKING:
    from resweep.artifacts import ArtifactWriter
    from resweep.cache import cached
    from resweep.experiment import Experiment
    from resweep.hooks import ConfigOutcome, HookContext
    from resweep.options import RunOptions
    from resweep.plugins import register_backend, register_hook
    from resweep.replay import Replay
    from resweep.runner import RunReport
    from resweep.status import StatusReport
    from resweep.summary import ExperimentView, load_summary
    from resweep.summary import open_experiment as open
    from resweep.sweeps import grid, load_configs
    from resweep.worker import Context, WorkerSetup

# Imported when first asked for: a worker process unpickling one function imports only what
# running a config needs, not the scheduler, the summary or the command line.
_LAZY = {
    "ArtifactWriter": ("resweep.artifacts", "ArtifactWriter"),
    "cached": ("resweep.cache", "cached"),
    "Experiment": ("resweep.experiment", "Experiment"),
    "ConfigOutcome": ("resweep.hooks", "ConfigOutcome"),
    "HookContext": ("resweep.hooks", "HookContext"),
    "RunOptions": ("resweep.options", "RunOptions"),
    "register_backend": ("resweep.plugins", "register_backend"),
    "register_hook": ("resweep.plugins", "register_hook"),
    "Replay": ("resweep.replay", "Replay"),
    "RunReport": ("resweep.runner", "RunReport"),
    "StatusReport": ("resweep.status", "StatusReport"),
    "ExperimentView": ("resweep.summary", "ExperimentView"),
    "load_summary": ("resweep.summary", "load_summary"),
    "open": ("resweep.summary", "open_experiment"),
    "grid": ("resweep.sweeps", "grid"),
    "load_configs": ("resweep.sweeps", "load_configs"),
    "Context": ("resweep.worker", "Context"),
    "WorkerSetup": ("resweep.worker", "WorkerSetup"),
}


def __getattr__(name: str) -> typing.Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'resweep' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "ArtifactWriter",
    "CacheKeyError",
    "CacheMiss",
    "ConfigError",
    "ConfigOutcome",
    "Context",
    "Experiment",
    "ExperimentView",
    "HookContext",
    "HookError",
    "LockedError",
    "PluginError",
    "Replay",
    "ResultError",
    "ResweepError",
    "ResweepWarning",
    "RunOptions",
    "RunReport",
    "SelectionError",
    "StateError",
    "StatusReport",
    "StorageError",
    "UnknownConfigError",
    "WorkerSetup",
    "__version__",
    "cached",
    "grid",
    "load_configs",
    "load_summary",
    "open",
    "register_backend",
    "register_hook",
]
