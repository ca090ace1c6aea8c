"""Overhead: 10,000 no-op configs on 2 workers, resweep against raw joblib.Parallel."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness import (
    JOBLIB_SCRIPT,
    PYTHON,
    RESWEEP_SCRIPT,
    Workdir,
    check,
    compile_resweep,
    count_entries,
    describe,
    heading,
    interleaved,
    machine,
    place_line,
    places,
    ratio,
    run_process,
    verdict,
)

N_CONFIGS = int(os.environ.get("RESWEEP_BENCH_OVERHEAD_N", "10000"))
WORKERS = 2
GOAL_RATIO = 1.5

# resweep's own goal: files and directories it leaves under output_dir for a no-op sweep.
FILES_GOAL = 100


def main() -> None:
    heading(f"overhead: {N_CONFIGS} no-op configs, {WORKERS} workers, whole processes")
    compile_resweep()
    print(machine())
    for label, base in places():
        print(place_line(label, base))
        measure(base)


def measure(base: str) -> None:
    """resweep and raw joblib, interleaved, with their scratch under base."""
    with Workdir(base) as work:
        exp = work.script("exp.py", RESWEEP_SCRIPT)
        raw = work.script("raw_joblib.py", JOBLIB_SCRIPT)
        env = {"BENCH_N": str(N_CONFIGS), "BENCH_WORKERS": str(WORKERS)}
        outs: list[Path] = []

        def resweep() -> float:
            out = work.fresh("out")
            outs.append(out)
            argv = [PYTHON, str(exp), "run", f"--max-workers={WORKERS}", "--progress=False"]
            sample = run_process(argv, env={**env, "BENCH_OUT": str(out)})
            return check(sample, "resweep run").wall_s

        def joblib() -> float:
            return check(run_process([PYTHON, str(raw)], env=env), "joblib").wall_s

        figures = interleaved({"resweep": resweep, "joblib": joblib})
        overhead = ratio(figures["resweep"], figures["joblib"])
        entries = max(count_entries(out) for out in outs)
        per_config = [t / N_CONFIGS for t in figures["resweep"]]
        print(f"  resweep run              {describe(figures['resweep'])}")
        print(f"  raw joblib.Parallel      {describe(figures['joblib'])}")
        print(f"  per config: resweep {describe(per_config, 'us', 1e6)}")
        print(
            f"  ratio resweep / joblib: {overhead:.2f}x (goal <= {GOAL_RATIO}x: "
            f"{verdict(overhead <= GOAL_RATIO)}; 1.2x: {verdict(overhead <= 1.2)})"
        )
        print(
            f"  files and directories under output_dir: {entries} "
            f"(goal <= {FILES_GOAL}: {verdict(entries <= FILES_GOAL)})"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
