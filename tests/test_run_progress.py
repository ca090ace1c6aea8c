"""What a run shows while it runs: one bar a user can trust, snapshots on Enter, notices."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from terminal import Terminal, frames
from test_status_watch import SCRIPT, env, start_run, started, wait_for

# tqdm's frame: "n/total [elapsed<eta, rate, done=D failed=F retries=R]".
FRAME = re.compile(
    r"(\d+)/(\d+) \[(\d\d):(\d\d)<[^,\]]*, [^,\]]*(?:, done=(\d+) failed=(\d+)(?: retries=(\d+))?)?\]"
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "exp.py"
    path.write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    return path


def bar_frames(stderr: str) -> list[tuple[int, int, int, int | None, int | None, int]]:
    """(n, total, elapsed_s, done, failed, retries) of every frame the bar drew."""
    found = []
    for frame in frames(stderr):
        match = FRAME.search(frame)
        if match:
            n, total, minutes, seconds, done, failed, retries = match.groups()
            found.append((
                int(n), int(total), 60 * int(minutes) + int(seconds),
                None if done is None else int(done), None if failed is None else int(failed),
                int(retries or 0),
            ))  # fmt: skip
    return found


def test_retries_do_not_grow_the_bar_and_its_counts_agree(script: Path) -> None:
    """The bar's total is the configs the run will finish; a retry shows as retries=N beside
    it; done= and failed= add up to the bar's count in every frame; one bar per run."""
    proc = subprocess.run(
        [sys.executable, str(script), "run", "--max-workers", "2"],
        capture_output=True,
        cwd=script.parent,
        env=env(EXP_N="6", EXP_RETRIES="1", EXP_FAIL_FIRST="1,3", EXP_FAIL_ALWAYS="4"),
        timeout=120,
        check=False,
    )
    # Bytes, decoded as they are: text mode would turn the bar's carriage returns into newlines.
    stderr, stdout = proc.stderr.decode(), proc.stdout.decode()
    assert proc.returncode == 1, stderr
    drawn = bar_frames(stderr)
    assert drawn, stderr
    assert {total for _, total, *_ in drawn} == {6}
    assert [n for n, *_ in drawn] == sorted(n for n, *_ in drawn)
    for n, _, _, done, failed, _ in drawn:
        assert done is None or done + failed == n
    assert drawn[-1][:2] == (6, 6) and drawn[-1][3:] == (5, 1, 3)
    # One bar: it starts once, and ends once with the line the run's counts follow.
    assert sum(frame.lstrip().startswith("0%") for frame in frames(stderr)) == 1
    assert stderr.count("\n") == 1 and stderr.endswith("\n")
    assert stdout.splitlines()[0] == "done 5, failed 1, todo 0"
    assert "summary written" not in stdout

    again = subprocess.run(
        [sys.executable, str(script), "run", "--retry-failed"],
        capture_output=True,
        text=True,
        cwd=script.parent,
        env=env(EXP_N="6"),
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    # The bar counts only what this run finishes; the last line says where the summary is.
    assert bar_frames(again.stderr)[-1][:2] == (1, 1)
    summary = script.parent / "out" / "summary.csv"
    assert summary.exists()
    assert again.stdout.splitlines()[-1] == f"summary written to {summary}"


@pytest.mark.parametrize("backend", ["loky", "sequential"])
def test_the_bar_clock_ticks_while_a_long_config_runs(script: Path, backend: str) -> None:
    """While no config finishes, the bar is drawn again every second: its elapsed time moves."""
    (script.parent / "hold").touch()
    run = start_run(script, "--backend", backend, EXP_N="2")
    try:

        def ticked() -> bool:
            drawn = bar_frames((script.parent / "run.err").read_text())
            return any(n == 0 and elapsed >= 2 for n, _, elapsed, *_ in drawn)

        wait_for(ticked, what="the bar to show 2 s elapsed with no config finished")
    finally:
        (script.parent / "hold").unlink()
    assert run.wait(timeout=60) == 0, (script.parent / "run.err").read_text()


def test_enter_prints_a_snapshot_above_the_bar(script: Path) -> None:
    """Enter in the terminal of a run prints the status snapshot once; the bar goes on below."""
    (script.parent / "hold").touch()
    terminal = Terminal(
        [sys.executable, str(script), "run", "--max-workers", "2"],
        cwd=script.parent,
        env=env(EXP_N="3"),
    )
    try:
        wait_for(lambda: len(started(script)) == 2, what="two configs to start")
        terminal.wait_for(r"0/3 \[")
        terminal.type("\n")
        snapshot = terminal.wait_for(r"watched: \[-+\] 0/3  todo 0, running 3, done 0, failed 0")
        terminal.wait_for(r"running now \(2\):", start=snapshot.start())
        terminal.wait_for(r"attempt 1  i=\d  \| working on \d", start=snapshot.start())
        # The bar is drawn again below the snapshot.
        terminal.wait_for(r"0/3 \[", start=snapshot.end())
        (script.parent / "hold").unlink()
        assert terminal.wait() == 0, terminal.text
        assert terminal.text.count("running now (2):") == 1
        assert terminal.text.rstrip().endswith(
            f"summary written to {script.parent}/out/summary.csv"
        )
    finally:
        (script.parent / "hold").unlink(missing_ok=True)
        terminal.close()


def test_the_first_ctrl_c_says_so_above_the_bar(script: Path) -> None:
    """The first Ctrl-C's message takes the bar's line and the bar goes on below it: one bar."""
    (script.parent / "hold").touch()
    terminal = Terminal(
        [sys.executable, str(script), "run", "--max-workers", "2"],
        cwd=script.parent,
        env=env(EXP_N="3"),
    )
    try:
        wait_for(lambda: len(started(script)) == 2, what="two configs to start")
        terminal.wait_for(r"0/3 \[")
        terminal.type("\x03")  # Ctrl-C, from the terminal to the run's process group
        said = terminal.wait_for(r"\r *\r(\^C)?resweep: stopping: starting no new config")
        terminal.wait_for(r"0/3 \[", start=said.end())
        (script.parent / "hold").unlink()
        assert terminal.wait() == 130, terminal.text
        assert "done 2, failed 0, todo 1, interrupted 0 (SIGINT)" in terminal.text
    finally:
        (script.parent / "hold").unlink(missing_ok=True)
        terminal.close()


@pytest.mark.parametrize("stdin", ["closed", "pipe"])
def test_a_run_with_stdin_closed_or_piped_runs(script: Path, stdin: str) -> None:
    """A run whose stdin is no terminal never reads it: closed or piped, the run just runs."""
    proc = subprocess.run(
        [sys.executable, str(script), "run", "--backend", "threading"],
        input="\n\n\n" if stdin == "pipe" else None,
        capture_output=True,
        text=True,
        cwd=script.parent,
        env=env(EXP_N="3"),
        # No file descriptor 0 at all: sys.stdin is None in the run.
        preexec_fn=(lambda: os.close(0)) if stdin == "closed" else None,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("done 3, failed 0, todo 0\n")
    assert "running now" not in proc.stdout + proc.stderr


@pytest.fixture
def scheduler_without_workers() -> Iterator[str]:
    """A real Dask scheduler, in this process, with no worker at all."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=0, dashboard_address=":0", silence_logs=logging.ERROR, processes=True
    )
    try:
        yield str(cluster.scheduler_address)
    finally:
        cluster.close()


def test_a_scheduler_without_workers_says_so(
    script: Path, scheduler_without_workers: str, tmp_path: Path
) -> None:
    """On a cluster with no worker the run says what it waits for, and goes on once one joins."""
    address = scheduler_without_workers
    run = start_run(script, "--backend", "dask", "--scheduler", address, EXP_N="2")
    worker = None
    try:
        err = script.parent / "run.err"
        wait_for(lambda: f"waiting for workers on {address}" in err.read_text(), what="notice")
        assert run.poll() is None
        line = next(f for f in frames(err.read_text()) if "waiting for workers" in f)
        assert line.startswith("resweep: waiting for workers on tcp://")
        worker = subprocess.Popen(
            [str(Path(sys.executable).with_name("dask")), "worker", address, "--nthreads", "1",
             "--local-directory", str(tmp_path / "worker"), "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env(),
            start_new_session=True,
        )  # fmt: skip
        assert run.wait(timeout=120) == 0, err.read_text()
        assert err.read_text().count("waiting for workers") == 1
    finally:
        for proc in (run, worker):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)


NOTEBOOK = """\
import sys
import types
import warnings


class NoWidgets:
    # ipywidgets cannot be imported here, as in a notebook without it.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ipywidgets", "IPython"):
            raise ImportError(f"no module named {name!r}")
        return None


sys.meta_path.insert(0, NoWidgets())
# What tqdm.autonotebook looks for to tell a Jupyter kernel.
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
warnings.simplefilter("always")

import resweep
from resweep import runner


def work(config):
    return {"x": config["i"]}


with warnings.catch_warnings(record=True) as caught:
    bar, stream = runner.progress_bar()
    report = resweep.Experiment(
        function=work, configs=[{"i": i} for i in range(3)], output_dir=sys.argv[1]
    ).run(backend="threading")
from tqdm.std import tqdm

assert bar is tqdm and stream is sys.stderr, (bar, stream)
assert report.done == 3
print("warnings:", [str(w.message) for w in caught])
"""


def test_a_notebook_without_ipywidgets_gets_a_text_bar_and_no_warning(tmp_path: Path) -> None:
    """In a Jupyter kernel without ipywidgets the bar is text on the cell's stderr, and no
    "IProgress not found" warning. (IPython is not installed here: the kernel is simulated as
    tqdm.autonotebook detects one, by its ipykernel.zmqshell module.)"""
    path = tmp_path / "notebook.py"
    path.write_text(NOTEBOOK, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "warnings: []"
    assert "IProgress" not in proc.stderr
    assert bar_frames(proc.stderr)[-1][:2] == (3, 3)
