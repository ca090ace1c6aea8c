"""Every kill point: resweep dies right after each of its persistence steps, and loses nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from resweep.durable import CRASH_EXIT_CODE

EXPERIMENT = textwrap.dedent(
    """
    from dataclasses import dataclass
    import resweep

    @dataclass(frozen=True)
    class Config:
        i: int

    def square(config):
        return {"square": config.i * config.i}

    experiment = resweep.Experiment(
        function=square,
        configs=[Config(i) for i in range({n_configs})],
        output_dir="out",
        name="kill-points",
        cache=False,
    )

    if __name__ == "__main__":
        experiment.run_cli()
    """
)


def _run(cwd: Path, *args: str, crash_after: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RESWEEP_CRASH_AFTER_STEP": str(crash_after)}
    return subprocess.run(
        [sys.executable, "exp.py", "run", "--noprogress", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _done(cwd: Path) -> dict[str, Any]:
    """Done configs and their results, read the way a person would: yaml.safe_load."""
    text = (cwd / "out" / "experiment.yaml").read_text()
    state = yaml.safe_load(text)
    return {n: r["result"] for n, r in state["configs"].items() if r["status"] == "done"}


def _sweep_kill_points(tmp_path: Path, n_configs: int, backend: str) -> int:
    """Crash after step N for N = 1, 2, ... until a run finishes first; return the steps covered."""
    (tmp_path / "exp.py").write_text(EXPERIMENT.replace("{n_configs}", str(n_configs)))
    expected = {f"i={i}": {"square": i * i} for i in range(n_configs)}
    step = 0
    while True:
        step += 1
        work = tmp_path / f"step{step}"
        work.mkdir()
        (work / "exp.py").write_text((tmp_path / "exp.py").read_text())
        crashed = _run(work, "--backend", backend, crash_after=step)
        if crashed.returncode == 0:
            assert _done(work) == expected
            return step - 1
        assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
        state_path = work / "out" / "experiment.yaml"
        if state_path.exists():
            # Old or new, never anything else: it parses, and what it calls done is right.
            for name, result in _done(work).items():
                assert result == expected[name], (step, name)
        finished = _run(work, "--backend", backend)
        assert finished.returncode == 0, (step, finished.stderr)
        assert _done(work) == expected, step
        assert not (work / "out" / "journal.jsonl").exists()


def test_every_kill_point_of_a_small_sequential_run(tmp_path: Path) -> None:
    """A crash right after any persistence step of a run leaves a state the next run completes."""
    covered = _sweep_kill_points(tmp_path, n_configs=2, backend="sequential")
    print(f"kill points covered: {covered}")
    assert covered >= 15


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two real runs per kill point
@pytest.mark.parametrize("backend", ["sequential", "loky"])
def test_every_kill_point_of_a_larger_run(tmp_path: Path, backend: str) -> None:
    """The same with more configs, and with worker processes writing the result files."""
    covered = _sweep_kill_points(tmp_path, n_configs=6, backend=backend)
    print(f"kill points covered ({backend}): {covered}")
    assert covered >= 30
