"""Hardening: no double execution, nothing written outside output_dir, no sweep stuck for ever."""

from __future__ import annotations

import enum
import json
import os
import shutil
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import resweep
from faults.conftest import (
    assert_one_line_error,
    child_env,
    drop_file_permissions_override,
    executions,
    kill_group,
    run_cli,
    snapshot,
    start_cli,
    wait_for,
)

# Each execution holds an flock on a file of its config while it runs: a second execution
# that finds it held overlaps the first in time, and says so in overlaps.txt.
OVERLAP_PROBE = """
import fcntl

PROBES = os.path.join(HERE, "probes")
os.makedirs(PROBES, exist_ok=True)


def probe(name):
    fd = os.open(os.path.join(PROBES, name), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(os.path.join(HERE, "overlaps.txt"), "a") as out:
            out.write(f"{name} {os.getpid()}\\n")
    return fd  # kept open by the caller: the lock lasts as long as the execution
"""


def read_state(script: Path) -> dict[str, dict[str, object]]:
    configs: dict[str, dict[str, object]] = yaml.safe_load(
        (script.parent / "out" / "experiment.yaml").read_text(encoding="utf-8")
    )["configs"]
    return configs


# Configs that wait while the file "hold" exists: the test decides when they may finish.
HOLDING = """
HOLD = os.path.join(HERE, "hold")


def work(config):
    record_execution(f"i={config['i']}")
    while os.path.exists(HOLD):
        time.sleep(0.02)
    return {"i": config["i"]}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(N_CONFIGS)], output_dir=OUT
)
"""


def holding_script(fault_script: Callable[[str], Path], n_configs: int) -> Path:
    return fault_script(f"N_CONFIGS = {n_configs}\n" + HOLDING)


def overlaps(script: Path) -> list[str]:
    path = script.parent / "overlaps.txt"
    return path.read_text().splitlines() if path.exists() else []


# -- 1. an orphaned worker never overlaps the resumed run ---------------------------------


@pytest.fixture
def slow_script(fault_script: Callable[[str], Path]) -> Path:
    return fault_script(
        OVERLAP_PROBE
        + """

def work(config):
    fd = probe(f"i={config['i']}")
    record_execution(f"i={config['i']}")
    time.sleep(config["sleep_s"])
    os.close(fd)
    return {"i": config["i"]}


experiment = resweep.Experiment(
    function=work,
    configs=[{"i": i, "sleep_s": 2.0} for i in range(3)],
    output_dir=OUT,
)
"""
    )


@pytest.fixture
def subprocess_script(fault_script: Callable[[str], Path]) -> Path:
    """Each config does its work in a subprocess of its own, which holds the overlap probe."""
    return fault_script(
        OVERLAP_PROBE
        + """
import subprocess

CHILD = (
    "import os, sys, time, fcntl\\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\\n"
    "try:\\n"
    "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\\n"
    "except BlockingIOError:\\n"
    "    open(sys.argv[2], 'a').write(sys.argv[1] + '\\\\n')\\n"
    "open(sys.argv[3], 'a').write('started\\\\n')\\n"
    "time.sleep(2.0)\\n"
)


def work(config):
    name = f"i={config['i']}"
    record_execution(name)
    probe_path = os.path.join(PROBES, name)
    subprocess.run(
        [sys.executable, "-c", CHILD, probe_path, os.path.join(HERE, "overlaps.txt"),
         os.path.join(HERE, "children.txt")],
        check=True,
    )
    return {"i": config["i"]}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(3)], output_dir=OUT
)
"""
    )


def test_a_config_s_own_subprocess_never_overlaps_the_resumed_run(subprocess_script: Path) -> None:
    """SIGKILL the coordinator alone while a config's subprocess works: the next run stops it
    (with its worker) before that config runs again, so no two executions overlap."""
    children = subprocess_script.parent / "children.txt"

    def started() -> int:
        return len(children.read_text().splitlines()) if children.exists() else 0

    for round_ in range(2):
        before = started()
        proc = start_cli(
            subprocess_script, "run", "--max-workers", "1", "--noprogress", log=f"r{round_}"
        )
        wait_for(lambda n=before: started() > n, what="a config's subprocess to start")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    final = run_cli(subprocess_script, "run", "--max-workers", "1", "--noprogress", timeout=120)
    assert final.returncode == 0, final.stderr
    assert overlaps(subprocess_script) == []


