"""The journal and its compaction: torn lines, sequence numbers, racing readers, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import resweep
from resweep import encoding, files, store
from resweep.journal import Journal, read_journal
from resweep.state import State
from resweep.store import StateWriter, Store

DONE = {"status": "done", "attempts": 1, "end_time": "2024-01-01T00:00:01.000+00:00"}


def _todo(params: dict[str, Any]) -> dict[str, Any]:
    return {"params": params, "status": "todo", "attempts": 0, "start_time": None, "end_time": None}


def _saved_store(root: Path, n: int, *, journal_seq: int = 0) -> Store:
    """An experiment directory holding n todo configs c0..c<n-1>, compacted."""
    target = Store(root)
    target.ensure_dir()
    configs = {f"c{i}": _todo({"i": i}) for i in range(n)}
    target.save(State(name="journal", configs=configs, journal_seq=journal_seq))
    return target


def test_torn_last_journal_line_is_ignored(tmp_path: Path) -> None:
    """A journal whose last line was cut by a crash reads as the lines before it."""
    target = _saved_store(tmp_path / "exp", 3)
    journal = Journal(target.journal_path, 0)
    journal.append("c0", DONE)
    journal.append("c1", DONE)
    journal.write(sync=True)
    journal.close()
    whole = encoding.encode_flow([3, "c2", DONE]) + "\n"
    with open(target.journal_path, "ab") as handle:
        handle.write(whole.encode()[: len(whole) // 2])
    state = target.read()
    assert [state.configs[n]["status"] for n in ("c0", "c1", "c2")] == ["done", "done", "todo"]
    assert state.journal_seq == 2
    assert [seq for seq, _, _ in read_journal(target.journal_path, 0)] == [1, 2]


def test_entries_at_or_below_journal_seq_are_not_applied_again(tmp_path: Path) -> None:
    """Journal entries already folded into the state (seq <= journal_seq) change nothing."""
    target = _saved_store(tmp_path / "exp", 3, journal_seq=5)
    lines = [
        [4, "c0", {"status": "failed", "error": "old"}],
        [5, "c1", {"status": "failed", "error": "old"}],
        [6, "c2", DONE],
    ]
    text = "".join(encoding.encode_flow(line) + "\n" for line in lines)
    target.journal_path.write_text(text, encoding="utf-8")
    state = target.read()
    assert state.configs["c0"]["status"] == "todo"
    assert state.configs["c1"]["status"] == "todo"
    assert state.configs["c2"]["status"] == "done"
    assert state.journal_seq == 6
    assert [seq for seq, _, _ in read_journal(target.journal_path, 5)] == [6]


def test_compaction_folds_the_journal_and_reads_like_yaml(tmp_path: Path) -> None:
    """After a compaction the state file alone holds every change, as plain YAML."""
    target = _saved_store(tmp_path / "exp", 4)
    recorder = StateWriter(target, target.read())
    recorder.update("c1", {**DONE, "result": {"loss": 1e-05, "tag": "1e-05"}})
    recorder.write(sync=True)
    recorder.compact()
    assert target.journal_path.stat().st_size == 0
    recorder.update("c2", DONE)
    recorder.close()
    assert not target.journal_path.exists()
    loaded = yaml.safe_load(target.state_path.read_text(encoding="utf-8"))
    assert loaded["journal_seq"] == 2
    assert loaded["configs"]["c1"]["result"] == {"loss": 1e-05, "tag": "1e-05"}
    assert [loaded["configs"][f"c{i}"]["status"] for i in range(4)] == [
        "todo",
        "done",
        "done",
        "todo",
    ]


# Marks c0, c1, ... done in order, one journal line each, compacting every few lines.
_WRITER = """\
import sys
from pathlib import Path

from resweep.store import StateWriter, Store

target = Store(Path(sys.argv[1]))
recorder = StateWriter(target, target.read())
n, every = int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    recorder.update(f"c{i}", {"status": "done", "attempts": 1})
    recorder.write(sync=False)
    if i % every == every - 1:
        recorder.compact()
