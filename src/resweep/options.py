"""RunOptions: how one run goes, checked once and passed from the CLI to the scheduler."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from resweep import plugins
from resweep.errors import PluginError, ResweepError

Backend = Literal["loky", "threading", "sequential", "dask"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Everything a run takes besides the experiment: Experiment.run's keywords."""

    max_workers: int = 1
    retry_failed: bool = False
    # Answer a retried failed config from its failed attempt's calls instead of asking afresh.
    reuse_calls: bool = False
    # One of BACKENDS, or the id of a backend plugin (resweep.backends, register_backend).
    backend: Backend | str = "loky"
    # A glob on config names.
    only: str | None = None
    # Globs on config fields (dotted for nested): a config runs when its fields match them all.
    where: Mapping[str, Any] | None = None
    # Ignore the recorded calls of the configs this run runs.
    fresh: bool = False
    progress: bool = True
    # Take over a lock whose holder cannot be proven dead (another host).
    break_lock: bool = False
    # A Dask scheduler's address, for backend "dask".
    scheduler: str | None = None
    # Also run done configs whose code fingerprint differs from the current code.
    rerun_changed: bool = False
    # Stop handing out configs after the first one that fails (pytest's -x).
    fail_fast: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS and not (
            isinstance(self.backend, str) and plugins.is_known("backend", self.backend)
        ):
            raise PluginError(
                f"unknown backend {self.backend!r}; known backends: "
                + ", ".join(plugins.known_ids("backend"))
            )
        workers = self.max_workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ResweepError(
                f"max_workers must be a whole number >= 1, not {workers!r}; "
                "pass --max-workers 1 or more"
            )
        if self.only is not None and not isinstance(self.only, str):
            object.__setattr__(self, "only", str(self.only))
        if self.reuse_calls and not self.retry_failed:
            raise ResweepError(
                "reuse_calls answers retried failed configs from their failed attempt's calls; "
                "it goes with --retry-failed (retry_failed=True)"
            )
        if self.backend != "dask" and self.scheduler is not None:
            raise ResweepError(
                f"a scheduler address is for the dask backend, not {self.backend!r}; "
                "add --backend dask (backend='dask')"
            )
        if self.backend == "dask":
            import importlib.util

            if importlib.util.find_spec("distributed") is None:
                raise ResweepError(
                    "the dask backend needs Dask, which is not installed: "
                    "pip install 'dask[distributed]>=2024.1' (resweep's dask extra)"
                )

    @property
    def in_process(self) -> bool:
        """Configs run inside the coordinator (threads, or one after another)."""
        return self.backend in ("threading", "sequential")