def test_a_run_started_right_after_a_sigkill_never_overlaps_the_orphaned_worker(
    slow_script: Path,
) -> None:
    """SIGKILL the coordinator alone mid-config, start again at once: no execution overlaps."""
    kills = 0
    for round_ in range(3):
        before = len(executions(slow_script))
        proc = start_cli(slow_script, "run", "--max-workers", "1", "--noprogress", log=f"r{round_}")
        wait_for(lambda n=before: len(executions(slow_script)) > n, what="a config to start")
        os.kill(proc.pid, signal.SIGKILL)  # the coordinator alone: its worker is orphaned
        proc.wait(timeout=30)
        kills += 1
    final = run_cli(slow_script, "run", "--max-workers", "1", "--noprogress", timeout=120)
    assert final.returncode == 0, final.stderr
    assert kills == 3
    assert overlaps(slow_script) == []
    assert {r["status"] for r in read_state(slow_script).values()} == {"done"}


# -- 2. --break-lock never takes over a live runner ----------------------------------------


def test_break_lock_refuses_a_live_runner_whose_run_json_is_gone(
    fault_script: Callable[[str], Path],
) -> None:
    """A lock held by a living process on this host is never broken, run.json or not."""
    script = holding_script(fault_script, 6)
    (script.parent / "hold").touch()
    first = start_cli(script, "run", "--max-workers", "2", "--noprogress")
    try:
        wait_for(lambda: len(executions(script)) >= 1, what="runner A to start a config")
        (script.parent / "out" / "run.json").unlink()
        second = run_cli(script, "run", "--break-lock", "--noprogress")
        assert_one_line_error(second, "alive on this host")
        (script.parent / "hold").unlink()
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            kill_group(first)
    assert sorted(executions(script)) == [f"i={i}" for i in range(6)]


# -- 3 and 4. nothing is written outside output_dir ----------------------------------------


def test_a_hostile_name_in_the_state_file_is_refused(
    fault_script: Callable[[str], Path], tmp_path: Path
) -> None:
    """A name from experiment.yaml that leads out of output_dir: exit 2, nothing written."""
    script = fault_script(
        """
experiment = resweep.Experiment(function=lambda c: {"ok": 1}, configs=None, output_dir=OUT)
"""
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "experiment.yaml").write_text(
        'configs:\n  "../../escaped": {params: {i: 1}, status: todo, attempts: 0}\n'
    )
    before = snapshot(tmp_path)
    for command in (["run", "--noprogress"], ["run", "--noprogress", "--backend", "dask"]):
        assert_one_line_error(run_cli(script, *command), "'../../escaped'")
    assert snapshot(tmp_path) == before
    assert not (tmp_path.parent / "escaped").exists()


@pytest.fixture
def printing_script(fault_script: Callable[[str], Path]) -> Path:
    return fault_script(
        """
@resweep.cached
def ask(x):
    return x * 2


def work(config):
    record_execution(f"i={config['i']}")
    print("hello from", config["i"])
    return {"answer": ask(config["i"])}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(3)], output_dir=OUT
)
"""
    )


@pytest.mark.parametrize(
    "link",
    ["configs/i=1", "configs/i=1/log.txt", "cache", "cache.lock", ".lock", ".workers", ".results"],
)
def test_a_symlink_under_output_dir_is_never_written_through(
    printing_script: Path, tmp_path: Path, link: str
) -> None:
    """A link planted where resweep writes: exit 2 in one line, its target untouched."""
    out = tmp_path / "out"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (out / "configs").mkdir(parents=True)
    if link.endswith("log.txt"):
        (out / "configs" / "i=1").mkdir()
        (out / link).symlink_to(target / "log.txt")
    elif link in ("cache.lock", ".lock"):
        (out / link).symlink_to(target / "lockfile")
    else:
        (out / link).symlink_to(target, target_is_directory=True)
    proc = run_cli(printing_script, "run", "--noprogress", "--max-workers", "2")
    assert_one_line_error(proc, "symbolic link")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("planted", ["link", "file"])
