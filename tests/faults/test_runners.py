"""Concurrent runners: one run at a time, never a config twice, dead runners' locks recovered."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from .conftest import (
    assert_one_line_error,
    child_env,
    executions,
    kill_group,
    run_cli,
    start_cli,
    wait_for,
)

BODY = """
N_CONFIGS = int(os.environ.get("N_CONFIGS", "6"))
# While this file exists, every config waits: the test decides when they may finish.
HOLD = os.path.join(HERE, "hold")


def work(config, ctx):
    record_execution(ctx.name)
    while os.path.exists(HOLD):
        time.sleep(0.02)
    time.sleep(config["sleep_s"])
    return {"i": config["i"]}


if os.environ.get("KILL_IN_ABSORB"):
    # SIGKILL this runner right after a worker stored a result, before the state records it.
    import signal

    from resweep import runner

    def absorb(self, returned):
        os.kill(os.getpid(), signal.SIGKILL)

    runner.Scheduler.absorb = absorb

if os.environ.get("GATE"):
    # Two runners start together: each says it is ready, then waits for the gate to open.
    open(os.path.join(HERE, f"ready.{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(HERE, "gate")):
        time.sleep(0.002)

experiment = resweep.Experiment(
    function=work,
    configs=[{"i": i, "sleep_s": 0.02 * (i % 3)} for i in range(N_CONFIGS)],
    output_dir=OUT,
    name="runners",
    config_naming=lambda c: f"i={c['i']}",
)
"""
THREADS = ("--backend", "threading", "--max-workers", "2", "--noprogress")


@pytest.fixture
def script(fault_script: Callable[[str], Path]) -> Path:
    return fault_script(BODY)


def read_state(script: Path) -> dict[str, dict[str, object]]:
    text = (script.parent / "out" / "experiment.yaml").read_text(encoding="utf-8")
    configs: dict[str, dict[str, object]] = yaml.safe_load(text)["configs"]
    return configs


def active_run(script: Path) -> dict[str, object]:
    """The active run's run.json, once the runner has written it."""
    path = script.parent / "out" / "run.json"
    wait_for(path.exists, what="run.json")
    info: dict[str, object] = json.loads(path.read_text())
    return info


def started(script: Path, count: int) -> Callable[[], bool]:
    return lambda: len(executions(script)) >= count


def test_second_run_is_refused_while_one_is_active(script: Path) -> None:
    """A second run stops at once, naming the active run's host, pid and start time, and runs nothing."""
    (script.parent / "hold").touch()
    first = start_cli(script, "run", *THREADS)
    try:
        info = active_run(script)
        wait_for(started(script, 2), what="two configs to start")
        begun = time.monotonic()
        second = run_cli(script, "run", *THREADS)
        assert time.monotonic() - begun < 15
        line = assert_one_line_error(
            second, str(info["host"]), f"pid {info['pid']}", str(info["start_time"])
        )
        assert "--break-lock" in line
        assert len(executions(script)) == 2
        pids = {
            row.split()[1]
            for row in (script.parent / "executions.txt").read_text().split("\n")
            if row
        }
        assert pids == {str(first.pid)}
    finally:
        (script.parent / "hold").unlink()
    assert first.wait(timeout=60) == 0
    assert Counter(executions(script)) == Counter({f"i={i}": 1 for i in range(6)})


def test_status_shows_the_active_run_and_its_running_configs(script: Path) -> None:
    """status during a run lists the configs running now with their elapsed time, and who runs them."""
    (script.parent / "hold").touch()
    first = start_cli(script, "run", *THREADS)
    try:
        info = active_run(script)
        wait_for(started(script, 2), what="two configs to start")
        time.sleep(1.0)
        status = run_cli(script, "status")
        assert status.returncode == 0, status.stderr
        assert f"running now (pid {info['pid']} on host {info['host']}" in status.stdout
        running = dict(re.findall(r"^  (i=\d)  (\d+)s$", status.stdout, re.MULTILINE))
        # Every config executing now is listed, with the time since it started.
        assert set(executions(script)) <= set(running)
        assert all(int(running[name]) >= 1 for name in executions(script))
        as_json = json.loads(run_cli(script, "status", "--json").stdout)
        assert as_json["active_run"]["pid"] == info["pid"]
        assert set(executions(script)) <= set(as_json["running"])
    finally:
        (script.parent / "hold").unlink()
    assert first.wait(timeout=60) == 0
    after = run_cli(script, "status")
    assert "running now" not in after.stdout and "done 6" in after.stdout


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_lock_of_a_sigkilled_runner_is_recovered(script: Path, backend: str) -> None:
    """After a SIGKILL, status shows what the dead run left running; the next run takes over alone."""
    (script.parent / "hold").touch()
    first = start_cli(script, "run", "--backend", backend, "--max-workers", "2", "--noprogress")
    wait_for(started(script, 2), what="two configs to start")
    kill_group(first)
    executed = set(executions(script))
    assert (script.parent / "out" / "run.json").exists()  # left behind by the dead run
    status = run_cli(script, "status")
    assert status.returncode == 0, status.stderr
    assert "running now" not in status.stdout
    as_json = json.loads(run_cli(script, "status", "--json").stdout)
    assert as_json["active_run"] is None
    interrupted = set(as_json["left_running"])
    assert executed <= interrupted
    assert set(as_json["left_running"].values()) == {"todo"}
    n = len(interrupted)
    assert f"{n} left running by a run that stopped, now {n} todo" in status.stdout
    (script.parent / "hold").unlink()
    second = run_cli(script, "run", "--backend", backend, "--noprogress")
    assert second.returncode == 0, second.stderr
    state = read_state(script)
    assert {r["status"] for r in state.values()} == {"done"}
    # Worker processes and threads say which configs they were executing: a config only handed
    # to a busy worker never started, so it was not an interrupted attempt.
    for name, record in state.items():
        expected = 1 if name in executed else 0
        assert record.get("interruptions", 0) == expected, (name, record)
        assert record["attempts"] == 1 + expected
    assert Counter(executions(script)) == Counter(
        {f"i={i}": 1 + (f"i={i}" in executed) for i in range(6)}
    )


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_result_written_before_a_sigkill_makes_the_config_done(script: Path, backend: str) -> None:
    """A runner SIGKILLed right after a worker returned a result, before the state recorded
    it: the config is done with that result, and never runs again."""
    env = child_env(KILL_IN_ABSORB="1", N_CONFIGS="1")
    options = ("--backend", backend, "--max-workers", "2", "--noprogress")
    first = subprocess.run(
        [sys.executable, str(script), "run", *options],
        capture_output=True,
        env=env,
        cwd=script.parent,
        timeout=60,
        check=False,
    )
    assert first.returncode == -9, first.stderr
    assert (script.parent / "out" / "journal.jsonl").exists()  # the run did not end cleanly
    assert '"status": "done"' not in (script.parent / "out" / "journal.jsonl").read_text()
    # No file of the config's own: the result is in its worker's results file.
    assert not (script.parent / "out" / "configs" / "i=0").exists()
    (results,) = (script.parent / "out" / ".results").iterdir()
    assert '"name": "i=0"' in results.read_text()
    status = run_cli(script, "status", env=child_env(N_CONFIGS="1"))
    assert "1 left running by a run that stopped, now 1 done" in status.stdout
    second = run_cli(script, "run", *options, env=child_env(N_CONFIGS="1"))
    assert second.returncode == 0, second.stderr
    assert read_state(script)["i=0"]["status"] == "done"
    recovered = read_state(script)["i=0"]
    assert recovered["result"] == {"i": 0}
    # Which session and which code produced it came back with it.
    assert recovered["session"] and recovered["fingerprint"]
    assert executions(script) == ["i=0"]


HOLDER = """
import fcntl, json, sys, time
fd = open(sys.argv[1] + "/.lock", "a")
fcntl.flock(fd, fcntl.LOCK_EX)
info = {"host": "gpu-node-7", "pid": 4242, "start_time": "2026-01-02T03:04:05.000+00:00"}
open(sys.argv[1] + "/run.json", "w").write(json.dumps(info))
print("held", flush=True)
time.sleep(600)
"""


def _can_unshare() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def test_break_lock_never_takes_a_lock_held_on_this_host(script: Path) -> None:
    """A held lock is refused with a hint. --break-lock does not take it from a process alive
    on this host, whatever run.json claims, even from a process the kernel hides from this run
    (another PID namespace): on a local filesystem only this host can hold the lock."""
    out = script.parent / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        refused = run_cli(script, "run", *THREADS)
        assert_one_line_error(
            refused, "gpu-node-7", "pid 4242", "2026-01-02T03:04:05", "--break-lock"
        )
        # run.json says another host, but the kernel shows a living holder here.
        alive = run_cli(script, "run", *THREADS, "--break-lock")
        assert_one_line_error(alive, "alive on this host")
        if _can_unshare():
            hidden = subprocess.run(
                ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script),
                 "run", *THREADS, "--break-lock"],
                capture_output=True, text=True, timeout=120, cwd=script.parent, env=child_env(),
            )  # fmt: skip
            assert_one_line_error(hidden, "alive on this host")
        assert executions(script) == []
    finally:
        holder.kill()
        holder.wait()
    # With the holder gone, a plain run takes the lock and runs every config once.
    assert run_cli(script, "run", *THREADS).returncode == 0
    assert Counter(executions(script)) == Counter({f"i={i}": 1 for i in range(6)})


