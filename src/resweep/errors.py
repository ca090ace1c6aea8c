"""ResweepError and its subclasses: every error resweep raises on purpose."""

from __future__ import annotations


class ResweepError(Exception):
    """Base of every error resweep raises on purpose; the CLI prints it as one line."""


class ConfigError(ResweepError):
    """The configs or their names are unusable: caught before anything runs."""


class StateError(ResweepError):
    """The state file on disk cannot be read or does not match this experiment."""


class UnknownConfigError(ResweepError):
    """A config name that the experiment does not have."""


class SelectionError(ResweepError):
    """An --only or --where selection that names no field or matches no config."""


class ResultError(ResweepError):
    """A config returned something that cannot be stored as YAML."""


class LockedError(ResweepError):
    """Another run holds the experiment directory."""


class CacheMiss(ResweepError):
    """A replayed config made a cached call that was never recorded."""


class PickleRefused(ResweepError):
    """A replay with allow_pickle=False met a cached answer stored as a pickle."""


class CacheKeyError(ResweepError):
    """A cached call has an argument that has no canonical, process-independent encoding."""


class StorageError(ResweepError):
    """The disk failed (full, I/O error, file-size limit) while resweep was writing."""


class HookError(ResweepError):
    """A hook raised while hooks_fail_fast was on: the run stopped, its state saved (exit 1)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        # The hook's traceback, for run_failure.txt.
        self.detail = detail


class PluginError(ResweepError):
    """A hook or backend id that no plugin provides, a plugin that cannot be loaded, or a plugin
    backend that raised while the run used it (exit 2)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        # The plugin's traceback, for run_failure.txt, when it raised during a run.
        self.detail = detail


class ResweepWarning(UserWarning):
    """Something resweep recovered from but wants a person to know (the CLI prints one line)."""