def test_a_link_planted_at_a_failed_configs_dir_is_not_cleared_through(
    fault_script: Callable[[str], Path], tmp_path: Path, planted: str
) -> None:
    """Its next attempt clears the last one's traceback: never through a link, and a file
    where the directory belongs stops the run too, in one line."""
    script = fault_script(
        """
def work(config):
    if config["i"] == 1 and not os.path.exists(os.path.join(HERE, "fixed")):
        raise ValueError("first time")
    return {"i": config["i"]}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(3)], output_dir=OUT
)
"""
    )
    assert run_cli(script, "run", "--noprogress").returncode == 1
    out = tmp_path / "out"
    config_dir = out / "configs" / "i=1"
    shutil.rmtree(config_dir)
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("exception.txt", "result.yaml"):
        (victim / name).write_text("precious")
    if planted == "link":
        config_dir.symlink_to(victim, target_is_directory=True)
    else:
        config_dir.write_text("a file")
    (tmp_path / "fixed").touch()
    proc = run_cli(script, "run", "--noprogress", "--retry-failed")
    assert_one_line_error(proc, "symbolic link" if planted == "link" else "i=1")
    assert sorted(p.read_text() for p in victim.iterdir()) == ["precious", "precious"]
    assert resweep.open(out).state.configs["i=1"]["status"] != "done"


@pytest.mark.parametrize("how", ["logs", "catches"])
def test_a_link_at_a_config_dir_stops_the_run_whatever_the_config_does(
    fault_script: Callable[[str], Path], tmp_path: Path, how: str
) -> None:
    """A link where a config's directory belongs stops the run in one line, even when the config
    only logs (a logging handler swallows errors) or catches the error itself."""
    script = fault_script(
        """
def work(config, ctx):
    if os.environ["HOW"] == "logs":
        ctx.log.info("a line")
    else:
        try:
            (ctx.dir / "artifact.txt").write_text("x")
        except OSError:
            pass
    return {"i": config["i"]}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(3)], output_dir=OUT
)
"""
    )
    out = tmp_path / "out"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (out / "configs").mkdir(parents=True)
    (out / "configs" / "i=1").symlink_to(target, target_is_directory=True)
    proc = run_cli(script, "run", "--noprogress", env=child_env(HOW=how))
    assert_one_line_error(proc, "symbolic link")
    assert list(target.iterdir()) == []
    assert resweep.open(out).state.configs["i=1"]["status"] == "todo"


# -- 5. a problem of one config fails that config -------------------------------------------


def test_a_name_too_long_in_bytes_is_refused_before_anything_runs(
    fault_script: Callable[[str], Path], tmp_path: Path
) -> None:
    """131 characters but 261 bytes: refused up front, not a run that can never finish."""
    script = fault_script(
        """
experiment = resweep.Experiment(
    function=lambda c: None,
    configs=[{"i": 1}],
    output_dir=OUT,
    config_naming=lambda c: "é" * 130 + "x",
)
"""
    )
    proc = run_cli(script, "run", "--noprogress")
    assert_one_line_error(proc, "255 bytes")
    assert not (tmp_path / "out" / "experiment.yaml").exists()


def test_a_result_with_a_lone_surrogate_fails_only_that_config(
    fault_script: Callable[[str], Path],
) -> None:
    """A result that cannot be encoded is that config's failure; the others are done."""
    script = fault_script(
        """
def work(config):
    if config["i"] == 1:
        return {"file": os.fsdecode(b"report-\\xff.txt")}
    return {"file": "ok"}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(3)], output_dir=OUT
)
"""
    )
    proc = run_cli(script, "run", "--noprogress")
    assert proc.returncode == 1, proc.stderr
    state = read_state(script)
    assert state["i=1"]["status"] == "failed"
    assert "not valid Unicode" in str(state["i=1"]["error"])
    assert state["i=0"]["status"] == state["i=2"]["status"] == "done"


# -- 6. the summary agrees with the state ---------------------------------------------------


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


