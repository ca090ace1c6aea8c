"""Fixtures for the fault suite: experiment scripts run as real processes, trees compared by bytes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# The head of every fault-suite script: OUT is the output_dir, SIDE the side-effect file.
SCRIPT_HEAD = """\
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import resweep

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
SIDE = os.path.join(HERE, "executions.txt")


def record_execution(name: str) -> None:
    # One O_APPEND write per execution: lines from concurrent processes never interleave.
    fd = os.open(SIDE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{name} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)
"""
SCRIPT_TAIL = "\n\nif __name__ == '__main__':\n    experiment.run_cli()\n"
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


@pytest.fixture
def fault_script(tmp_path: Path) -> Callable[[str], Path]:
    """Write exp.py (SCRIPT_HEAD + body + run_cli) into tmp_path; output goes to tmp_path/out."""

    def write(body: str, filename: str = "exp.py") -> Path:
        path = tmp_path / filename
        path.write_text(SCRIPT_HEAD + textwrap.dedent(body) + SCRIPT_TAIL, encoding="utf-8")
        return path

    return write


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child run: unbuffered, without the crash hook of the kill-point suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESWEEP_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_cli(
    script: Path,
    *args: str,
    timeout: float = 60,
    preexec_fn: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python script args...` to the end as a real process."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=script.parent,
        env=env or child_env(),
        preexec_fn=preexec_fn,
        check=False,
    )


def start_cli(script: Path, *args: str, log: str = "run") -> subprocess.Popen[bytes]:
    """Start `python script args...` in the background; its output goes to <log>.out/.err."""
    out = open(script.parent / f"{log}.out", "wb")  # noqa: SIM115 (the child holds it)
    err = open(script.parent / f"{log}.err", "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=out,
            stderr=err,
            cwd=script.parent,
            env=child_env(),
            start_new_session=True,
        )
    finally:
        out.close()
        err.close()


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a started run and every process it started (its workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(predicate: Callable[[], object], timeout_s: float = 30, what: str = "") -> None:
    """Poll predicate until it is true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.02)


def executions(script: Path) -> list[str]:
    """The config names in the side-effect file, one per execution."""
    path = script.parent / "executions.txt"
    if not path.exists():
        return []
    return [line.split(" ")[0] for line in path.read_text(encoding="utf-8").splitlines()]


def results_on_disk(out: Path) -> set[str]:
    """The configs whose result a worker wrote to its results file (kept until a run ends well)."""
    from resweep import files

    return {name for name, _ in files.read_results(out / files.RESULTS_DIR)}


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under root with its bytes (files), its target (links) or 'dir'."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    tree: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            tree[rel] = (
                f"-> {os.readlink(path)}" if os.path.islink(path) else Path(path).read_bytes()
            )
    return tree


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2, exactly one line on stderr containing every needle, and no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def drop_file_permissions_override() -> None:
    """In a child run as root: give up the capabilities that let root ignore file permissions."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
