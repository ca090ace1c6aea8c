"""Overhead: 10,000 no-op configs on 2 workers, resweep against raw joblib.Parallel."""

from __future__ import annotations

import os
import sys

from harness import (
    JOBLIB_SCRIPT,
    PYTHON,
    RESWEEP_SCRIPT,
    Workdir,
    check,
    compile_resweep,
    describe,
    heading,
    interleaved,
    machine,
    ratio,
    run_process,
    verdict,
)

N_CONFIGS = int(os.environ.get("RESWEEP_BENCH_OVERHEAD_N", "10000"))
WORKERS = 2
GOAL_RATIO = 1.5

# What every durable runner pays per config whatever its code: a directory and a result
# file written atomically, split over the same two processes.
DISK_FLOOR_SCRIPT = """\
import os
import sys
from multiprocessing import Pool


def store(args):
    root, start, stop = args
    for i in range(start, stop):
        d = os.path.join(root, f"i={i}")
        os.mkdir(d)
        tmp = os.path.join(d, ".result.yaml.tmp")
        with open(tmp, "w") as handle:
            handle.write("# meta\\nnull\\n")
        os.replace(tmp, os.path.join(d, "result.yaml"))


if __name__ == "__main__":
    root, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.makedirs(root)
    step = -(-n // workers)
    with Pool(workers) as pool:
        pool.map(store, [(root, s, min(s + step, n)) for s in range(0, n, step)])
"""


def main() -> None:
    heading(f"overhead: {N_CONFIGS} no-op configs, {WORKERS} workers, whole processes")
    compile_resweep()
    print(machine())
    with Workdir() as work:
        exp = work.script("exp.py", RESWEEP_SCRIPT)
        raw = work.script("raw_joblib.py", JOBLIB_SCRIPT)
        floor = work.script("disk_floor.py", DISK_FLOOR_SCRIPT)
        env = {"BENCH_N": str(N_CONFIGS), "BENCH_WORKERS": str(WORKERS)}

        def resweep() -> float:
            out = work.fresh("out")
            argv = [PYTHON, str(exp), "run", f"--max-workers={WORKERS}", "--progress=False"]
            sample = run_process(argv, env={**env, "BENCH_OUT": str(out)})
            return check(sample, "resweep run").wall_s

        def joblib() -> float:
            return check(run_process([PYTHON, str(raw)], env=env), "joblib").wall_s

        def disk_floor() -> float:
            out = work.fresh("floor")
            argv = [PYTHON, str(floor), str(out), str(N_CONFIGS), str(WORKERS)]
            return check(run_process(argv), "disk floor").wall_s

        figures = interleaved({"resweep": resweep, "joblib": joblib, "disk": disk_floor})
    overhead = ratio(figures["resweep"], figures["joblib"])
    print(f"resweep run              {describe(figures['resweep'])}")
    print(f"raw joblib.Parallel      {describe(figures['joblib'])}")
    print(f"disk floor (mkdir+file)  {describe(figures['disk'])}")
    print(f"per config: resweep {describe([t / N_CONFIGS for t in figures['resweep']], 'us', 1e6)}")
    print(
        f"ratio resweep / joblib: {overhead:.2f}x (goal <= {GOAL_RATIO}x: "
        f"{verdict(overhead <= GOAL_RATIO)})"
    )
    print(f"ratio disk floor / joblib: {ratio(figures['disk'], figures['joblib']):.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