def test_subclasses_of_int_and_str_are_stored_as_their_plain_values(tmp_path: Path) -> None:
    """An IntEnum member reads 2 in the state, in summary.csv and in show, before and after."""

    class Name(str):
        pass

    experiment = resweep.Experiment(
        function=lambda c: {"level": Level.HIGH, "tag": Name("x")},
        configs=[{"i": 1}],
        output_dir=tmp_path / "out",
    )
    experiment.run(backend="threading", progress=False)
    assert experiment.config_record("i=1")["result"] == {"level": 2, "tag": "x"}
    first = (tmp_path / "out" / "summary.csv").read_text()
    assert "Level" not in first and ",2," in first
    experiment.save_summary(force=True)
    assert (tmp_path / "out" / "summary.csv").read_text() == first


# -- 7. one line and exit 2, with no changed byte -----------------------------------------


@pytest.fixture
def finished(fault_script: Callable[[str], Path]) -> Path:
    """A finished experiment of 4 configs."""
    script = fault_script(
        """
experiment = resweep.Experiment(
    function=lambda c: {"v": c["i"] * 2}, configs=[{"i": i} for i in range(4)], output_dir=OUT
)
"""
    )
    proc = run_cli(script, "run", "--noprogress")
    assert proc.returncode == 0, proc.stderr
    return script


@pytest.mark.parametrize("which", ["experiment.yaml", "journal.jsonl"])
def test_a_state_file_that_is_a_directory_is_one_line(finished: Path, which: str) -> None:
    """experiment.yaml or the journal made a directory: every command says so in one line."""
    out = finished.parent / "out"
    path = out / which
    if path.exists():
        path.unlink()
    path.mkdir()
    for command in (["status"], ["run", "--noprogress"], ["force_summary"]):
        assert_one_line_error(run_cli(finished, *command), which)


@pytest.mark.parametrize(
    "line",
    [
        '[9, "i=0", "x"]',
        '[9, "i=0", {"status": "finished"}]',
        '[9, ["i=0"], {"status": "done"}]',
        '["9", "i=0", {"status": "done"}]',
    ],
)
def test_a_journal_line_of_the_wrong_shape_is_one_line(finished: Path, line: str) -> None:
    """Valid JSON that is no journal entry: exit 2 naming the journal, the state untouched."""
    out = finished.parent / "out"
    (out / "journal.jsonl").write_text(line + "\n" + '[10, "i=0", {"status": "todo"}]\n')
    state = (out / "experiment.yaml").read_bytes()
    for command in (["status"], ["run", "--noprogress"], ["force_summary"]):
        assert_one_line_error(run_cli(finished, *command), "journal.jsonl line 1")
    assert (out / "experiment.yaml").read_bytes() == state


def test_unquoted_timestamps_in_a_hand_edited_state_load(finished: Path) -> None:
    """A date is valid YAML: a hand edit that writes one unquoted is read as text."""
    out = finished.parent / "out"
    state = yaml.safe_load((out / "experiment.yaml").read_text())
    state["configs"]["i=0"]["status"] = "todo"
    text = yaml.safe_dump(state).replace(
        "start_time: '", "start_time: "
    )  # the times lose their quotes, as a person editing would leave them
    text = "\n".join(
        line.rstrip("'") if "start_time: " in line else line for line in text.splitlines()
    )
    (out / "experiment.yaml").write_text(text + "\n")
    assert "start_time: 20" in (out / "experiment.yaml").read_text()
    proc = run_cli(finished, "run", "--noprogress")
    assert proc.returncode == 0, proc.stderr
    assert {r["status"] for r in read_state(finished).values()} == {"done"}


def test_an_unreadable_directory_left_running_is_one_line(
    fault_script: Callable[[str], Path], tmp_path: Path
) -> None:
    """A config directory the run cannot read: exit 2 naming it, not a traceback."""
    script = fault_script(
        """
experiment = resweep.Experiment(
    function=lambda c: {"v": 1}, configs=[{"i": i} for i in range(2)], output_dir=OUT
)
"""
    )
    assert run_cli(script, "run", "--noprogress").returncode == 0
    out = tmp_path / "out"
    text = (out / "experiment.yaml").read_text().replace('"status": "done"', '"status": "running"')
    (out / "experiment.yaml").write_text(text)
    config_dir = out / "configs" / "i=0"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "result.yaml").write_text("# resweep: {}\n")
    config_dir.chmod(0)
    try:
        proc = run_cli(script, "run", "--noprogress", preexec_fn=drop_file_permissions_override)
        assert_one_line_error(proc, "i=0")
    finally:
        config_dir.chmod(stat.S_IRWXU)


