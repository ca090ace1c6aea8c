"""The Pool interface that every backend implements, and what a pool hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from resweep.worker import Job, Outcome, Task

# A batch of fast configs should keep a worker busy about this long.
TARGET_BATCH_S = 0.1
MAX_BATCH_SIZE = 2000


@dataclass
class Returned:
    """What a pool hands back to the scheduler: outcomes, and the fate of configs it lost.

    Each lost config comes with the fields its record takes; the scheduler records them.
    """

    # Configs that ran, their outcome stored (or a storage fault to stop on).
    outcomes: list[Outcome] = field(default_factory=list)
    # Lost, but their result file made it: done.
    done: list[tuple[Task, dict[str, Any]]] = field(default_factory=list)
    # Lost and to blame (a timeout, a worker death they alone explain): failed with this reason.
    failed: list[tuple[Task, str]] = field(default_factory=list)
    # Lost through no fault of their own: they go back to the front of the queue.
    again: list[tuple[Task, dict[str, Any]]] = field(default_factory=list)
    # Ran beside a worker's death: each runs again alone, to find the culprit.
    suspects: list[tuple[Task, dict[str, Any]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.done or self.failed or self.again or self.suspects)


class PoolStopped(Exception):
    """The pool broke because a stop reached its workers too: the run ends here."""


def timeout_reason(timeout_s: float | None) -> str:
    """The error of a config that outlived timeout_s."""
    return f"timeout: ran longer than timeout_s={timeout_s:g}"


class Pool(Protocol):
    """Where a run's configs execute; the scheduler drives it and records what comes back."""

    # Runs configs in the coordinator itself: a hard stop interrupts the running config.
    inline: bool
    # A batch that kills its worker harms no other batch: suspects may run beside others.
    isolates_batches: bool

    def start(self, job: Job, *, timeout_s: float | None) -> None:
        """Take the run's job, what every batch needs; configs outliving timeout_s are stopped."""

    def capacity(self) -> int:
        """How many batches may be out at once."""

    def batch_size(self, mean_config_s: float | None, pending: int) -> int:
        """How many configs the next batch takes."""

    def submit(self, batches: list[list[Task]]) -> None:
        """Send batches out; their configs are recorded as running already."""

    def out(self) -> int:
        """How many batches are out now."""

    def wait(self, timeout_s: float, in_flight: dict[str, Task], *, stopping: bool) -> Returned:
        """What came back within timeout_s, and the fate of configs lost meanwhile."""

    def stop(self, *, kill: bool) -> None:
        """Stop what is out; with kill, running configs too where the pool can."""

    def executing(self) -> set[str] | None:
        """The configs running right now, or None when the pool cannot tell."""

    def close(self, *, finished: bool) -> None:
        """Let go of the pool's resources; finished: every config ran and was recorded."""

    # Optional, and asked about every POLL_S: `def waiting(self) -> str | None`, what keeps
    # configs from starting when it is nothing the user can see (a cluster with no worker). The
    # scheduler says it once above the bar.


def batch_size(mean_config_s: float | None, per_config_s: float, pending: int, workers: int) -> int:
    """Configs per batch: about TARGET_BATCH_S of work, a quarter of the rest per worker at most."""
    if mean_config_s is None:
        return 1
    size = int(TARGET_BATCH_S / (mean_config_s + per_config_s))
    balance = pending // (4 * workers)
    return max(1, min(size, balance, MAX_BATCH_SIZE))
