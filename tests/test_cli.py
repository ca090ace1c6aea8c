"""The command line as a real process: exit codes, one-line errors, names as strings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import run_script
from resweep import files

SCRIPT = """
@dataclass(frozen=True)
class Config:
    label: str
    fail: bool = False


def work(config: Config, ctx: resweep.Context) -> dict:
    if config.fail:
        raise ValueError(f"failing {config.label}")
    print("hello from", ctx.name)
    return {"length": len(config.label)}


LABELS = os.environ.get("EXP_LABELS", "123,007,1.50,a'; echo foo,x").split(",")
FAIL = os.environ.get("EXP_FAIL") == "1"
experiment = resweep.Experiment(
    function=work,
    configs=[Config(label, fail=FAIL and label == "x") for label in LABELS],
    output_dir=OUT,
    name="cli",
    config_naming=lambda c: c.label,
)
"""

RUN = ("run", "--backend", "sequential", "--noprogress")


@pytest.fixture
def script(write_script: Callable[[str], Path]) -> Path:
    return write_script(SCRIPT)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_run_exits_0_when_every_config_is_done(script: Path) -> None:
    """run exits 0 and prints the counts when all configs are done, and again on a rerun."""
    first = run_script(script, *RUN)
    assert first.returncode == 0, first.stderr
    assert "done 5, failed 0, todo 0" in first.stdout
    assert "hello from" not in first.stdout
    assert (script.parent / "out" / "summary.csv").exists()
    again = run_script(script, *RUN)
    assert again.returncode == 0
    assert "done 5, failed 0, todo 0" in again.stdout


def test_run_exits_1_when_some_failed_and_status_lists_them(script: Path) -> None:
    """run exits 1 with a failed config, its progress bar counts it; status --failed shows it."""
    failed = run_script(
        script, "run", "--backend", "threading", "--max-workers", "2", env={"EXP_FAIL": "1"}
    )
    assert failed.returncode == 1, failed.stderr
    assert "done=4 failed=1" in failed.stderr
    assert "done 4, failed 1, todo 0" in failed.stdout
    status = run_script(script, "status", "--failed", env={"EXP_FAIL": "1"})
    assert status.returncode == 0
    assert "cli: 5 configs: todo 0, running 0, done 4, failed 1" in status.stdout
    assert "  x: ValueError: failing x" in status.stdout
    as_json = run_script(script, "status", "--json", "--failed")
    payload = json.loads(as_json.stdout)
    assert payload["counts"] == {"todo": 0, "running": 0, "done": 4, "failed": 1}
    assert payload["total"] == 5
    assert payload["failed"] == {"x": "ValueError: failing x"}


def test_run_exits_1_when_configs_are_left_to_do(script: Path) -> None:
    """run --only leaves configs todo, so it exits 1."""
    result = run_script(script, *RUN, "--only", "1*")
    assert result.returncode == 1
    assert "done 2, failed 0, todo 3" in result.stdout


SHOWN = [
    (["show", "123"], "123", 3),
    (["show", "007"], "007", 3),
    (["show", "1.50"], "1.50", 4),
    (["show", "a'; echo foo"], "a'; echo foo", 12),
    (["show", "--name", "1.50"], "1.50", 4),
    (["show", "--name=007"], "007", 3),
]


def test_show_takes_names_as_strings(script: Path) -> None:
    """show 123, show 007 and show --name 1.50 mean the configs of those names, not numbers."""
    assert run_script(script, *RUN).returncode == 0
    for argv, label, length in SHOWN:
        shown = run_script(script, *argv)
        assert shown.returncode == 0, (argv, shown.stderr)
        record = yaml.safe_load(shown.stdout)
        assert record["name"] == label
        assert record["status"] == "done"
        assert record["result"] == {"length": length}
        assert record["params"]["label"] == label
        assert record["attempts"] == 1
        assert record["start_time"] and record["end_time"]


def test_show_failed_config_prints_its_error(script: Path) -> None:
    """show on a failed config prints its error line."""
    run_script(script, *RUN, env={"EXP_FAIL": "1"})
    shown = run_script(script, "show", "x", env={"EXP_FAIL": "1"})
    assert shown.returncode == 0
    assert yaml.safe_load(shown.stdout)["error"] == "ValueError: failing x"


def test_show_unknown_name_exits_2_with_one_line(script: Path) -> None:
    """show of a name the experiment does not have exits 2 with one line and no traceback."""
    run_script(script, *RUN)
    shown = run_script(script, "show", "12")
    assert shown.returncode == 2
    assert_one_line_error(shown.stderr, "no config named '12'", "did you mean")


@pytest.mark.parametrize(
    "command", [["status"], ["show", "123"], ["force_summary"], ["clean_index"]]
)
def test_commands_without_an_experiment_exit_2(script: Path, command: list[str]) -> None:
    """Any command before the first run exits 2 saying there is no experiment yet."""
    result = run_script(script, *command)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "no experiment")


@pytest.mark.parametrize("command", [list(RUN), ["status"], ["show", "123"]])
def test_malformed_state_exits_2(script: Path, command: list[str]) -> None:
    """A state file that is not valid YAML makes every command exit 2 with one line."""
    assert run_script(script, *RUN).returncode == 0
    state = script.parent / "out" / "experiment.yaml"
    state.write_text(state.read_text(encoding="utf-8") + "configs: [oops\n", encoding="utf-8")
    result = run_script(script, *command)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "experiment.yaml")


def test_bad_config_names_exit_2_before_anything_runs(script: Path) -> None:
    """Duplicate or unsafe names from config_naming exit 2 and write nothing."""
    duplicate = run_script(script, *RUN, env={"EXP_LABELS": "a,A"})
    assert duplicate.returncode == 2
    assert_one_line_error(duplicate.stderr, "clashes with 'a'")
    unsafe = run_script(script, *RUN, env={"EXP_LABELS": "ok,../x"})
    assert unsafe.returncode == 2
    assert_one_line_error(unsafe.stderr, "'../x'")
    assert not (script.parent / "out").exists()


def test_force_summary_and_clean_index(script: Path) -> None:
    """force_summary writes the summary at any time; clean_index drops undeclared configs."""
    assert run_script(script, *RUN, "--only", "x").returncode == 1
    summary = script.parent / "out" / "summary.csv"
    assert not summary.exists()
    forced = run_script(script, "force_summary")
    assert forced.returncode == 0
    assert forced.stdout.strip() == str(summary)
    assert summary.read_text().count("\n") == 6
    cleaned = run_script(script, "clean_index", env={"EXP_LABELS": "x,123"})
    assert cleaned.returncode == 0
    assert cleaned.stdout.splitlines() == ["dropped 3 configs", "  007", "  1.50", "  a'; echo foo"]
    status = run_script(script, "status", "--json", env={"EXP_LABELS": "x,123"})
    assert json.loads(status.stdout)["total"] == 2


def test_run_on_worker_processes_prints_nothing_but_its_counts(script: Path) -> None:
    """A run on worker processes, which lets its pool go before its final writes, exits 0
    with its counts and the summary's path on stdout and nothing on stderr: no warning from
    the pool's shutdown."""
    done = run_script(script, "run", "--max-workers", "2", "--noprogress")
    assert done.returncode == 0, done.stderr
    summary = script.parent / "out" / "summary.csv"
    assert done.stdout.splitlines() == [
        "done 5, failed 0, todo 0",
        f"summary written to {summary}",
    ]
    assert done.stderr == ""