def test_only_a_network_filesystem_lets_break_lock_take_over() -> None:
    """The filesystem under the lock decides: a holder on NFS may be a dead machine."""
    from resweep import lock

    table = (
        "20 1 0:1 / / rw - ext4 /dev/vda rw\n"
        "30 20 0:50 / /shared rw,relatime - nfs4 server:/export rw\n"
        "31 20 0:51 / /shared/local rw - xfs /dev/vdb rw\n"
    )
    assert lock.filesystem_type(Path("/shared/exp/.lock"), table) == "nfs4"
    assert lock.filesystem_type(Path("/shared/local/exp/.lock"), table) == "xfs"
    assert lock.filesystem_type(Path("/home/exp/.lock"), table) == "ext4"
    assert lock.lock_is_local(Path(sys.prefix))  # this machine's own disk


def test_break_lock_refuses_a_living_runner_on_this_host(script: Path) -> None:
    """--break-lock does not take over from a run that is provably alive on this host."""
    (script.parent / "hold").touch()
    first = start_cli(script, "run", *THREADS)
    try:
        info = active_run(script)
        refused = run_cli(script, "run", *THREADS, "--break-lock")
        assert_one_line_error(refused, f"pid {info['pid']}", "alive")
    finally:
        (script.parent / "hold").unlink()
    assert first.wait(timeout=60) == 0
    assert Counter(executions(script)) == Counter({f"i={i}": 1 for i in range(6)})


