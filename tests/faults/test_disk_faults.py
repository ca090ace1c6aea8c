"""A full disk or a file-size limit stops the run cleanly and damages no earlier record."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import resweep

EXPERIMENT = textwrap.dedent(
    """
    import os
    from dataclasses import dataclass
    import resweep

    @dataclass(frozen=True)
    class Config:
        i: int

    ARTIFACT_BYTES = int(os.environ.get("ARTIFACT_BYTES", "0"))
    RESULT_BYTES = int(os.environ.get("RESULT_BYTES", "0"))

    def work(config, ctx):
        if ARTIFACT_BYTES:
            (ctx.dir / "artifact.bin").write_bytes(b"x" * ARTIFACT_BYTES)
        return {"i": config.i, "blob": "y" * RESULT_BYTES}

    experiment = resweep.Experiment(
        function=work, configs=[Config(i) for i in range(40)], output_dir=os.environ["OUT"],
        cache=False,
    )

    if __name__ == "__main__":
        experiment.run_cli()
    """
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs), unmounted afterwards; skipped where mounting is denied."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small filesystem here: " + mounted.stderr.decode().strip())
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _run(tmp_path: Path, out: Path, preexec=None, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "exp.py").write_text(EXPERIMENT)
    return subprocess.run(
        [sys.executable, "exp.py", "run", "--max-workers", "2", "--noprogress"],
        cwd=tmp_path,
        env={**os.environ, "OUT": str(out), **env},
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=preexec,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _done(out: Path) -> dict[str, object]:
    """Done configs as resweep reads them: experiment.yaml with the journal applied.

    With no space left, the last outcomes may live only in the journal until a run compacts it.
    """
    state = resweep.open(out)
    table = state.summary()
    done = table[table["status"] == "done"]
    yaml.safe_load((out / "experiment.yaml").read_text())  # and the state file still parses
    return {row["name"]: {"i": row["i"], "blob": row["blob"]} for _, row in done.iterrows()}


def _fill(disk: Path) -> Path:
    """Take every free byte of the filesystem."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


def test_disk_filling_up_mid_run_stops_cleanly_and_resumes(
    tmp_path: Path, small_disk: Path
) -> None:
    """Artifacts fill the disk part way: exit 2 with one line; freed, the next run finishes."""
    out = small_disk / "out"
    first = _run(tmp_path, out, ARTIFACT_BYTES="120000")
    line = _one_line_error(first)
    assert "No space left on device" in line
    done_before = _done(out)
    assert 0 < len(done_before) < 40
    for name, result in done_before.items():
        assert result["i"] == int(name.split("=")[1])
    # Space comes back (artifacts are moved elsewhere): the next run goes on.
    for artifact in out.glob("configs/*/artifact.bin"):
        artifact.unlink()
    second = _run(tmp_path, out, ARTIFACT_BYTES="1000")
    assert second.returncode == 0, second.stderr
    done_after = _done(out)
    assert len(done_after) == 40
    assert {n: done_after[n] for n in done_before} == done_before


def test_a_full_disk_while_writing_the_state_keeps_the_old_state(
    tmp_path: Path, small_disk: Path
) -> None:
    """With no byte free, the run stops before changing experiment.yaml, however often it tries."""
    out = small_disk / "out"
    assert _run(tmp_path, out).returncode == 0
    (out / "summary.csv").unlink()
    state = out / "experiment.yaml"
    # A hand edit asks for two configs to run again; then the disk fills up.
    state.write_text(state.read_text().replace('"status": "done"', '"status": "todo"', 2))
    before = state.read_bytes()
    filler = _fill(small_disk)
    for _ in range(2):  # a persistent fault: every attempt stops the same clean way
        assert "No space left on device" in _one_line_error(_run(tmp_path, out))
        assert state.read_bytes() == before
    filler.unlink()
    again = _run(tmp_path, out)
    assert again.returncode == 0, again.stderr
    assert len(_done(out)) == 40


def test_a_full_disk_while_writing_a_result_leaves_that_config_todo(
    tmp_path: Path, small_disk: Path
) -> None:
    """A result too big for the space left is not half-written: the config stays todo."""
    out = small_disk / "out"
    first = _run(tmp_path, out, RESULT_BYTES="90000")
    _one_line_error(first)
    state = resweep.open(out).state
    for name, record in state.configs.items():
        if record["status"] == "done":
            assert len(record["result"]["blob"]) == 90000, name
        else:
            assert record["status"] == "todo", name  # settled: the run that left it is gone
    # Room for the next run (a config whose result was kept only there runs again).
    shutil.rmtree(out / ".results")
    again = _run(tmp_path, out, RESULT_BYTES="10")
    assert again.returncode == 0, again.stderr


def test_a_file_size_limit_while_compacting_keeps_the_old_state(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stops the state file from growing: exit 2, the old state intact."""
    out = tmp_path / "out"
    assert _run(tmp_path, out, RESULT_BYTES="10").returncode == 0
    (out / "summary.csv").unlink()
    state = out / "experiment.yaml"
    state.write_text(state.read_text().replace('"status": "done"', '"status": "todo"'))
    before = state.read_bytes()

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 200, len(before) + 200))

    # Larger results make the new state too big for the limit.
    limited = _run(tmp_path, out, preexec=limit_file_size, RESULT_BYTES="2000")
    line = _one_line_error(limited)
    assert "too large" in line.lower()
    assert state.read_bytes() == before
    again = _run(tmp_path, out, RESULT_BYTES="2000")
    assert again.returncode == 0, again.stderr
    assert all(len(r["blob"]) == 2000 for r in _done(out).values())
