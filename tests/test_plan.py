"""Dry runs: `run --dry-run` says what a run would do and writes nothing at all."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import resweep
from conftest import Config, run_script, square

SCRIPT = """\
@dataclass(frozen=True)
class Config:
    x: int
    seed: int = 0


def work(config: Config) -> dict:
    if config.x == 3:
        raise ValueError("three is unlucky")
    return {"y": config.x * 2}


N = int(os.environ.get("N", "4"))
experiment = resweep.Experiment(
    function=work,
    configs=resweep.grid(Config, x=range(N)),
    output_dir=OUT,
    name="plan",
)
"""


def snapshot(root: Path) -> dict[str, tuple[str, bytes, int]]:
    """Every entry under root with its kind, bytes and modification time."""
    entries: dict[str, tuple[str, bytes, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(dirpath, name)
            entries[str(path.relative_to(root))] = ("dir", b"", path.stat().st_mtime_ns)
        for name in filenames:
            path = Path(dirpath, name)
            entries[str(path.relative_to(root))] = (
                "file",
                path.read_bytes(),
                path.stat().st_mtime_ns,
            )
    return entries


def test_dry_run_creates_nothing_when_no_experiment_exists(
    tmp_path: Path, write_script: Callable[[str], Path]
) -> None:
    """A dry run before the first run lists every config as new and creates no directory."""
    script = write_script(SCRIPT)
    before = snapshot(tmp_path)
    proc = run_script(script, "run", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would run 4 configs: 4 new, 0 todo, 0 failed" in proc.stdout
    assert [line.split() for line in proc.stdout.splitlines()[1:]] == [
        ["new", "x=0"], ["new", "x=1"], ["new", "x=2"], ["new", "x=3"],
    ]  # fmt: skip
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before


def test_dry_run_leaves_an_existing_experiment_byte_for_byte(
    tmp_path: Path, write_script: Callable[[str], Path]
) -> None:
    """On an experiment with done, failed and new configs a dry run changes no byte or mtime."""
    script = write_script(SCRIPT)
    first = run_script(script, "run", "--backend", "sequential", "--progress=False")
    assert first.returncode == 1, first.stderr
    # The same experiment declaring two more configs (x=4, x=5).
    env_script = script.with_name("more.py")
    env_script.write_text(script.read_text().replace('"4"', '"6"'))
    before = snapshot(tmp_path)
    for args in (
        ["run", "--dry-run"],
        ["run", "--dry-run", "--retry-failed"],
        ["run", "--dry-run", "--rerun-changed", "--only", "x=*"],
    ):
        proc = run_script(env_script, *args)
        assert proc.returncode == 0, proc.stderr
        assert snapshot(tmp_path) == before
    plain = run_script(env_script, "run", "--dry-run").stdout
    assert plain.splitlines()[0] == (
        "would run 2 configs: 2 new, 0 todo, 0 failed, 0 done but changed; "
        "would leave 3 done and 1 failed (add --retry-failed)"
    )
    retry = run_script(env_script, "run", "--dry-run", "--retry-failed").stdout
    assert "would run 3 configs: 2 new, 0 todo, 1 failed" in retry
    assert "  failed  x=3" in retry.splitlines()


def test_dry_run_counts_todo_and_hand_edited_statuses(tmp_path: Path) -> None:
    """plan() sees todo configs, including a done one a person set back to todo."""
    out = tmp_path / "out"
    experiment = resweep.Experiment(
        function=square, configs=resweep.grid(Config, model=["a"], lr=[0.1, 0.2]), output_dir=out
    )
    experiment.run(backend="sequential", progress=False)
    state = out / "experiment.yaml"
    text = state.read_text()
    state.write_text(text.replace('"status": "done"', '"status": "todo"', 1))
    before = snapshot(tmp_path)
    plan = experiment.plan()
    assert (len(plan.todo), plan.done, plan.new) == (1, 1, [])
    assert "would run 1 configs: 0 new, 1 todo" in plan.describe()
    assert snapshot(tmp_path) == before


def test_plan_with_rerun_changed_lists_configs_of_other_code(tmp_path: Path) -> None:
    """A done config whose recorded fingerprint differs is 'changed' only with rerun_changed."""
    out = tmp_path / "out"
    experiment = resweep.Experiment(
        function=square, configs=resweep.grid(Config, model=["a", "b"], lr=[0.1]), output_dir=out
    )
    experiment.run(backend="sequential", progress=False)
    state = out / "experiment.yaml"
    lines = state.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if "model=a" in line)
    # As if the function had been edited since: another function digest.
    lines[index] = re.sub(r'("fingerprint": "v\d+:)[0-9a-f]+', r"\g<1>000000000000", lines[index])
    state.write_text("".join(lines))
    assert experiment.plan().changed == []
    plan = experiment.plan(rerun_changed=True)
    assert plan.changed == ["lr=0.1,model=a"]
    assert plan.done == 1
    assert "1 done but changed" in plan.describe()
