"""Scale: cost per config from 1,000 to 100,000 configs, and interactive commands at 100,000."""

from __future__ import annotations

import os
import statistics

from harness import (
    PYTHON,
    RESWEEP_SCRIPT,
    Workdir,
    check,
    compile_resweep,
    describe,
    heading,
    machine,
    run_process,
    verdict,
)

SIZES = [int(n) for n in os.environ.get("RESWEEP_BENCH_SIZES", "1000,10000,100000").split(",")]
WORKERS = 2
PER_CONFIG_GOAL = 1.5
STATUS_GOAL = 10.0
INTERACTIVE_GOAL_S = 1.0

# What `status` is compared to: PyYAML's C loader reading the same experiment.yaml.
YAML_LOAD_SCRIPT = """\
import sys

import yaml

with open(sys.argv[1], encoding="utf-8") as handle:
    state = yaml.load(handle, Loader=yaml.CSafeLoader)
assert len(state["configs"]) > 0
"""


def main() -> None:
    heading(f"scale: {', '.join(map(str, SIZES))} no-op configs, {WORKERS} workers")
    compile_resweep()
    print(machine())
    per_config: dict[int, list[float]] = {}
    peak_mb: dict[int, list[float]] = {}
    with Workdir() as work:
        exp = work.script("exp.py", RESWEEP_SCRIPT)
        loader = work.script("yaml_load.py", YAML_LOAD_SCRIPT)

        def cli(n: int, out: os.PathLike[str], *args: str, codes: tuple[int, ...] = (0,)) -> float:
            sample = run_process(
                [PYTHON, str(exp), *args], env={"BENCH_N": str(n), "BENCH_OUT": os.fspath(out)}
            )
            check(sample, f"resweep {args[0]} at {n}", codes)
            if args[0] == "run" and sample.own_peak_rss_mb is not None:
                peak_mb.setdefault(n, []).append(sample.own_peak_rss_mb)
            return sample.wall_s

        # Sizes interleaved round by round, so a busy minute hits them all alike.
        from harness import REPEAT

        outs = {}
        for _ in range(REPEAT):
            for n in SIZES:
                outs[n] = work.fresh(f"out{n}")
                wall = cli(n, outs[n], "run", f"--max-workers={WORKERS}", "--progress=False")
                per_config.setdefault(n, []).append(wall / n)
        for n in SIZES:
            print(
                f"{n:>7} configs: per config {describe(per_config[n], 'us', 1e6)}; "
                f"coordinator peak RSS {describe(peak_mb[n], 'MB')}"
            )
        small, large = SIZES[0], SIZES[-1]
        growth = statistics.median(per_config[large]) / statistics.median(per_config[small])
        print(
            f"per config at {large} / at {small}: {growth:.2f}x "
            f"(goal <= {PER_CONFIG_GOAL}x: {verdict(growth <= PER_CONFIG_GOAL)})"
        )

        out = outs[large]
        state_file = out / "experiment.yaml"
        print(f"experiment.yaml at {large}: {state_file.stat().st_size / 2**20:.1f} MB")
        status_s: list[float] = []
        yaml_s: list[float] = []
        show_s: list[float] = []
        resume_s: list[float] = []
        for _ in range(REPEAT):
            status_s.append(cli(large, out, "status"))
            yaml_s.append(check(run_process([PYTHON, str(loader), str(state_file)]), "yaml").wall_s)
            show_s.append(cli(large, out, "show", f"i={large // 2}"))
            resume_s.append(cli(large, out, "run", f"--max-workers={WORKERS}", "--progress=False"))
    speedup = statistics.median(yaml_s) / statistics.median(status_s)
    print(f"status at {large}               {describe(status_s)}")
    print(f"yaml.load(CSafeLoader) at {large} {describe(yaml_s)}")
    print(
        f"status is {speedup:.1f}x faster than the C YAML loader "
        f"(goal >= {STATUS_GOAL}x: {verdict(speedup >= STATUS_GOAL)})"
    )
    for label, figures in (("show", show_s), ("resume, nothing to do", resume_s)):
        ok = statistics.median(figures) < INTERACTIVE_GOAL_S
        print(
            f"{label} at {large}: {describe(figures)} "
            f"(goal < {INTERACTIVE_GOAL_S} s: {verdict(ok)})"
        )


if __name__ == "__main__":
    main()