def test_output_dir_made_read_only_during_a_run_is_one_line(
    fault_script: Callable[[str], Path], tmp_path: Path
) -> None:
    """The final compaction cannot write: exit 2 in one line, and every finished config kept."""
    script = fault_script(
        """
def work(config):
    if config["i"] == 3:
        os.chmod(OUT, 0o555)
    return {"i": config["i"]}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(4)], output_dir=OUT
)
"""
    )
    out = tmp_path / "out"
    try:
        proc = run_cli(
            script, "run", "--noprogress", "--backend", "sequential",
            preexec_fn=drop_file_permissions_override,
        )  # fmt: skip
        assert_one_line_error(proc, "Permission denied")
    finally:
        out.chmod(stat.S_IRWXU)
    again = run_cli(script, "run", "--noprogress")
    assert again.returncode == 0, again.stderr
    assert {r["status"] for r in read_state(script).values()} == {"done"}


# -- 8. states that recover ------------------------------------------------------------------


def test_a_journal_cut_to_nothing_during_a_run_recovers(
    fault_script: Callable[[str], Path], tmp_path: Path
) -> None:
    """The journal emptied mid-run, then a SIGKILL: later commands read what is left and go on."""
    script = fault_script(
        """
def work(config):
    record_execution(f"i={config['i']}")
    time.sleep(0.05)
    return {"i": config["i"]}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(40)], output_dir=OUT
)
"""
    )
    out = tmp_path / "out"
    proc = start_cli(script, "run", "--noprogress")
    try:
        wait_for(lambda: len(executions(script)) >= 5, what="five configs")
        os.truncate(out / "journal.jsonl", 0)
        wait_for(lambda: len(executions(script)) >= 15, what="ten more configs")
    finally:
        kill_group(proc)
    status = run_cli(script, "status")
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in status.stderr
    final = run_cli(script, "run", "--noprogress")
    assert final.returncode == 0, final.stderr
    assert {r["status"] for r in read_state(script).values()} == {"done"}
    assert run_cli(script, "status").returncode == 0


def test_a_cache_that_is_not_a_database_stops_the_run_leaving_configs_todo(
    printing_script: Path, tmp_path: Path
) -> None:
    """A broken cache.db is a storage problem: exit 2 before anything is written or run."""
    out = tmp_path / "out"
    assert run_cli(printing_script, "run", "--noprogress").returncode == 0
    text = (out / "experiment.yaml").read_text().replace('"status": "done"', '"status": "todo"')
    (out / "experiment.yaml").write_text(text)
    state = (out / "experiment.yaml").read_bytes()
    shutil.rmtree(out / "cache")
    (out / "cache").mkdir()
    (out / "cache" / "cache.db").write_bytes(b"this is not a database" * 100)
    assert len(executions(printing_script)) == 3
    proc = run_cli(printing_script, "run", "--noprogress")
    assert_one_line_error(proc, "cache")
    assert (out / "experiment.yaml").read_bytes() == state
    assert len(executions(printing_script)) == 3


# -- 9. stale or stuck results --------------------------------------------------------------


def test_clean_index_keeps_the_summary_to_the_current_configs(tmp_path: Path) -> None:
    """After clean_index drops configs, summary.csv holds only those that remain."""
    out = tmp_path / "out"
    first = resweep.Experiment(
        function=lambda c: {"v": 1}, configs=[{"i": i} for i in range(6)], output_dir=out
    )
    first.run(backend="threading", progress=False)
    fewer = resweep.Experiment(
        function=lambda c: {"v": 1}, configs=[{"i": i} for i in range(4)], output_dir=out
    )
    assert sorted(fewer.clean_index()) == ["i=4", "i=5"]
    assert len(resweep.load_summary(out)) == 4
    fewer.run(backend="threading", progress=False)
    assert sorted(resweep.load_summary(out)["name"]) == [f"i={i}" for i in range(4)]


