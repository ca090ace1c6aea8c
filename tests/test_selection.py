"""Choosing configs by name (only) and by their fields (where), from the API and the CLI."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import resweep
from conftest import run_script
from resweep.errors import SelectionError
from resweep.selection import Selection, matches, parse_where


@dataclass(frozen=True)
class Inner:
    depth: int = 1


@dataclass(frozen=True)
class Config:
    model: str
    temperature: float
    seed: int = 0
    flag: bool = False
    note: str | None = None
    inner: Inner = field(default_factory=Inner)


def score(config: Config) -> dict[str, float]:
    return {"score": config.temperature + config.seed}


def make(tmp_path: Path) -> resweep.Experiment:
    configs = resweep.grid(
        Config, model=["gpt-4", "gpt-3", "claude"], temperature=[0.7, 1.0], seed=[0, 1]
    )
    configs.append(Config("claude", 0.5, flag=True, inner=Inner(2)))
    return resweep.Experiment(function=score, configs=configs, output_dir=tmp_path / "out")


@pytest.mark.parametrize(
    ("value", "glob", "expected"),
    [
        ("gpt-4", "gpt-*", True),
        ("claude", "gpt-*", False),
        (0.7, "0.7", True),
        (0.7, "0.7*", True),
        (1.0, "1", True),
        (1.0, "1.0", True),
        (1, "1", True),
        (1, "1.0", True),
        (1e-05, "1e-5", True),
        (1e-05, "0.00001", True),
        (2, "1", False),
        (True, "true", True),
        (True, "True", True),
        (False, "true", False),
        (False, "false", True),
        (None, "null", True),
        (None, "None", True),
        ("1", "1.0", False),
        ([1, 2], "[1,2]", True),
        ("naïve", "na?ve", True),
    ],
)
def test_a_glob_matches_the_values_text_form(value: object, glob: str, expected: bool) -> None:
    """Numbers, bools and None match as they are written; a plain number also by its value."""
    assert matches(value, glob) is expected


def test_parse_where_takes_key_glob_and_repeats() -> None:
    """KEY=GLOB pairs; the same key twice means either glob; a pair without '=' is refused."""
    assert parse_where(["model=gpt-*", "seed=1", "model=claude"]) == {
        "model": ["gpt-*", "claude"],
        "seed": ["1"],
    }
    assert parse_where(["prompt=a=b"]) == {"prompt": ["a=b"]}
    with pytest.raises(SelectionError, match="KEY=GLOB"):
        parse_where(["model"])


def test_run_where_runs_only_the_matching_configs(tmp_path: Path) -> None:
    """run(where=...) runs the configs whose fields match every key, and leaves the rest todo."""
    experiment = make(tmp_path)
    report = experiment.run(
        backend="sequential", progress=False, where={"model": "gpt-*", "temperature": 0.7}
    )
    assert (report.done, report.todo) == (4, 9)
    done = {n for n, r in experiment.read_state().configs.items() if r["status"] == "done"}
    assert done == {
        "model=gpt-4,temperature=0.7",
        "model=gpt-4,seed=1,temperature=0.7",
        "model=gpt-3,temperature=0.7",
        "model=gpt-3,seed=1,temperature=0.7",
    }


def test_where_on_nested_fields_bools_and_lists_of_globs(tmp_path: Path) -> None:
    """Dotted keys reach nested fields; a list of globs matches any of them."""
    experiment = make(tmp_path)
    plan = experiment.plan(where={"inner.depth": 2, "flag": "true"})
    assert plan.new == ["flag=True,inner.depth=2,model=claude,temperature=0.5"]
    assert len(experiment.plan(where={"model": ["gpt-4", "claude"]}).new) == 9
    both = experiment.plan(only="*seed=1*", where={"model": "gpt-3"})
    assert both.new == ["model=gpt-3,seed=1,temperature=0.7", "model=gpt-3,seed=1,temperature=1.0"]


def test_a_selection_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    """Neither where nor only silently selects nothing: each says so, and nothing is written."""
    experiment = make(tmp_path)
    with pytest.raises(SelectionError, match=r"--where model=a\* matches none of 13 configs"):
        experiment.run(backend="sequential", progress=False, where={"model": "a*"})
    with pytest.raises(SelectionError, match=r"--only 'zz\*' matches none of 13 configs"):
        experiment.run(backend="sequential", progress=False, only="zz*")
    assert not (tmp_path / "out" / "experiment.yaml").exists()


def test_an_unknown_field_names_close_ones(tmp_path: Path) -> None:
    """A key that no config has is an error naming the closest fields, or a nested one's fields."""
    experiment = make(tmp_path)
    with pytest.raises(SelectionError, match="no config has a field 'modle'; did you mean model"):
        experiment.plan(where={"modle": "a"})
    with pytest.raises(SelectionError, match=r"choose one: inner\.depth"):
        experiment.plan(where={"inner": "a"})
    with pytest.raises(SelectionError, match="mapping of field"):
        Selection.of(None, ["model=a"])  # type: ignore[arg-type]


