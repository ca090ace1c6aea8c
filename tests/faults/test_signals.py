"""Ctrl-C, a second Ctrl-C and SIGTERM: state saved, the right exit status, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

EXPERIMENT = textwrap.dedent(
    """
    import os, time
    from dataclasses import dataclass
    import resweep

    @dataclass(frozen=True)
    class Config:
        i: int

    def slow(config, ctx):
        with open(os.path.join(os.path.dirname(__file__), "started.txt"), "a") as f:
            f.write(ctx.name + "\\n")
        time.sleep(float(os.environ.get("CONFIG_SLEEP_S", "2")))
        return {"i": config.i}

    experiment = resweep.Experiment(
        function=slow, configs=[Config(i) for i in range(8)], output_dir="out", cache=False
    )

    if __name__ == "__main__":
        experiment.run_cli()
    """
)


def _start(tmp_path: Path, sleep_s: float, backend: str = "loky") -> subprocess.Popen[str]:
    (tmp_path / "exp.py").write_text(EXPERIMENT)
    return subprocess.Popen(
        [
            sys.executable,
            "exp.py",
            "run",
            "--max-workers",
            "2",
            "--backend",
            backend,
            "--noprogress",
        ],
        cwd=tmp_path,
        env={**os.environ, "CONFIG_SLEEP_S": str(sleep_s)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a job started from a terminal
    )


def _wait_started(tmp_path: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        started = tmp_path / "started.txt"
        if started.exists() and len(started.read_text().split()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("configs never started")


def _finish(tmp_path: Path) -> None:
    """A plain run after the stop finishes every config."""
    again = subprocess.run(
        [sys.executable, "exp.py", "run", "--max-workers", "2", "--noprogress"],
        cwd=tmp_path,
        env={**os.environ, "CONFIG_SLEEP_S": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr


def _statuses(tmp_path: Path) -> dict[str, str]:
    state = yaml.safe_load((tmp_path / "out/experiment.yaml").read_text())
    return {n: r["status"] for n, r in state["configs"].items()}


def test_ctrl_c_lets_running_configs_finish_then_exits_130(tmp_path: Path) -> None:
    """The first Ctrl-C (to the whole process group) stops dispatching; running configs finish."""
    proc = _start(tmp_path, sleep_s=1.5)
    _wait_started(tmp_path, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    statuses = _statuses(tmp_path)
    started = set((tmp_path / "started.txt").read_text().split())
    # Everything that had started finished (workers ignore Ctrl-C); nothing else ran.
    assert {n for n, s in statuses.items() if s == "done"} == started
    assert set(statuses.values()) <= {"done", "todo"}
    assert "Traceback" not in err
    _finish(tmp_path)
    assert set(_statuses(tmp_path).values()) == {"done"}


@pytest.mark.parametrize("backend", ["loky", "sequential"])
def test_a_second_ctrl_c_stops_at_once(tmp_path: Path, backend: str) -> None:
    """Two Ctrl-Cs stop the run without waiting for 30-second configs; they are todo again."""
    proc = _start(tmp_path, sleep_s=30, backend=backend)
    _wait_started(tmp_path, 1)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    stopped = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.monotonic() - stopped < 20  # far less than the configs' 30 s
    statuses = _statuses(tmp_path)
    assert set(statuses.values()) == {"todo"}, statuses
    status = subprocess.run(
        [sys.executable, "exp.py", "status", "--json"], cwd=tmp_path, capture_output=True, text=True
    )
    assert json.loads(status.stdout)["counts"]["todo"] == 8


def test_sigterm_saves_state_and_exits_143(tmp_path: Path) -> None:
    """SIGTERM (what a cluster scheduler sends before killing a job) saves and exits 143."""
    proc = _start(tmp_path, sleep_s=0.4)
    _wait_started(tmp_path, 4)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole job gets it, workers included
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    statuses = _statuses(tmp_path)
    assert set(statuses.values()) <= {"done", "todo"}
    _finish(tmp_path)


@pytest.mark.parametrize(("backend", "running"), [("loky", 2), ("threading", 2), ("sequential", 1)])
def test_the_first_ctrl_c_starts_nothing_new_not_even_a_queued_config(
    tmp_path: Path, backend: str, running: int
) -> None:
    """Configs already handed to a busy worker stay todo, unstarted, with no attempt used."""
    proc = _start(tmp_path, sleep_s=3, backend=backend)
    _wait_started(tmp_path, running)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"waiting for {running} running configs" in err
    started = (tmp_path / "started.txt").read_text().split()
    assert len(started) == running, started
    state = yaml.safe_load((tmp_path / "out/experiment.yaml").read_text())["configs"]
    assert {n for n, r in state.items() if r["status"] == "done"} == set(started)
    assert {r["attempts"] for n, r in state.items() if n not in started} == {0}
