"""Errors inside resweep: the run stops, the state is saved, run_failure.txt says why, it resumes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from .conftest import child_env, executions, results_on_disk

N_CONFIGS = 12
BODY = """
N_CONFIGS = 12
FAIL_EVERY = int(os.environ.get("FAIL_EVERY") or 0)


def work(config, ctx):
    record_execution(ctx.name)
    time.sleep(0.01)
    if FAIL_EVERY and config["i"] % FAIL_EVERY == 0:
        raise ValueError(f"user config {config['i']} failed")
    return {"i": config["i"]}


if os.environ.get("BUG_IN"):
    # A real bug in resweep: the named method raises from its BUG_AT-th call on.
    import importlib

    module_name, class_name, method_name = os.environ["BUG_IN"].rsplit(".", 2)
    cls = getattr(importlib.import_module(module_name), class_name)
    original = getattr(cls, method_name)
    bug_at = int(os.environ["BUG_AT"])
    calls = [0]

    def buggy(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= bug_at:
            raise RuntimeError(f"injected bug in {method_name}, call {calls[0]}")
        return original(self, *args, **kwargs)

    setattr(cls, method_name, buggy)

experiment = resweep.Experiment(
    function=work,
    configs=[{"i": i} for i in range(N_CONFIGS)],
    output_dir=OUT,
    name="internal-error",
    config_naming=lambda c: f"c{c['i']:02d}",
)
"""
NAMES = [f"c{i:02d}" for i in range(N_CONFIGS)]


@pytest.fixture
def script(fault_script: Callable[[str], Path]) -> Path:
    return fault_script(BODY)


def run(script: Path, backend: str, **env: str) -> subprocess.CompletedProcess[str]:
    args = ["run", "--backend", backend, "--max-workers", "2", "--noprogress"]
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=child_env(**env),
        cwd=script.parent,
        timeout=120,
        check=False,
    )


def saved_state(script: Path) -> dict[str, dict[str, object]]:
    text = (script.parent / "out" / "experiment.yaml").read_text(encoding="utf-8")
    configs: dict[str, dict[str, object]] = yaml.safe_load(text)["configs"]
    return configs


BUGS = [
    ("resweep.runner.Scheduler.absorb", 4, "threading"),
    ("resweep.runner.Scheduler.absorb", 3, "loky"),
    ("resweep.store.StateWriter.update", 12, "threading"),
    ("resweep.store.StateWriter.write", 5, "threading"),
]


@pytest.mark.parametrize(
    ("target", "bug_at", "backend"), BUGS, ids=[f"{t.rsplit('.', 1)[1]}-{b}" for t, _, b in BUGS]
)
def test_bug_inside_resweep_stops_saves_and_resumes(
    script: Path, target: str, bug_at: int, backend: str
) -> None:
    """A bug in resweep stops the run with its traceback; done configs are saved, the next run ends it."""
    failing = run(script, backend, BUG_IN=target, BUG_AT=str(bug_at))
    assert failing.returncode == 1, failing.stderr
    assert "Traceback" in failing.stderr
    assert "RuntimeError: injected bug" in failing.stderr
    reason = (script.parent / "out" / "run_failure.txt").read_text(encoding="utf-8")
    assert "RuntimeError: injected bug" in reason
    assert "Traceback" in reason
    state = saved_state(script)
    done = {name for name, record in state.items() if record["status"] == "done"}
    assert done, "nothing finished before the bug: raise BUG_AT"
    assert done < set(NAMES), "the bug never fired: lower BUG_AT"
    for name in done:
        assert state[name]["result"] == {"i": int(name[1:])}
    # Every config whose function returned had its result kept before it was recorded.
    assert done <= results_on_disk(script.parent / "out")
    executed_before = Counter(executions(script))
    assert max(executed_before.values()) == 1

    again = run(script, backend)
    assert again.returncode == 0, again.stderr
    assert not (script.parent / "out" / "run_failure.txt").exists()
    final = saved_state(script)
    assert {r["status"] for r in final.values()} == {"done"}
    assert all(final[name]["result"] == {"i": int(name[1:])} for name in NAMES)
    # What was done before the bug is kept as it was, never run again.
    executed = Counter(executions(script))
    assert all(executed[name] == 1 for name in done)
    assert {name: state[name] for name in done} == {
        name: {k: v for k, v in final[name].items() if k in state[name]} for name in done
    }


def test_user_failures_keep_accumulating(script: Path) -> None:
    """Configs that raise are failed one by one, every other config runs, no run_failure.txt."""
    proc = run(script, "threading", FAIL_EVERY="3")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (script.parent / "out" / "run_failure.txt").exists()
    state = saved_state(script)
    failed = {n for n, r in state.items() if r["status"] == "failed"}
    assert failed == {f"c{i:02d}" for i in range(0, N_CONFIGS, 3)}
    assert all("ValueError: user config" in str(state[n]["error"]) for n in failed)
    assert {r["status"] for n, r in state.items() if n not in failed} == {"done"}
    assert Counter(executions(script)) == Counter(NAMES)


def test_user_failures_before_a_bug_stay_failed(script: Path) -> None:
    """User failures recorded before a resweep bug stay failed; the bug alone stops the run."""
    failing = run(
        script, "threading", FAIL_EVERY="2", BUG_IN="resweep.runner.Scheduler.absorb", BUG_AT="6"
    )
    assert failing.returncode == 1, failing.stderr
    assert "RuntimeError: injected bug" in (script.parent / "out" / "run_failure.txt").read_text()
    state = saved_state(script)
    failed = {n for n, r in state.items() if r["status"] == "failed"}
    done = {n for n, r in state.items() if r["status"] == "done"}
    assert failed and done
    assert all(int(n[1:]) % 2 == 0 for n in failed)
    assert all(int(n[1:]) % 2 == 1 for n in done)
    again = run(script, "threading", FAIL_EVERY="2")
    assert again.returncode == 1  # the user's failures remain until --retry-failed
    final = saved_state(script)
    assert {n for n, r in final.items() if r["status"] == "failed"} == {
        f"c{i:02d}" for i in range(0, N_CONFIGS, 2)
    }
    assert all(executions(script).count(n) == 1 for n in failed | done)


def test_no_config_finishes_unrecorded_after_a_bug(script: Path) -> None:
    """After a bug stops a loky run, no worker goes on to run or store a config the state calls todo."""
    failing = run(script, "loky", BUG_IN="resweep.runner.Scheduler.absorb", BUG_AT="3")
    assert failing.returncode == 1, failing.stderr
    state = saved_state(script)
    stored = results_on_disk(script.parent / "out")
    assert stored == {n for n, r in state.items() if r["status"] == "done"}
    # Only configs running at the moment of the bug were cut off (one per worker at most);
    # they are todo, and nothing started after the stop.
    cut_off = set(executions(script)) - stored
    assert len(cut_off) <= 2
    assert all(state[n]["status"] == "todo" for n in cut_off)
