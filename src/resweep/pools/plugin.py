"""A plugin backend's pool held to the Pool interface: its errors one line, its strays ignored."""

from __future__ import annotations

import traceback
import warnings
from typing import TYPE_CHECKING, Any

from resweep.errors import PluginError, ResweepError, ResweepWarning
from resweep.pools.base import Pool, PoolStopped, Returned

if TYPE_CHECKING:
    from resweep.worker import Job, Task


class PluginPool:
    """Wraps the pool a plugin's factory returned, for the scheduler.

    What its methods raise becomes a PluginError naming the backend (the run stops, its state
    saved, the traceback in run_failure.txt); once broken, stop and close do nothing more. What
    it hands back for configs that are not in flight (an unknown name, an outcome given twice)
    is ignored, with one warning. resweep's own pools are never wrapped.
    """

    def __init__(self, pool: Pool, backend: str) -> None:
        self.pool = pool
        self.backend = backend
        self.broken = False
        self.warned = False
        self.inline = bool(self._call("inline", lambda: pool.inline))
        self.isolates_batches = bool(self._call("isolates_batches", lambda: pool.isolates_batches))

    def _call(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (PoolStopped, ResweepError):
            raise  # the interface's own stop, or an error resweep already says in one line
        except (Exception, SystemExit, GeneratorExit) as error:
            self.broken = True
            text = str(error).strip().splitlines()
            line = f"backend {self.backend!r} raised in {what}: {type(error).__name__}" + (
                f": {text[0]}" if text else ""
            )
            raise PluginError(
                f"{line}; the run stopped, state saved, details in run_failure.txt",
                detail=f"{line}\n" + "".join(traceback.format_exception(error)),
            ) from None

    def start(self, job: Job, *, timeout_s: float | None) -> None:
        self._call("start", self.pool.start, job, timeout_s=timeout_s)

    def capacity(self) -> int:
        return int(self._call("capacity", self.pool.capacity))

    def batch_size(self, mean_config_s: float | None, pending: int) -> int:
        return int(self._call("batch_size", self.pool.batch_size, mean_config_s, pending))

    def submit(self, batches: list[list[Task]]) -> None:
        self._call("submit", self.pool.submit, batches)

    def out(self) -> int:
        if self.broken:
            return int(self._quietly(self.pool.out) or 0)
        return int(self._call("out", self.pool.out))

    def wait(self, timeout_s: float, in_flight: dict[str, Task], *, stopping: bool) -> Returned:
        returned = self._call("wait", self.pool.wait, timeout_s, in_flight, stopping=stopping)
        if not isinstance(returned, Returned):
            self.broken = True
            raise PluginError(
                f"backend {self.backend!r} returned a {type(returned).__name__} from wait, not "
                "a resweep.pools.base.Returned; the run stopped, state saved"
            )
        return self._in_flight_only(returned, in_flight)

    def stop(self, *, kill: bool) -> None:
        if self.broken:
            self._quietly(self.pool.stop, kill=kill)
        else:
            self._call("stop", self.pool.stop, kill=kill)

    def executing(self) -> set[str] | None:
        if self.broken:
            return None  # cannot tell: configs in flight are settled by their results files
        running = self._call("executing", self.pool.executing)
        return None if running is None else set(running)

    def close(self, *, finished: bool) -> None:
        if self.broken:
            self._quietly(self.pool.close, finished=finished)
        else:
            self._call("close", self.pool.close, finished=finished)

    def _quietly(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A broken pool's clean-up, as far as it goes: the first error is the one to tell."""
        try:
            return call(*args, **kwargs)
        except (Exception, SystemExit, GeneratorExit):
            return None

    def _in_flight_only(self, returned: Returned, in_flight: dict[str, Task]) -> Returned:
        """What returned says of configs in flight, each once; the rest ignored with a warning."""
        seen: set[str] = set()
        strays: list[str] = []

        def keep(name: str) -> bool:
            if name in in_flight and name not in seen:
                seen.add(name)
                return True
            strays.append(name)
            return False

        kept = Returned(
            outcomes=[o for o in returned.outcomes if keep(o.name)],
            done=[(t, f) for t, f in returned.done if keep(t.name)],
            failed=[(t, r) for t, r in returned.failed if keep(t.name)],
            again=[(t, f) for t, f in returned.again if keep(t.name)],
            suspects=[(t, f) for t, f in returned.suspects if keep(t.name)],
        )
        if strays and not self.warned:
            self.warned = True
            shown = ", ".join(repr(name) for name in strays[:3])
            warnings.warn(
                f"backend {self.backend!r} handed back configs that are not running ({shown}"
                f"{', ...' if len(strays) > 3 else ''}): an unknown name or an outcome given "
                "twice; ignored, and so will any more be",
                ResweepWarning,
                stacklevel=2,
            )
        return kept
