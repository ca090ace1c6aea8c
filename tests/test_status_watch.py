"""status --watch and the status snapshot, against real runs on loky, threads and Dask."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import run_script
from resweep.lock import RunInfo
from resweep.status import StatusReport, duration_text, snapshot_lines
from terminal import Terminal

# Configs run until the test removes the file `hold`; every knob comes from the environment.
SCRIPT = """\
import os
import time

import resweep

HERE = os.path.dirname(os.path.abspath(__file__))
N = int(os.environ.get("EXP_N", "3"))
FAIL_FIRST = {int(i) for i in os.environ.get("EXP_FAIL_FIRST", "").split(",") if i}
FAIL_ALWAYS = {int(i) for i in os.environ.get("EXP_FAIL_ALWAYS", "").split(",") if i}
HOLD = os.environ.get("EXP_HOLD", "hold")


def note(name):
    fd = os.open(os.path.join(HERE, "starts.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{name}\\n".encode())
    finally:
        os.close(fd)


def work(config, ctx):
    note(ctx.name)
    print(f"working on {config['i']}")
    while os.path.exists(os.path.join(HERE, HOLD)):
        time.sleep(0.02)
    if config["i"] in FAIL_ALWAYS or (config["i"] in FAIL_FIRST and ctx.attempt == 1):
        raise ValueError(f"boom {config['i']}")
    return {"x": config["i"]}


experiment = resweep.Experiment(
    function=work,
    configs=[{"i": i} for i in range(N)],
    output_dir=os.path.join(HERE, "out"),
    name="watched",
    retries=int(os.environ.get("EXP_RETRIES", "0")),
)

if __name__ == "__main__":
    experiment.run_cli()
"""


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RESWEEP_", "EXP_"))}
    return {**base, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "exp.py"
    path.write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    return path


def start_run(script: Path, *args: str, **extra: str) -> subprocess.Popen[bytes]:
    """A run in the background, its output in run.out and run.err, stdin closed."""
    with open(script.parent / "run.out", "wb") as out, open(script.parent / "run.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, str(script), "run", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=script.parent,
            env=env(**extra),
            start_new_session=True,
        )


def wait_for(predicate: Callable[[], object], timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def started(script: Path) -> list[str]:
    path = script.parent / "starts.txt"
    return path.read_text().split() if path.exists() else []


@contextlib.contextmanager
def held_run(script: Path, *args: str, **extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """A run whose configs wait until the block ends; it must then end with exit 0."""
    hold = script.parent / "hold"
    hold.touch()
    run = start_run(script, *args, **extra)
    try:
        yield run
    finally:
        hold.unlink()
        try:
            code = run.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            raise
    assert code == 0, (script.parent / "run.err").read_text()


BACKENDS = {
    "loky": ("--max-workers", "2"),
    "threading": ("--backend", "threading", "--max-workers", "2"),
    "dask": ("--backend", "dask", "--max-workers", "2"),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_watch_shows_running_configs_until_the_run_ends(script: Path, backend: str) -> None:
    """status --watch on a terminal redraws in place every second: each running config with its
    elapsed time, attempt and last log line; it ends with the run, on a final snapshot."""
    watch = None
    try:
        with held_run(script, *BACKENDS[backend], EXP_N="3"):
            wait_for(lambda: len(started(script)) == 2, what="two configs to start")
            watch = Terminal(
                [sys.executable, str(script), "status", "--watch"], cwd=script.parent, env=env()
            )
            # A config is shown once its elapsed time has reached a second: the clock ticks.
            name = started(script)[0]
            i = name.removeprefix("i=")
            # Dask workers send a config's log back with its outcome: no last line while it runs.
            last = "" if backend == "dask" else rf"  \| working on {i}"
            watch.wait_for(rf"^ +[1-9]\d*s  attempt 1  {re.escape(name)}{last}\r?$")
            head = r"\x1b\[Jwatched: \[[#-]+\] 0/3  todo 0, running 3, done 0, failed 0"
            shown = watch.wait_for(head)
            assert "running now (2):" in watch.text
            assert "1 more handed to busy workers, not started yet" in watch.text
            # Redrawn in place: back up over the last snapshot and clear the screen below it.
            watch.wait_for(r"\x1b\[\d+A\r\x1b\[J", start=shown.end())
        assert watch.wait() == 0
        tail = watch.text[watch.text.rindex("\x1b[J") :]
        assert "watched: [" in tail and "3/3  todo 0, running 0, done 3, failed 0" in tail
        assert "no run is active" in tail and "running now" not in tail
        assert tail.rstrip().endswith("the run ended")
    finally:
        if watch is not None:
            watch.close()


def test_watch_into_a_pipe_prints_snapshots_one_after_another(script: Path) -> None:
    """Into a pipe, --watch prints whole snapshots one after the other, without cursor codes."""
    with held_run(script, "--backend", "threading", "--max-workers", "2", EXP_N="2"):
        wait_for(lambda: len(started(script)) == 2, what="two configs to start")
        watch = subprocess.Popen(
            [sys.executable, str(script), "status", "--watch"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=script.parent,
            env=env(),
        )
        assert watch.stdout is not None
        # The first snapshot is there while the configs run.
        first = [watch.stdout.readline() for _ in range(3)]
        assert first[0].startswith("watched: [") and first[2] == "running now (2):\n"
    out = "".join(first) + watch.stdout.read()
    assert watch.wait(timeout=60) == 0
    assert "\x1b" not in out
    # Snapshots one after another, each from its first line on, a blank line between them.
    assert out.count("\n\nwatched: [") == out.count("watched: [") - 1 >= 1
    assert out.rstrip().endswith("the run ended")


def test_watch_with_no_run_active_prints_one_snapshot(script: Path) -> None:
    """With no run active, --watch prints one snapshot and says there is nothing to watch."""
    done = subprocess.run(
        [sys.executable, str(script), "run", "--noprogress", "--backend", "sequential"],
        capture_output=True,
        text=True,
        cwd=script.parent,
        env=env(EXP_FAIL_ALWAYS="1"),
        check=False,
    )
    assert done.returncode == 1, done.stderr
    watch = subprocess.run(
        [sys.executable, str(script), "status", "--watch"],
        capture_output=True,
        text=True,
        cwd=script.parent,
        env=env(),
        timeout=60,
        check=False,
    )
    assert watch.returncode == 0, watch.stderr
    assert watch.stdout.splitlines() == [
        f"watched: [{'#' * 30}] 3/3  todo 0, running 0, done 2, failed 1",
        "no run is active",
        "recent failures (1 of 1):",
        "  i=1: ValueError: boom 1",
        "nothing to watch",
    ]
    selected = subprocess.run(
        [sys.executable, str(script), "status", "--watch", "--where", "i=2"],
        capture_output=True,
        text=True,
        cwd=script.parent,
        env=env(),
        timeout=60,
        check=False,
    )
    assert selected.returncode == 0, selected.stderr
    assert selected.stdout.splitlines()[0] == (
        f"watched: [{'#' * 30}] 1/1  todo 0, running 0, done 1, failed 0"
    )


def test_ctrl_c_stops_watching_quietly(script: Path) -> None:
    """Ctrl-C ends --watch with exit 0 and no traceback; the run goes on."""
    with held_run(script, "--backend", "threading", EXP_N="1"):
        wait_for(lambda: started(script), what="a config to start")
        watch = Terminal(
            [sys.executable, str(script), "status", "--watch"], cwd=script.parent, env=env()
        )
        try:
            watch.wait_for(r"running now \(1\):")
            watch.type("\x03")  # Ctrl-C, from the terminal to its foreground process
            assert watch.wait() == 0
            assert "Traceback" not in watch.text and "interrupted" not in watch.text
        finally:
            watch.close()


def test_watch_and_json_together_are_refused(script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), "status", "--watch", "--json"],
        capture_output=True,
        text=True,
        cwd=script.parent,
        env=env(),
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: status --watch is for a person")


def test_status_shows_dask_configs_heard_to_start_without_worker_markers(script: Path) -> None:
    """A Dask worker that does not share output_dir leaves no marker; status still shows what
    it runs, from the starts the coordinator heard, with their attempt."""
    pytest.importorskip("distributed")
    with held_run(script, *BACKENDS["dask"], EXP_N="3"):
        wait_for(lambda: len(started(script)) == 2, what="two configs to start")
        workers = script.parent / "out" / ".workers"
        wait_for(lambda: (workers / "started").exists(), what="the starts to be heard")
        for marker in workers.glob("dask-*"):
            marker.unlink()  # as if the workers could not see output_dir
        status = subprocess.run(
            [sys.executable, str(script), "status", "--json"],
            capture_output=True,
            text=True,
            cwd=script.parent,
            env=env(),
            check=False,
        )
        assert status.returncode == 0, status.stderr
        payload = json.loads(status.stdout)
        assert set(payload["running"]) == set(started(script))
        assert all(payload["running"].values())
        assert payload["queued"] == sorted({"i=0", "i=1", "i=2"} - set(started(script)))
        for details in payload["running_details"].values():
            assert details["attempt"] == 1


def test_snapshot_fits_the_terminal() -> None:
    """Every line fits the width; a short terminal gets the head and as much as fits."""
    now = time.time()
    running = {f"config-{i}-" + "x" * 80: f"2026-01-01T00:00:0{i}+00:00" for i in range(9)}
    report = StatusReport(
        name="wide",
        counts={"todo": 1, "running": 9, "done": 0, "failed": 2},
        total=12,
        running=running,
        queued=[],
        active_run=RunInfo("host", 1, "2026-01-01T00:00:00+00:00"),
        left_running={},
        failures={"a": "ValueError: " + "y" * 200, "b": None},
        cache_hits=0,
        cache_misses=0,
        attempts=dict.fromkeys(running, 2),
        last_log_lines=dict.fromkeys(running, "step 3\tof 10"),
        recent_failures=["b", "a"],
    )
    lines = snapshot_lines(report, width=60, height=8, now=now)
    assert len(lines) == 8 and all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("wide: [#####") and lines[0].endswith("...")
    assert lines[2] == "running now (9):"
    assert lines[-1] == "... 8 more lines (a taller terminal shows them)"
    assert all("\t" not in line for line in lines)
    full = snapshot_lines(report, width=500, now=now)
    assert full[3].split()[1:4] == ["attempt", "2", next(iter(running))]
    assert full[-2:] == ["  b: failed", f"  a: ValueError: {'y' * 200}"]


def test_a_snapshot_line_of_wide_characters_fits_the_width_in_columns() -> None:
    """CJK characters and emoji take two columns: a line of them is cut by columns, so a
    redraw in place never wraps; a terminal narrower than the ellipsis gets part of it."""
    import unicodedata

    def columns(line: str) -> int:
        return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in line)

    now = time.time()
    report = StatusReport(
        name="宽",
        counts={"todo": 0, "running": 1, "done": 0, "failed": 0},
        total=1,
        running={"x=1": "2026-01-01T00:00:00+00:00"},
        queued=[],
        active_run=RunInfo("host", 1, "2026-01-01T00:00:00+00:00"),
        left_running={},
        failures={},
        cache_hits=0,
        cache_misses=0,
        attempts={"x=1": 1},
        last_log_lines={"x=1": "宽字符日志行🎉" * 30},
        recent_failures=[],
    )
    for width in (1, 2, 3, 40, 79):
        lines = snapshot_lines(report, width=width, now=now)
        assert all(columns(line) <= width for line in lines), (width, lines)
    assert "宽字符" in snapshot_lines(report, width=79, now=now)[3]


def test_status_failed_escapes_control_characters(write_script: Any) -> None:
    """An error line holding escape sequences cannot clear or recolour the reader's terminal:
    status --failed prints it escaped."""
    script = write_script(
        """
        def work(config):
            raise RuntimeError("\\x1b[2J\\x1b[31mred error")


        experiment = resweep.Experiment(function=work, configs=[{"i": 1}], output_dir=OUT)
        """
    )
    assert run_script(script, "run", "--backend", "sequential", "--noprogress").returncode == 1
    status = run_script(script, "status", "--failed")
    assert status.returncode == 0, status.stderr
    assert "\x1b" not in status.stdout
    assert "i=1: RuntimeError: \\x1b[2J\\x1b[31mred error" in status.stdout


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (59.9, "59s"), (61, "1m01s"), (7322, "2h02m")]
)
def test_duration_text(seconds: float, shown: str) -> None:
    assert duration_text(seconds) == shown