recorder.close()
"""


def test_reader_racing_compactions_sees_a_consistent_state(tmp_path: Path) -> None:
    """A reader polling while another process journals and compacts never sees a hole."""
    n = 300
    target = _saved_store(tmp_path / "exp", n)
    writer = tmp_path / "writer.py"
    writer.write_text(_WRITER, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(writer), str(target.root), str(n), "20"])
    seen = 0
    reads = 0
    try:
        while True:
            finished = proc.poll() is not None
            state = target.read()
            done = [i for i in range(n) if state.configs[f"c{i}"]["status"] == "done"]
            # Done in order, so a consistent state shows exactly c0..c<k-1>, and k never shrinks.
            assert done == list(range(len(done))), f"hole in {done[:20]}..."
            assert len(done) >= seen
            seen = len(done)
            reads += 1
            if finished:
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert seen == n
    assert reads > 1


# A no-op experiment that compacts as often as it can.
_KILL_SCRIPT = """\
import os
import sys

import resweep
from resweep import runner

runner.COMPACT_EVERY_S = 0.0


def noop(config):
    return None


experiment = resweep.Experiment(
    function=noop,
    configs=[{"i": i} for i in range(int(os.environ["N_CONFIGS"]))],
    output_dir=os.environ["OUT"],
    name="kill",
)

if __name__ == "__main__":
    experiment.run_cli()
"""


def _compacting(out: Path) -> bool:
    """Whether a compaction is writing the state file now (its temporary file exists)."""
    try:
        return any(name.startswith(".experiment.yaml.") for name in os.listdir(out))
    except FileNotFoundError:
        return False


def _run_and_kill(script: Path, out: Path, n: int, nth_compaction: int) -> bool:
    """Start a run, SIGKILL its whole process tree during its nth compaction; False if it ended."""
    env = {**os.environ, "OUT": str(out), "N_CONFIGS": str(n)}
    proc = subprocess.Popen(
        [sys.executable, str(script), "run", "--max-workers=2", "--progress=False"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    sightings = 0
    was_compacting = False
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            now_compacting = _compacting(out)
            if now_compacting and not was_compacting:
                sightings += 1
                if sightings == nth_compaction:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return True
            was_compacting = now_compacting
            time.sleep(0.0005)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _check_after_kill(out: Path, done_before: dict[str, str]) -> dict[str, str]:
    """The state parses as YAML and fast; no config done before is lost; results are all done."""
    state_path = out / store.STATE_FILE
    if not state_path.exists():  # killed while writing the very first state: nothing ran yet
        assert not done_before
        assert not files.read_results(out / files.RESULTS_DIR)
        return {}
    text = state_path.read_text(encoding="utf-8")
    assert isinstance(yaml.safe_load(text), dict)
    # As a reader sees it: configs the killed run left running, settled from their results.
    state = resweep.open(out).state
    done = {n: r["end_time"] for n, r in state.configs.items() if r["status"] == "done"}
    for name, end_time in done_before.items():
        assert done.get(name) == end_time, f"{name} lost or re-run"
    returned = {name for name, _ in files.read_results(out / files.RESULTS_DIR)}
    assert returned <= done.keys(), f"{len(returned - done.keys())} returned configs not done"
    return done


def _kill_during_compactions(tmp_path: Path, n: int, moments: list[int]) -> None:
    script = tmp_path / "exp.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT), encoding="utf-8")
    out = tmp_path / "out"
    done: dict[str, str] = {}
    kills = 0
    for nth in moments:
        if _run_and_kill(script, out, n, nth):
            kills += 1
            done = _check_after_kill(out, done)
    assert kills >= 1
    final = subprocess.run(
        [sys.executable, str(script), "run", "--max-workers=2", "--progress=False"],
        env={**os.environ, "OUT": str(out), "N_CONFIGS": str(n)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert final.returncode == 0, final.stderr[-2000:]
    done = _check_after_kill(out, done)
    assert len(done) == n


def test_sigkill_during_a_compaction_loses_no_done_config(tmp_path: Path) -> None:
    """SIGKILL of a real run while it rewrites the state leaves it parseable, nothing lost."""
    # The first compaction is the one at the start of the run; the second comes mid-run.
    _kill_during_compactions(tmp_path, 3_000, [2])


@pytest.mark.slow
def test_sigkill_at_several_compactions_loses_no_done_config(tmp_path: Path) -> None:
    """Repeated SIGKILLs of a 20,000-config run at its compactions never lose a done config."""
    _kill_during_compactions(tmp_path, 20_000, [1, 2, 3, 2, 4])
