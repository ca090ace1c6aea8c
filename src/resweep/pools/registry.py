"""The backends by name, and the pool a run's options ask for."""

from __future__ import annotations

from resweep import plugins
from resweep.errors import PluginError
from resweep.options import BACKENDS, RunOptions
from resweep.pools.base import Pool
from resweep.pools.plugin import PluginPool


def open_pool(options: RunOptions) -> Pool:
    """The pool for a run's backend; nothing connects or starts before Pool.start but loky's
    workers, which import Python while the coordinator prepares the run.

    Any other backend is a plugin's: its factory takes the run's options and returns a Pool."""
    if options.backend not in BACKENDS:
        factory = plugins.load("backend", options.backend)
        try:
            pool: Pool = factory(options)
        except PluginError:
            raise
        except (Exception, SystemExit) as error:
            raise PluginError(
                f"backend {options.backend!r} could not start a pool: {type(error).__name__}: "
                f"{error}"
            ) from error
        missing = [m for m in _POOL_METHODS if not callable(getattr(pool, m, None))]
        missing += [a for a in ("inline", "isolates_batches") if not hasattr(pool, a)]
        if missing:
            raise PluginError(
                f"backend {options.backend!r} returned a {type(pool).__name__}, which lacks "
                f"the Pool members {', '.join(missing)} (see resweep.pools.base.Pool)"
            )
        # Held to the interface: what it raises or hands back amiss is one line naming it.
        return PluginPool(pool, options.backend)
    if options.backend == "dask":
        from resweep.pools.dask import DaskPool

        return DaskPool(options.scheduler, options.max_workers)
    from resweep.pools.local import LocalPool

    return LocalPool(options.backend, options.max_workers)


_POOL_METHODS = (
    "start", "capacity", "batch_size", "submit", "out", "wait", "stop", "executing", "close",
)  # fmt: skip