def race(directory: Path, fault_script: Callable[[str], Path], backend: str) -> Counter[str]:
    """Start two runners at the same instant on a fresh experiment; return executions per config."""
    directory.mkdir()
    script = fault_script(BODY, filename=f"{directory.name}/exp.py")
    args = ["run", "--backend", backend, "--max-workers", "2", "--noprogress"]
    env = child_env(GATE="1", N_CONFIGS="8")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=directory,
            env=env,
        )
        for _ in range(2)
    ]
    wait_for(lambda: len(list(directory.glob("ready.*"))) == 2, what="both runners ready")
    (directory / "gate").touch()
    results = [(p.pid, *p.communicate(timeout=120), p.returncode) for p in procs]
    codes = sorted(code for _, _, _, code in results)
    assert codes in ([0, 0], [0, 2]), results
    for _, _, err, code in results:
        if code == 2:
            winner = next(pid for pid, _, _, c in results if c == 0)
            assert "another run is active" in err and f"pid {winner}" in err, err
            assert len(err.splitlines()) == 1, err
    assert {r["status"] for r in read_state(script).values()} == {"done"}
    assert len(read_state(script)) == 8
    return Counter(executions(script))


def check_races(tmp_path: Path, fault_script: Callable[[str], Path], rounds: int) -> None:
    backends = ["threading", "loky"]
    twice: Counter[str] = Counter()
    for index in range(rounds):
        counts = race(tmp_path / f"round{index}", fault_script, backends[index % 2])
        assert sum(counts.values()) == 8
        twice.update(name for name, n in counts.items() if n > 1)
    assert not twice, f"configs executed twice: {dict(twice)}"


def test_two_runners_started_together(tmp_path: Path, fault_script: Callable[[str], Path]) -> None:
    """Two runners started at the same instant, 3 rounds: one runs, never a config twice."""
    check_races(tmp_path, fault_script, rounds=3)


@pytest.mark.slow
def test_two_runners_started_together_many_times(
    tmp_path: Path, fault_script: Callable[[str], Path]
) -> None:
    """Two runners started at the same instant, 20 rounds: never a config executed twice."""
    check_races(tmp_path, fault_script, rounds=20)
