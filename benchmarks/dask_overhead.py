"""Dask overhead: no-op configs on a 2-worker LocalCluster, resweep against raw client.map."""

from __future__ import annotations

import logging
import os
import sys
import time

from harness import (
    Workdir,
    compile_resweep,
    describe,
    heading,
    interleaved,
    machine,
    ratio,
    verdict,
)

N_CONFIGS = int(os.environ.get("RESWEEP_BENCH_DASK_N", "2000"))
WORKERS = 2
GOAL_RATIO = 2.0


def noop(config: object) -> None:
    return None


def main() -> None:
    import distributed

    import resweep

    heading(f"dask overhead: {N_CONFIGS} no-op configs, LocalCluster of {WORKERS} workers")
    compile_resweep()
    print(machine())
    cluster = distributed.LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster)
    try:
        with Workdir() as work:

            def raw() -> float:
                started = time.perf_counter()
                futures = client.map(noop, range(N_CONFIGS), pure=False)
                client.gather(futures)
                elapsed = time.perf_counter() - started
                del futures
                return elapsed

            def run() -> float:
                experiment = resweep.Experiment(
                    function=noop,
                    configs=[{"i": i} for i in range(N_CONFIGS)],
                    output_dir=work.fresh("out"),
                    name="dask-bench",
                )
                started = time.perf_counter()
                report = experiment.run(
                    WORKERS,
                    backend="dask",
                    scheduler=cluster.scheduler_address,
                    progress=False,
                )
                elapsed = time.perf_counter() - started
                if report.done != N_CONFIGS:
                    raise RuntimeError(f"resweep finished only {report.done} of {N_CONFIGS}")
                return elapsed

            raw()  # warm the workers: imports, connections
            figures = interleaved({"resweep": run, "raw": raw})
    finally:
        client.close()
        cluster.close()
    overhead = ratio(figures["resweep"], figures["raw"])
    per_config = {k: [t / N_CONFIGS for t in v] for k, v in figures.items()}
    print(f"resweep run (dask)       {describe(figures['resweep'])}")
    print(f"raw client.map + gather  {describe(figures['raw'])}")
    print(f"per config: resweep {describe(per_config['resweep'], 'us', 1e6)}")
    print(f"per config: raw     {describe(per_config['raw'], 'us', 1e6)}")
    print(
        f"ratio resweep / raw client.map: {overhead:.2f}x (goal <= {GOAL_RATIO}x: "
        f"{verdict(overhead <= GOAL_RATIO)})"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
