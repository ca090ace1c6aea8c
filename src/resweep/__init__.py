"""resweep: resumable, persistent experiment sweeps that survive anything."""

from __future__ import annotations

from resweep.cache import cached
from resweep.errors import (
    CacheKeyError,
    CacheMiss,
    ConfigError,
    LockedError,
    ResultError,
    ResweepError,
    StateError,
    StorageError,
    UnknownConfigError,
)
from resweep.experiment import Experiment
from resweep.options import RunOptions
from resweep.replay import Replay
from resweep.runner import RunReport
from resweep.status import StatusReport
from resweep.summary import ExperimentView, load_summary
from resweep.summary import open_experiment as open
from resweep.sweeps import grid, load_configs
from resweep.worker import Context, WorkerSetup

__version__ = "0.1.0"

__all__ = [
    "CacheKeyError",
    "CacheMiss",
    "ConfigError",
    "Context",
    "Experiment",
    "ExperimentView",
    "LockedError",
    "Replay",
    "ResultError",
    "ResweepError",
    "RunOptions",
    "RunReport",
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
]
