"""Peers: resweep against exca's MapInfra (10,000 configs) and Optuna (2,000 trials)."""

from __future__ import annotations

import importlib.util
import os

from harness import (
    PYTHON,
    RESWEEP_SCRIPT,
    Workdir,
    check,
    compile_resweep,
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

EXCA_CONFIGS = int(os.environ.get("RESWEEP_BENCH_EXCA_N", "10000"))
OPTUNA_TRIALS = int(os.environ.get("RESWEEP_BENCH_OPTUNA_N", "2000"))
WORKERS = 2
OPTUNA_GOAL = 3.0

# exca's map cache with its process pool: the same no-op on the same number of items. The
# model lives in a module of its own, because the pool pickles its method by reference.
EXCA_MODULE = """\
from collections.abc import Iterator

import exca
import pydantic


class Noop(pydantic.BaseModel):
    infra: exca.MapInfra = exca.MapInfra(version="1")

    @infra.apply(item_uid=str)
    def process(self, items: list[int]) -> Iterator[None]:
        for _ in items:
            yield None
"""
EXCA_SCRIPT = """\
import os

from exca_noop import Noop

N = int(os.environ["BENCH_N"])
model = Noop(
    infra={
        "folder": os.environ["BENCH_OUT"],
        "cluster": "processpool",
        "max_jobs": int(os.environ["BENCH_WORKERS"]),
    }
)
outputs = list(model.process(range(N)))
assert len(outputs) == N
"""

# Optuna with its file journal: every trial enqueued, then run by one worker.
OPTUNA_SCRIPT = """\
import os

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

optuna.logging.set_verbosity(optuna.logging.WARNING)
N = int(os.environ["BENCH_N"])
storage = JournalStorage(JournalFileBackend(os.environ["BENCH_OUT"]))
study = optuna.create_study(storage=storage, study_name="bench")
for i in range(N):
    study.enqueue_trial({"i": i})


def noop(trial):
    trial.suggest_int("i", 0, N)
    return 0.0


study.optimize(noop, n_trials=N, n_jobs=1)
assert len(study.trials) == N
"""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main() -> None:
    heading("peers: exca MapInfra and Optuna, whole processes")
    compile_resweep()
    print(machine())
    for label, base in places():
        print(place_line(label, base))
        with Workdir(base) as work:
            versus_exca(work)
            if label == "disk":
                versus_optuna(work)


def _resweep(work: Workdir, n: int, workers: int) -> float:
    exp = work.path / "exp.py"
    if not exp.exists():
        work.script("exp.py", RESWEEP_SCRIPT)
    out = work.fresh("out")
    argv = [PYTHON, str(exp), "run", f"--max-workers={workers}", "--progress=False"]
    sample = run_process(argv, env={"BENCH_N": str(n), "BENCH_OUT": str(out)})
    return check(sample, "resweep run").wall_s


def _peer(work: Workdir, script: str, n: int, workers: int, out_name: str) -> float:
    out = work.fresh(out_name)
    env = {"BENCH_N": str(n), "BENCH_OUT": str(out), "BENCH_WORKERS": str(workers)}
    return check(run_process([PYTHON, script], env=env), script).wall_s


def versus_exca(work: Workdir) -> None:
    if not _installed("exca"):
        print("  exca is not installed here: `pip install -e '.[bench]'`; comparison skipped")
        return
    work.script("exca_noop.py", EXCA_MODULE)
    exca_script = str(work.script("exca_map.py", EXCA_SCRIPT))
    figures = interleaved(
        {
            "resweep": lambda: _resweep(work, EXCA_CONFIGS, WORKERS),
            "exca": lambda: _peer(work, exca_script, EXCA_CONFIGS, WORKERS, "exca"),
        }
    )
    versus = ratio(figures["resweep"], figures["exca"])
    print(f"  {EXCA_CONFIGS} no-op configs, {WORKERS} workers:")
    print(f"    resweep run                      {describe(figures['resweep'])}")
    print(f"    exca MapInfra, processpool       {describe(figures['exca'])}")
    print(f"    ratio resweep / exca: {versus:.2f}x (goal <= 1.0x: {verdict(versus <= 1.0)})")


def versus_optuna(work: Workdir) -> None:
    if not _installed("optuna"):
        print("  optuna is not installed here: `pip install -e '.[bench]'`; comparison skipped")
        return
    optuna_script = str(work.script("optuna_journal.py", OPTUNA_SCRIPT))
    figures = interleaved(
        {
            "resweep": lambda: _resweep(work, OPTUNA_TRIALS, 1),
            "optuna": lambda: _peer(work, optuna_script, OPTUNA_TRIALS, 1, "optuna.log"),
        }
    )
    speedup = ratio(figures["optuna"], figures["resweep"])
    print(f"  {OPTUNA_TRIALS} enqueued no-op trials, 1 worker:")
    print(f"    resweep run                      {describe(figures['resweep'])}")
    print(f"    Optuna, JournalFileBackend       {describe(figures['optuna'])}")
    per_trial = [t / OPTUNA_TRIALS for t in figures["optuna"]]
    print(f"    Optuna per trial                 {describe(per_trial, 'ms', 1e3)}")
    print(
        f"    resweep is {speedup:.1f}x faster than Optuna "
        f"(goal >= {OPTUNA_GOAL}x: {verdict(speedup >= OPTUNA_GOAL)})"
    )


if __name__ == "__main__":
    main()