def test_configs_gone_from_the_script_are_named_when_they_keep_a_run_unfinished(
    fault_script: Callable[[str], Path],
) -> None:
    """Todo configs the script no longer has: run names them and points at clean_index."""
    script = fault_script(
        """
N = int(os.environ.get("N", "3"))
experiment = resweep.Experiment(
    function=lambda c: {"v": 1}, configs=[{"i": i} for i in range(N)], output_dir=OUT
)
"""
    )
    out = script.parent / "out"
    first = run_cli(script, "run", "--noprogress", "--backend", "threading", env=child_env(N="3"))
    assert first.returncode == 0
    text = (
        (out / "experiment.yaml")
        .read_text()
        .replace(
            '"i=2": {"params": {"i": 2}, "status": "done"',
            '"i=2": {"params": {"i": 2}, "status": "todo"',
        )
    )
    (out / "experiment.yaml").write_text(text)
    proc = run_cli(script, "run", "--noprogress", env=child_env(N="2"))
    assert proc.returncode == 1
    assert "1 configs in the state are no longer in the script" in proc.stdout
    assert "i=2" in proc.stdout and "clean_index" in proc.stdout


def test_a_journal_gap_is_applied_and_said_once(finished: Path) -> None:
    """Entries after a gap in the journal are applied, with one warning line."""
    out = finished.parent / "out"
    state = yaml.safe_load((out / "experiment.yaml").read_text())
    seq = state["journal_seq"]
    (out / "journal.jsonl").write_text(json.dumps([seq + 5, "i=1", {"status": "todo"}]) + "\n")
    proc = run_cli(finished, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["todo"] == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("warning:")


def test_nothing_is_written_outside_output_dir_by_a_whole_sweep(
    printing_script: Path, tmp_path: Path
) -> None:
    """A plain sweep touches nothing beside its output_dir and its script's own files."""
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    before = {k for k in snapshot(tmp_path) if not k.startswith("out")}
    assert run_cli(printing_script, "run", "--noprogress", "--max-workers", "2").returncode == 0
    after = {k for k in snapshot(tmp_path) if not k.startswith("out")}
    # The script's own record of executions is the only file beside out/.
    assert {k for k in after - before if not k.startswith("__pycache__")} == {"executions.txt"}


# -- what a hostile review found next ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_a_config_s_odd_exception_fails_that_config_alone(
    fault_script: Callable[[str], Path], backend: str
) -> None:
    """A message with a lone surrogate, a __str__ that raises, a KeyboardInterrupt of the
    config's own (in a worker): each fails its config; the others are done; the next run too."""
    script = fault_script(
        """
class BadStr(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def work(config):
    i = config["i"]
    if i == 0:
        raise ValueError("bad file " + os.fsdecode(b"\\\\xff.txt"))
    if i == 1:
        raise BadStr()
    if i == 2 and os.getpid() != int(os.environ["COORDINATOR"]):
        raise KeyboardInterrupt
    return {"i": i}


os.environ.setdefault("COORDINATOR", str(os.getpid()))
experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(4)], output_dir=OUT
)
"""
    )
    for _ in range(2):
        proc = run_cli(script, "run", "--noprogress", "--max-workers", "2", "--backend", backend)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    state = read_state(script)
    assert state["i=0"]["status"] == state["i=1"]["status"] == "failed"
    assert str(state["i=0"]["error"]).startswith("ValueError: bad file \\")  # escaped, kept
    assert "could not be read" in str(state["i=1"]["error"])
    assert state["i=3"]["status"] == "done"
    assert state["i=2"]["status"] == ("failed" if backend == "loky" else "done")