def test_status_replay_and_summary_take_where(tmp_path: Path) -> None:
    """status, replay and save_summary look only at the configs where selects."""
    experiment = make(tmp_path)
    experiment.run(backend="sequential", progress=False, where={"seed": "1"})
    assert experiment.status(where={"seed": 1}) == {
        "todo": 0,
        "running": 0,
        "done": 6,
        "failed": 0,
    }
    assert experiment.status(where={"model": "claude"})["todo"] == 3
    report = experiment.status_report(where={"model": "claude"})
    assert report.total == 5
    replays = experiment.replay(where={"model": "claude"})
    assert isinstance(replays, list)
    assert sorted(r.name for r in replays) == [
        "model=claude,seed=1,temperature=0.7",
        "model=claude,seed=1,temperature=1.0",
    ]
    with pytest.raises(SelectionError, match="matches none"):
        experiment.replay("model=claude,seed=1,temperature=0.7", where={"model": "gpt*"})
    path = experiment.save_summary(force=True, where={"temperature": "1"})
    with path.open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6
    assert {row["temperature"] for row in rows} == {"1.0"}
    with pytest.raises(resweep.ResweepError, match="not every config is done"):
        experiment.save_summary(where={"model": "claude"})
    assert experiment.save_summary(where={"seed": "1"}) == path


CLI_SCRIPT = """
@dataclass(frozen=True)
class Config:
    model: str
    temperature: float
    seed: int = 0


def work(config: Config, ctx: resweep.Context) -> dict:
    ctx.log.info("working on %s", config.model)
    return {"score": config.temperature + config.seed}


experiment = resweep.Experiment(
    function=work,
    configs=resweep.grid(
        Config, model=["gpt-4", "gpt-3", "claude"], temperature=[0.7, 1.0], seed=range(2)
    ),
    output_dir=OUT,
)
"""

RUN = ("run", "--backend", "sequential", "--noprogress")


def test_repeated_where_on_every_command_from_the_command_line(
    write_script: Callable[[str], Path],
) -> None:
    """Every --where counts (not only the last), on run, status, replay and force_summary."""
    script = write_script(CLI_SCRIPT)
    ran = run_script(script, *RUN, "--where", "model=gpt-*", "--where=temperature=0.7")
    assert ran.returncode == 1, ran.stderr  # eight configs stay todo
    assert "done 4, failed 0, todo 8" in ran.stdout
    status = run_script(script, "status", "--where", "model=gpt-*", "--where", "seed=1")
    assert status.returncode == 0, status.stderr
    assert "4 configs: todo 2, running 0, done 2, failed 0" in status.stdout
    replay = run_script(script, "replay", "--where", "model=gpt-3", "--where", "seed=0")
    assert replay.returncode == 0, replay.stderr
    assert "replayed 1: 1 equal" in replay.stdout
    assert "[model=gpt-3,temperature=0.7] " in replay.stderr
    summary = run_script(script, "force_summary", "--where", "model=claude", "--where", "seed=1")
    assert summary.returncode == 0, summary.stderr
    with (script.parent / "out" / "summary.csv").open(encoding="utf-8") as file:
        names = [row["name"] for row in csv.DictReader(file)]
    assert names == ["model=claude,seed=1,temperature=0.7", "model=claude,seed=1,temperature=1.0"]
    # The same key twice selects either value.
    either = run_script(script, "status", "--where", "model=claude", "--where", "model=gpt-4")
    assert "8 configs" in either.stdout


@pytest.mark.parametrize("command", ["run", "status", "replay", "force_summary"])
def test_a_selection_matching_nothing_exits_2_with_one_line(
    write_script: Callable[[str], Path], command: str
) -> None:
    """Every command says in one line that a selection matches nothing, and exits 2."""
    script = write_script(CLI_SCRIPT)
    assert run_script(script, *RUN, "--where", "seed=0").returncode == 1
    result = run_script(script, command, "--where", "model=a*", "--where", "seed=1")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --where model=a* --where seed=1 matches none of 12 configs"]
    assert result.stdout == ""
    unknown = run_script(script, command, "--where", "modle=a")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "error: --where modle: no config has a field 'modle'; did you mean model?"
    )
    missing = run_script(script, command, "--where")
    assert missing.returncode == 2
    assert "--where takes KEY=GLOB" in missing.stderr


def test_only_matching_nothing_exits_2(write_script: Callable[[str], Path]) -> None:
    """run --only with a glob no name matches says so and exits 2, like --where."""
    script = write_script(CLI_SCRIPT)
    result = run_script(script, *RUN, "--only", "zz*")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --only 'zz*' matches none of 12 configs"
    assert not (script.parent / "out" / "experiment.yaml").exists()
