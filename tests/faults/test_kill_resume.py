"""A real `run` process killed with SIGKILL loses no finished config and resumes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import run_script
from resweep.errors import StateError
from resweep.store import Store

N_CONFIGS = 12

SCRIPT = f"""
def work(config: dict, ctx: resweep.Context) -> dict:
    with open(os.path.join(OUT, "..", "calls.txt"), "a") as handle:
        handle.write(f"{{ctx.name}} {{ctx.attempt}}\\n")
    time.sleep(config["sleep_s"])
    return {{"square": config["i"] ** 2, "attempt": ctx.attempt, "text": "naïve 🎉 1e-05"}}


experiment = resweep.Experiment(
    function=work,
    configs=[{{"i": i, "sleep_s": 0.15}} for i in range({N_CONFIGS})],
    output_dir=OUT,
    name="killed",
)
"""


@contextlib.contextmanager
def started(script: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real `python exp.py run` in its own process group, reaped whatever happens."""
    process = subprocess.Popen(
        [sys.executable, str(script), "run", "--noprogress", *args],
        cwd=script.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        # The workers the killed coordinator leaves behind belong to its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def done_records(out: Path) -> dict[str, dict[str, Any]]:
    """The done configs as a reader sees them now (state file plus journal)."""
    try:
        state = Store(out).read()
    except StateError:  # not written yet
        return {}
    return {n: r for n, r in state.configs.items() if r["status"] == "done"}


def wait_for_done(out: Path, at_least: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while len(done_records(out)) < at_least:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no config finished within 60 s"
        time.sleep(0.02)


def kill_and_check(out: Path, process: subprocess.Popen[bytes]) -> dict[str, dict[str, Any]]:
    """SIGKILL the coordinator; every config done before the kill is still done, unchanged."""
    before = done_records(out)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    data = yaml.safe_load((out / "experiment.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data["configs"], dict)
    after = done_records(out)
    for name, record in before.items():
        assert after[name]["status"] == "done"
        assert after[name]["result"] == record["result"]
    return after


def executions(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_sigkill_loses_no_finished_config_and_the_next_run_finishes(
    tmp_path: Path, write_script: Callable[[str], Path], backend: str
) -> None:
    """Killed after some configs finished, a run keeps them done and a rerun does the rest."""
    script = write_script(SCRIPT)
    out = tmp_path / "out"
    with started(script, "--backend", backend, "--max-workers", "2") as process:
        wait_for_done(out, 3, process)
        survived = kill_and_check(out, process)
    assert 3 <= len(survived) < N_CONFIGS

    # The rest runs in threads: what matters is what the killed run left on disk.
    again = run_script(
        script, "run", "--noprogress", "--backend", "threading", "--max-workers", "2"
    )
    assert again.returncode == 0, again.stderr
    state = Store(out).read()
    assert state.counts()["done"] == N_CONFIGS
    for name, record in survived.items():
        assert state.configs[name]["result"] == record["result"]
        assert state.configs[name]["attempts"] == record["attempts"]
    first_attempts = [line for line in executions(tmp_path) if line.endswith(" 1")]
    for name in survived:
        assert first_attempts.count(f"{name} 1") == 1
        assert f"{name} 2" not in executions(tmp_path)
    assert (out / "summary.csv").read_text(encoding="utf-8").count("\n") == N_CONFIGS + 1
    assert not (out / "journal.jsonl").exists()


@pytest.mark.slow
def test_repeated_sigkills_at_varying_moments_lose_nothing(
    tmp_path: Path, write_script: Callable[[str], Path]
) -> None:
    """Killed again and again at different moments, the sweep still ends with every config done."""
    script = write_script(SCRIPT)
    out = tmp_path / "out"
    survived: dict[str, dict[str, Any]] = {}
    for round_index in range(5):
        with started(script, "--backend", "loky", "--max-workers", "2") as process:
            wait_for_done(out, min(len(survived) + 1, N_CONFIGS - 1), process)
            time.sleep(0.05 * round_index)
            now = kill_and_check(out, process)
        for name, record in survived.items():
            assert now[name]["result"] == record["result"]
        survived = now
        if len(survived) >= N_CONFIGS - 1:
            break
    final = run_script(script, "run", "--noprogress", "--backend", "loky", "--max-workers", "2")
    assert final.returncode == 0, final.stderr
    state = Store(out).read()
    assert state.counts()["done"] == N_CONFIGS
    for name, record in survived.items():
        assert state.configs[name]["result"] == record["result"]