def test_a_symlink_at_the_cache_database_is_never_written_through(
    printing_script: Path, tmp_path: Path
) -> None:
    """cache/cache.db as a link to a database elsewhere: refused before it is opened."""
    assert run_cli(printing_script, "run", "--noprogress").returncode == 0
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere.db"
    shutil.move(out / "cache" / "cache.db", elsewhere)
    (out / "cache" / "cache.db").symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    state = (out / "experiment.yaml").read_text().replace('"status": "done"', '"status": "todo"')
    (out / "experiment.yaml").write_text(state)
    for command in (["run", "--noprogress"], ["replay"]):
        assert_one_line_error(run_cli(printing_script, *command), "symbolic link")
    assert elsewhere.read_bytes() == before


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda text: text.replace('"cache_hits": 0', '"cache_hits": "x"', 1), "cache_hits"),
        (lambda text: text.replace('"i=0"', '"a\\u0085b"', 1), "control character"),
        (
            lambda text: (
                "a: &x [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &y [*x, *x, *x, *x, *x, *x]\n" + text
            ),
            "aliases",
        ),
    ],
)
def test_a_hand_edit_resweep_cannot_use_is_one_line(
    fault_script: Callable[[str], Path], tmp_path: Path, edit: Callable[[str], str], needle: str
) -> None:
    """A field of the wrong type, a C1 control character in a name, YAML aliases: one line."""
    script = fault_script(
        """
experiment = resweep.Experiment(function=lambda c: {"v": 1}, configs=None, output_dir=OUT)
"""
    )
    seed = resweep.Experiment(
        function=lambda c: {"v": 1},
        configs=[{"i": i} for i in range(3)],
        output_dir=tmp_path / "out",
    )
    seed.run(backend="threading", progress=False)
    path = tmp_path / "out" / "experiment.yaml"
    path.write_text(edit(path.read_text()))
    proc = run_cli(script, "run", "--noprogress", timeout=60)
    assert_one_line_error(proc, needle)


def test_a_journal_line_with_params_of_the_wrong_type_is_one_line(finished: Path) -> None:
    """params: null in a journal entry is no entry resweep wrote: exit 2, nothing changed."""
    out = finished.parent / "out"
    seq = yaml.safe_load((out / "experiment.yaml").read_text())["journal_seq"]
    (out / "journal.jsonl").write_text(json.dumps([seq + 1, "i=0", {"params": None}]) + "\n")
    for command in (["status"], ["run", "--noprogress"], ["force_summary"]):
        assert_one_line_error(run_cli(finished, *command), "journal.jsonl line 1")


def test_a_run_whose_lock_file_was_removed_keeps_the_experiment(
    fault_script: Callable[[str], Path], tmp_path: Path
) -> None:
    """rm .lock under a live run: a second run is still refused, and nothing runs twice."""
    script = holding_script(fault_script, 4)
    (tmp_path / "hold").touch()
    first = start_cli(script, "run", "--max-workers", "2", "--noprogress")
    try:
        wait_for(lambda: len(executions(script)) >= 2, what="two configs")
        (tmp_path / "out" / ".lock").unlink()
        second = run_cli(script, "run", "--noprogress")
        assert_one_line_error(second, "lock file was removed")
        (tmp_path / "hold").unlink()
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            kill_group(first)
    assert sorted(executions(script)) == [f"i={i}" for i in range(4)]


def test_an_int_too_long_to_write_out_is_one_line(fault_script: Callable[[str], Path]) -> None:
    """A param beyond Python's digit limit for text: refused up front, not a traceback."""
    script = fault_script(
        """
experiment = resweep.Experiment(
    function=lambda c: None, configs=[{"big": 10**5000}], output_dir=OUT
)
"""
    )
    assert_one_line_error(run_cli(script, "run", "--noprogress"), "config #0")


def test_a_timeout_counts_only_the_attempts_that_ran(fault_script: Callable[[str], Path]) -> None:
    """A worker killed at a timeout takes queued configs down with it: they did not run, so
    their attempt is not counted; each config's attempts are exactly 1 + retries."""
    script = fault_script(
        """
def work(config):
    record_execution(f"i={config['i']}")
    time.sleep(30)


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(3)], output_dir=OUT, timeout_s=0.5,
    retries=1,
)
"""
    )
    proc = run_cli(script, "run", "--noprogress", "--max-workers", "1", timeout=120)
    assert proc.returncode == 1, proc.stderr
    state = read_state(script)
    assert {r["status"] for r in state.values()} == {"failed"}
    runs = {name: executions(script).count(name) for name in state}
    assert runs == {"i=0": 2, "i=1": 2, "i=2": 2}
    assert {name: r["attempts"] for name, r in state.items()} == runs
