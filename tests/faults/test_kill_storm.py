"""A kill storm: SIGKILL at random moments through a sweep; the done set only grows."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import resweep

EXPERIMENT = textwrap.dedent(
    """
    import os, time
    from dataclasses import dataclass
    import resweep

    @dataclass(frozen=True)
    class Config:
        i: int

    HERE = os.path.dirname(os.path.abspath(__file__))

    def work(config, ctx):
        fd = os.open(os.path.join(HERE, "executions.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, (ctx.name + "\\n").encode())
        os.close(fd)
        time.sleep((config.i * 7919 % 13) / 200)  # 0 to 60 ms, mixed
        return {"double": 2 * config.i}

    experiment = resweep.Experiment(
        function=work, configs=[Config(i) for i in range({n})], output_dir="out", cache=False
    )

    if __name__ == "__main__":
        experiment.run_cli()
    """
)


def _storm(tmp_path: Path, n_configs: int, kills: int, seed: int) -> tuple[int, int]:
    """Kill the run tree `kills` times, checking the state after each; return (kills, re-runs)."""
    (tmp_path / "exp.py").write_text(EXPERIMENT.replace("{n}", str(n_configs)))
    rng = random.Random(seed)
    command = [sys.executable, "exp.py", "run", "--max-workers", "2", "--noprogress"]
    done: dict[str, object] = {}
    progress: list[int] = []
    survived = 0
    while survived < kills:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # Kill while configs are running: once this run has started some, at a random moment.
        log = tmp_path / "executions.log"
        before = log.stat().st_size if log.exists() else 0
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if log.exists() and log.stat().st_size > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break  # finished before this kill
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its workers, like a power cut
        proc.wait()
        survived += 1
        state_file = tmp_path / "out/experiment.yaml"
        if not state_file.exists():
            continue
        yaml.safe_load(state_file.read_text())  # parses after every kill
        state = resweep.open(tmp_path / "out").state
        now_done = {n: r["result"] for n, r in state.configs.items() if r["status"] == "done"}
        assert set(done) <= set(now_done), "a done config was lost"
        for name, result in done.items():
            assert now_done[name] == result, f"the result of {name} changed"
        for name, result in now_done.items():
            assert result == {"double": 2 * int(name.split("=")[1])}, name
        progress.append(len(now_done))
        done = now_done
    final = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    state = resweep.open(tmp_path / "out").state
    assert state.counts()["done"] == n_configs
    runs = collections.Counter((tmp_path / "executions.log").read_text().split())
    assert set(runs) == set(state.configs)
    rerun = sum(1 for count in runs.values() if count > 1)
    print(f"done after each kill: {progress}")
    assert len(set(progress)) > 1, "the kills never landed while configs were finishing"
    return survived, rerun


def test_a_short_kill_storm_loses_nothing(tmp_path: Path) -> None:
    """Five SIGKILLs through 80 configs: nothing done is lost or changed; all finish."""
    survived, rerun = _storm(tmp_path, n_configs=80, kills=5, seed=1)
    print(f"kills survived: {survived}, configs executed more than once: {rerun}")
    assert survived >= 1


@pytest.mark.slow
def test_a_kill_storm_of_twenty_kills_loses_nothing(tmp_path: Path) -> None:
    """Twenty-five SIGKILLs at random moments through 300 configs of mixed durations."""
    survived, rerun = _storm(tmp_path, n_configs=300, kills=25, seed=7)
    print(f"kills survived: {survived}, configs executed more than once: {rerun}")
    assert survived >= 20