@pytest.mark.parametrize("flag", ["-dryrun", "-x", "-f"])
def test_a_one_dash_flag_is_refused_before_anything_runs(script: Path, flag: str) -> None:
    """fire would read -f as --fresh and ignore -dryrun; resweep refuses both in one line."""
    proc = run_script(script, "run", flag)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, repr(flag), "two dashes")
    assert not (script.parent / "out").exists()


def test_a_dry_run_sees_configs_a_dead_run_left_running_as_the_run_will(script: Path) -> None:
    """--dry-run settles configs left running as run would: done when their result made it."""
    assert run_script(script, *RUN).returncode == 0
    out = script.parent / "out"
    state_path = out / "experiment.yaml"
    configs = yaml.safe_load(state_path.read_text())["configs"]
    state_path.write_text(state_path.read_text().replace('"status": "done"', '"status": "running"'))
    # As a killed run leaves it: three of the five results made it to a worker's results file.
    kept = files.ResultLog(out / files.RESULTS_DIR)
    for name in list(configs)[:3]:
        record = configs[name]
        stored = files.StoredResult(
            record["result"], 1, record["end_time"], 0.1, session=record["session"]
        )
        kept.append(name, stored)
    kept.close()
    dry = run_script(script, "run", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would run 2 configs" in dry.stdout and "would leave 3 done" in dry.stdout


def test_resweeps_own_warnings_are_one_line(script: Path) -> None:
    """A journal that lost entries is applied; the command says so in one warning line."""
    assert run_script(script, *RUN).returncode == 0
    out = script.parent / "out"
    seq = yaml.safe_load((out / "experiment.yaml").read_text())["journal_seq"]
    first = yaml.safe_load((out / "experiment.yaml").read_text())["configs"]
    name = next(iter(first))
    (out / "journal.jsonl").write_text(json.dumps([seq + 3, name, {"status": "todo"}]) + "\n")
    status = run_script(script, "status")
    assert status.returncode == 0
    assert status.stderr.startswith("warning: ") and status.stderr.count("\n") == 1
    assert "todo 1" in status.stdout


def test_show_and_replay_suggest_names_with_fields_in_another_order(
    write_script: Callable[[str], Path],
) -> None:
    """show NAME and replay --config with fields out of order suggest the real name."""
    script = write_script(
        """
        def work(config: dict) -> dict:
            return {"twice": 2 * config["seed"]}

        experiment = resweep.Experiment(
            function=work,
            configs=[{"model": m, "seed": s} for m in ("a", "b") for s in (1, 2)],
            output_dir=OUT,
        )
        """
    )
    assert run_script(script, *RUN).returncode == 0
    for command in (("show", "seed=1,model=a"), ("replay", "--config", "seed=1,model=a")):
        result = run_script(script, *command)
        assert result.returncode == 2
        assert_one_line_error(
            result.stderr, "no config named 'seed=1,model=a'; did you mean 'model=a,seed=1'"
        )
