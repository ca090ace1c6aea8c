"""The backends by name, and the pool a run's options ask for."""

from __future__ import annotations

from resweep.options import RunOptions
from resweep.pools.base import Pool


def open_pool(options: RunOptions) -> Pool:
    """The pool for a run's backend; nothing connects or starts before Pool.start but loky's
    workers, which import Python while the coordinator prepares the run."""
    if options.backend == "dask":
        from resweep.pools.dask import DaskPool

        return DaskPool(options.scheduler, options.max_workers)
    from resweep.pools.local import LocalPool

    return LocalPool(options.backend, options.max_workers)
