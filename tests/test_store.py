"""The state file: round trips, the golden file, validation, journal, lock."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

import resweep
from conftest import Config, same
from resweep import clock, durable, encoding, files, store
from resweep import state as statefile
from resweep.errors import LockedError, StateError
from resweep.state import State
from resweep.store import Store

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "state_v1.yaml"

# Values that trip up naive JSON-as-YAML writers: exponents, non-finite floats, unicode,
# strings that YAML 1.1 would read as numbers, booleans or null.
TRICKY_VALUES: list[Any] = [
    1e-05,
    -2.5e-300,
    1e20,
    1e16,
    0.1,
    -0.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    2**70,
    -7,
    True,
    None,
    "",
    "héllo wörld",
    "emoji 🎉 and \U0001d518",
    "日本語",
    "1",
    "1.0",
    "1e5",
    "0x10",
    "0o17",
    "1_000",
    "true",
    "yes",
    "no",
    "on",
    "null",
    "~",
    ".inf",
    ".nan",
    "2001-12-14",
    "12:30:00",
    "a: b",
    "- x",
    "# not a comment",
    "line\nbreak",
    "tab\there",
    "quote ' and \" both",
    "back\\slash",
    "\x00nul\x7f",
    "\u2028sep",
    {"nested": {"deep": [1, 2.0, "3", None, {"k": 1e-07}]}},
    [],
    {},
    [[], {}],
]


@pytest.mark.parametrize("value", TRICKY_VALUES, ids=repr)
def test_flow_encoding_reads_back_the_same_with_json_and_yaml(value: Any) -> None:
    """One encoded line reads back as the same value through decode_flow and yaml.safe_load."""
    text = encoding.encode_flow(value)
    assert "\n" not in text
    assert same(encoding.decode_flow(text), value)
    assert same(yaml.safe_load(text), value)


@pytest.mark.parametrize("value", ["emoji 🎉", {"k🎉": ["\U0001d518", 1e-05]}, "\\ud83c 🎉"])
def test_flow_encoding_of_characters_beyond_u_ffff_is_json_too(value: Any) -> None:
    """An emoji is written as itself, not as an escape only YAML reads: json.loads reads it too."""
    text = encoding.encode_flow(value)
    assert json.loads(text) == value
    assert yaml.safe_load(text) == value


def _tricky_state() -> State:
    configs: dict[str, dict[str, Any]] = {}
    for i, value in enumerate(TRICKY_VALUES):
        name = f"c{i}" if i % 3 else f"名前 🎉 {i}"
        configs[name] = {
            "params": {"value": value, "i": i},
            "status": statefile.STATUSES[i % 4],
            "attempts": i,
            "start_time": "2024-01-01T00:00:00.000+00:00",
            "end_time": None,
            "result": {"echo": value},
        }
    return State(name="tricky: 🎉", description="1e-05", configs=configs, journal_seq=17)


def test_state_round_trip_equals_yaml_safe_load(tmp_path: Path) -> None:
    """dump_state then parse_state gives the same state, and so does plain yaml.safe_load."""
    state = _tricky_state()
    text = statefile.dump_state(state)
    parsed = statefile.parse_state(text, tmp_path / "experiment.yaml")
    assert parsed.name == state.name
    assert parsed.description == "1e-05"
    assert parsed.journal_seq == 17
    assert same(parsed.configs, state.configs)
    loaded = yaml.safe_load(text)
    assert loaded["format_version"] == statefile.FORMAT_VERSION
    assert same(loaded["configs"], state.configs)


def test_store_save_and_read_round_trip(tmp_path: Path) -> None:
    """A state saved atomically reads back the same and leaves no temporary file."""
    target = Store(tmp_path / "exp")
    target.ensure_dir()
    state = _tricky_state()
    for record in state.configs.values():
        # A reader settles configs left running by a run that is gone; that is tested elsewhere.
        record["status"] = "done" if record["status"] == "running" else record["status"]
    target.save(state)
    assert same(target.read().configs, state.configs)
    assert sorted(p.name for p in target.root.iterdir()) == ["experiment.yaml"]


def test_golden_state_file_is_still_read(tmp_path: Path) -> None:
    """A state file written by resweep 0.1.0 reads with the values it was written with."""
    shutil.copy(GOLDEN, tmp_path / "experiment.yaml")
    state = Store(tmp_path).read()
    assert state.name == "golden"
    assert state.description == "State written by resweep 0.1.0: done, failed and todo configs."
    assert state.format_version == 1
    assert state.counts() == {"todo": 1, "running": 0, "done": 2, "failed": 1}
    done = state.configs["lr=0.1,model=a"]
    assert done["params"] == {"lr": 0.1, "model": "a", "seed": 0}
    assert done["attempts"] == 1
    assert done["result"] == {
        "accuracy": 0.5,
        "nested": {"k": 1e-05, "list": [1, 2.5, "x"]},
        "ok": True,
        "none": None,
    }
    failed = state.configs["lr=0.01,model=b,seed=1"]
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: boom: lr too small"
    odd = state.configs["lr=2.0,model=c"]["result"]
    assert math.isnan(odd["loss"])
    assert odd["best"] == math.inf
    assert odd["code"] == "1"
    assert odd["text"] == "ünï 🎉"
    assert odd["tiny"] == 1e-05
    todo = state.configs["aad84ccb81b5"]
    assert todo["status"] == "todo"
    assert todo["params"]["model"] == "naïve 🎉"
    assert same(yaml.safe_load(GOLDEN.read_text(encoding="utf-8"))["configs"], state.configs)


def _golden_work(config: Config) -> dict[str, Any]:
    return {"ran": config.model}


def test_golden_state_resumes_with_the_same_names(tmp_path: Path) -> None:
    """Today's code names the golden configs as 0.1.0 did, so a run only does what was left."""
    shutil.copy(GOLDEN, tmp_path / "experiment.yaml")
    experiment = resweep.Experiment(
        function=_golden_work,
        configs=[
            Config("a", 0.1),
            Config("b", 0.01, seed=1),
            Config("c", 2.0),
            Config("naïve 🎉", 1e-05),
        ],
        output_dir=tmp_path,
    )
    report = experiment.run(backend="sequential", progress=False)
    assert (report.executed, report.done, report.failed) == (1, 3, 1)
    state = experiment.read_state()
    assert len(state.configs) == 4
    assert state.configs["aad84ccb81b5"]["result"] == {"ran": "naïve 🎉"}
    assert state.configs["lr=0.1,model=a"]["result"]["accuracy"] == 0.5


def test_newer_format_version_is_a_state_error(tmp_path: Path) -> None:
    """A state file from a newer resweep is refused with a message saying to upgrade."""
    text = GOLDEN.read_text(encoding="utf-8").replace("format_version: 1", "format_version: 2")
    with pytest.raises(StateError, match=r"format_version 2.*upgrade resweep"):
        statefile.parse_state(text, tmp_path / "experiment.yaml")


def test_unknown_status_is_a_state_error(tmp_path: Path) -> None:
    """A status that is not todo, running, done or failed is a StateError naming the config."""
    text = GOLDEN.read_text(encoding="utf-8").replace('"status": "failed"', '"status": "broken"')
    with pytest.raises(StateError, match=r"'lr=0.01,model=b,seed=1' has unknown status 'broken'"):
        statefile.parse_state(text, tmp_path / "experiment.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("configs: [unclosed\n", "not valid YAML"),
        ("- a list\n", "no mapping at the top"),
        ("format_version: 1\nconfigs: [1, 2]\n", "must be a mapping"),
        ("configs:\n  x: 3\n", "must be a mapping with params"),
        ("configs:\n  x: {status: done, attempts: -1}\n", "attempts -1"),
        ("configs:\n  x: {status: done, params: [1]}\n", "params that are not a mapping"),
        ("name: 5\nconfigs: {}\n", "'name' must be a string"),
    ],
    ids=["yaml", "list", "configs-list", "record-scalar", "attempts", "params", "name"],
)
def test_malformed_state_is_a_state_error(tmp_path: Path, text: str, message: str) -> None:
    """A broken state file is a StateError that says what is wrong, never a crash."""
    with pytest.raises(StateError, match=message):
        statefile.parse_state(text, tmp_path / "experiment.yaml")


def test_hand_edit_in_block_style_is_read(tmp_path: Path) -> None:
    """A person who rewrites the file in ordinary block YAML still gets it read."""
    text = (
        "format_version: 1\nname: hand\nconfigs:\n  one:\n    params: {x: 1}\n"
        "    status: failed\n    attempts: 2\n"
    )
    state = statefile.parse_state(text, tmp_path / "experiment.yaml")
    assert state.name == "hand"
    assert state.configs == {"one": {"params": {"x": 1}, "status": "failed", "attempts": 2}}


@pytest.mark.parametrize("description", ["0E0", "1e5", "1.5e5", "NaN", "-Infinity"])
def test_a_file_rewritten_as_yaml_keeps_strings_json_would_read_as_numbers(
    tmp_path: Path, description: str
) -> None:
    """A string like 1e5, which a YAML tool writes unquoted, reads back as that string."""
    text = statefile.dump_state(State(name="exp", description=description))
    edited = yaml.safe_dump(yaml.safe_load(text), sort_keys=False)
    assert f"description: {description}\n" in edited
    assert statefile.parse_state(edited, tmp_path / "experiment.yaml").description == description


def test_a_lone_surrogate_is_stored_and_read_back(tmp_path: Path) -> None:
    """A lone surrogate (a file name that os.listdir could not decode) survives the state file,
    as resweep writes it and as a YAML tool rewrites it."""
    path = "/data/caf\udce9.csv"
    state = State(
        name="\ud800", configs={"c": {"params": {"path": path}, "status": "todo", "attempts": 0}}
    )
    assert encoding.decode_flow(encoding.encode_flow(path)) == path
    text = statefile.dump_state(state)
    for written in (text, yaml.safe_dump(yaml.safe_load(text))):
        parsed = statefile.parse_state(written, tmp_path / "experiment.yaml")
        assert (parsed.name, parsed.configs) == (state.name, state.configs)
    assert yaml.safe_load(text)["configs"] == state.configs


def test_missing_state_says_no_experiment_yet(tmp_path: Path) -> None:
    """Reading a directory without a state file says there is no experiment yet."""
    with pytest.raises(StateError, match="no experiment"):
        Store(tmp_path / "nothing").read()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="is a file"):
        Store(tmp_path / "file").read()


def test_journal_entries_apply_on_top_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    """Journal entries newer than the state win; a half-written last line is ignored."""
    target = Store(tmp_path)
    target.ensure_dir()
    state = State(configs={"a": {"params": {}, "status": "todo", "attempts": 0}}, journal_seq=3)
    target.save(state)
    lines = [
        encoding.encode_flow([3, "a", {"status": "failed"}]),  # already folded in: ignored
        encoding.encode_flow([4, "a", {"status": "running", "attempts": 1}]),
        encoding.encode_flow([5, "a", {"status": "done", "result": {"x": 1e-05}}]),
        '[6, "a", {"status": "fai',
    ]
    target.journal_path.write_text("\n".join(lines), encoding="utf-8")
    record = target.read().configs["a"]
    assert record == {"params": {}, "status": "done", "attempts": 1, "result": {"x": 1e-05}}


def test_recorder_makes_changes_durable_in_the_journal(tmp_path: Path) -> None:
    """A recorded change is readable from disk after a synced write, before any compaction."""
    target = Store(tmp_path)
    target.ensure_dir()
    state = State(configs={"a": {"params": {}, "status": "todo", "attempts": 0}})
    target.save(state)
    recorder = store.StateWriter(target, state)
    recorder.update("a", {"status": "done", "result": {"v": float("nan")}})
    recorder.write(sync=True)
    assert target.read().configs["a"]["status"] == "done"
    recorder.close()
    assert not target.journal_path.exists()
    assert math.isnan(yaml.safe_load(target.state_path.read_text())["configs"]["a"]["result"]["v"])


def test_results_file_round_trip(tmp_path: Path) -> None:
    """A worker's results file keeps each result with what recovery needs, by name and attempt."""
    result = {"loss": float("inf"), "name": "ü 🎉", "tiny": 1e-05, "nested": {"a": [1, None]}}
    kept = files.ResultLog(tmp_path / "results")
    kept.append("a", files.StoredResult(result, 3, "t", 1.5, 2, 1, "s", "f"))
    kept.append("b", files.StoredResult(None, 1, None, None))
    kept.append("a", files.StoredResult({"x": 1}, 4, "u", 0.5))
    kept.close()
    found = files.read_results(tmp_path / "results")
    assert sorted(found) == [("a", 3), ("a", 4), ("b", 1)]
    assert same(found["a", 3].result, result)
    assert found["a", 3] == files.StoredResult(found["a", 3].result, 3, "t", 1.5, 2, 1, "s", "f")
    assert found["b", 1].result is None
    assert files.read_results(tmp_path / "missing") == {}


@pytest.mark.parametrize("result", [None, {"loss": 0.5, "note": "ü"}])
def test_a_results_line_cut_short_is_no_result(tmp_path: Path, result: Any) -> None:
    """A crash mid-write leaves a cut last line: it never passes for a result, the lines
    before it still read, and the next process with that file starts a fresh line."""
    kept = files.ResultLog(tmp_path)
    kept.append("first", files.StoredResult({"ok": 1}, 1, None, None))
    kept.append("second", files.StoredResult(result, 1, None, None))
    kept.close()
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    first_line = data.index(b"\n") + 1
    for cut in range(first_line, len(data) - 1):
        path.write_bytes(data[:cut])
        assert set(files.read_results(tmp_path)) == {("first", 1)}, data[:cut]
    path.write_bytes(data[: len(data) - 5])
    again = files.ResultLog(tmp_path)  # a later process that got the same pid
    again.append("third", files.StoredResult({"ok": 3}, 2, None, None))
    again.close()
    assert set(files.read_results(tmp_path)) == {("first", 1), ("third", 2)}


@pytest.mark.parametrize(
    "line",
    [
        '{"name": "x", "attempt": 1, "result": {}, "end_time": 5}',
        '{"name": "x", "attempt": 1, "result": {}, "duration_s": "abc"}',
        '{"name": "x", "attempt": 1, "result": {}, "cache_hits": "lots"}',
        '{"name": "x", "attempt": 1, "result": "not a mapping"}',
        '{"name": "x", "attempt": true, "result": {}}',
        '{"name": "x", "attempt": 0, "result": {}}',
        '{"name": 7, "attempt": 1, "result": {}}',
        '{"name": "x", "attempt": 1}',
        '["x", 1, {}]',
    ],
)
def test_a_results_line_resweep_did_not_write_is_no_result(tmp_path: Path, line: str) -> None:
    """A hand-made or damaged line is skipped, never recorded as a result."""
    (tmp_path / "1.jsonl").write_text(line + "\n" + '{"name": "y", "attempt": 1, "result": null}\n')
    found = files.read_results(tmp_path)
    assert set(found) == {("y", 1)}
    assert found["y", 1] == files.StoredResult(None, 1, None, None)


def test_only_regular_files_are_read_as_results(tmp_path: Path) -> None:
    """A link, a FIFO or a directory among the results files is skipped: nothing is read
    through a link, and a reader never blocks."""
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text('{"name": "foreign", "attempt": 1, "result": {}}\n')
    results = tmp_path / "results"
    results.mkdir()
    (results / "1.jsonl").symlink_to(elsewhere)
    os.mkfifo(results / "2.jsonl")
    (results / "3.jsonl").mkdir()
    (results / "4.jsonl").write_text('{"name": "own", "attempt": 1, "result": {}}\n')
    assert set(files.read_results(results)) == {("own", 1)}
    (tmp_path / "linked").symlink_to(results, target_is_directory=True)
    assert files.read_results(tmp_path / "linked") == {}


def test_an_attempt_written_twice_reads_as_its_latest(tmp_path: Path) -> None:
    """A pool that broke may run an attempt again: the later end time counts, in any file."""
    first, second = files.ResultLog(tmp_path / "a"), files.ResultLog(tmp_path / "b")
    second.append("x", files.StoredResult({"v": "late"}, 1, "2026-01-01T00:00:02", 0.1))
    first.append("x", files.StoredResult({"v": "early"}, 1, "2026-01-01T00:00:01", 0.1))
    first.close()
    second.close()
    os.rename(tmp_path / "b" / os.listdir(tmp_path / "b")[0], tmp_path / "a" / "2.jsonl")
    index = files.ResultsIndex(tmp_path / "a").refresh()
    assert index["x", 1].result == {"v": "late"}


def test_the_index_reads_only_what_was_added(tmp_path: Path) -> None:
    """refresh() takes in new lines, including one whose end was not written at first."""
    kept = files.ResultLog(tmp_path)
    kept.append("a", files.StoredResult({}, 1, None, None))
    index = files.ResultsIndex(tmp_path).refresh()
    (path,) = tmp_path.iterdir()
    whole = path.read_bytes()
    kept.append("b", files.StoredResult({}, 1, None, None))
    line = path.read_bytes()[len(whole) :]
    path.write_bytes(whole + line[:-3])  # b's line as a reader may see it mid-write
    assert set(index.refresh()) == {("a", 1)}
    path.write_bytes(whole + line)
    assert set(index.refresh()) == {("a", 1), ("b", 1)}
    kept.close()


def test_a_results_write_that_fails_leaves_no_cut_line(tmp_path: Path) -> None:
    """A write refused part way (a file size limit here) is cut back: the next line reads."""
    import resource

    kept = files.ResultLog(tmp_path)
    kept.append("small", files.StoredResult({"ok": 1}, 1, None, None))
    (path,) = tmp_path.iterdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, hard))
    try:
        with pytest.raises(OSError):
            kept.append("big", files.StoredResult({"blob": "x" * 1000}, 1, None, None))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    kept.append("after", files.StoredResult({"ok": 2}, 1, None, None))
    kept.close()
    assert set(files.read_results(tmp_path)) == {("small", 1), ("after", 1)}
    assert path.read_bytes().count(b"\n") == 2


def test_an_earlier_versions_result_file_still_reads(tmp_path: Path) -> None:
    """result.yaml as earlier versions wrote it, per done config, is read for recovery."""
    shutil.copy(DATA / "result_v1.yaml", tmp_path / "result.yaml")
    found = files.read_result(tmp_path)
    assert found is not None
    assert same(found.result, {"loss": float("inf"), "name": "ü 🎉", "tiny": 1e-05})
    assert (found.attempt, found.duration_s, found.session) == (3, 1.5, "5e55")


def test_an_earlier_versions_result_file_cut_short_is_no_result(tmp_path: Path) -> None:
    """Its meta line gives the result line's length: a file cut by a crash is no result."""
    data = (DATA / "result_v1.yaml").read_bytes()
    for cut in range(len(data)):
        (tmp_path / "result.yaml").write_bytes(data[:cut])
        assert files.read_result(tmp_path) is None, data[:cut]


def test_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    """While one run holds the directory, another is refused with its host and pid."""
    target = Store(tmp_path)
    target.ensure_dir()
    with target.lock() as info:
        assert info.pid == os.getpid()
        active = target.active_run()
        assert active is not None and active.pid == os.getpid()
        holder = rf"pid {os.getpid()} on host {socket.gethostname()}"
        with pytest.raises(LockedError, match=holder), Store(tmp_path).lock():
            pass
    assert target.active_run() is None
    with Store(tmp_path).lock():
        pass


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    """An atomic write replaces the file and leaves no temporary file behind."""
    path = tmp_path / "f.json"
    durable.write_atomic(path, json.dumps({"v": 1}))
    durable.write_atomic(path, json.dumps({"v": 2}))
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_read_one_gives_the_same_record_as_a_full_read(tmp_path: Path) -> None:
    """show reads one line of a large state; the record equals the full reader's."""
    target = store.Store(tmp_path)
    state = statefile.State(name="big")
    for i in range(500):
        state.configs[f"c{i}"] = {"params": {"i": i, "x": 1e-05}, "status": "done", "attempts": 1}
    target.save(state)
    one = target.read_one("c321")
    assert list(one.configs) == ["c321"]
    assert one.configs["c321"] == target.read().configs["c321"]
    assert one.name == "big"


def test_a_line_break_beside_a_nan_stays_on_one_line(tmp_path: Path) -> None:
    """A result with a NaN and a multi-line string is one line in the journal and the state."""
    target = Store(tmp_path)
    target.ensure_dir()
    state = State(configs={"a": {"params": {}, "status": "todo", "attempts": 0}})
    target.save(state)
    fields = {"status": "done", "result": {"loss": math.nan, "output": "first\nsecond"}}
    recorder = store.StateWriter(target, state)
    recorder.update("a", fields)
    recorder.write(sync=False)
    assert target.journal_path.read_text(encoding="utf-8").count("\n") == 1
    assert same(target.read().configs["a"]["result"], fields["result"])
    recorder.compact()
    assert statefile.dump_state(state).count("\n") == 9 + 1
    assert same(target.read_one("a").configs["a"]["result"], fields["result"])
    recorder.close()


def test_a_state_cut_in_its_closing_line_is_refused(tmp_path: Path) -> None:
    """A file that ends part way through its closing line was cut short: a StateError."""
    target = store.Store(tmp_path)
    target.save(statefile.State(configs={"a": {"params": {}, "status": "todo", "attempts": 0}}))
    text = target.state_path.read_text()
    assert text.endswith("# end of state: 1 configs\n")
    target.state_path.write_text(text[: -len("configs\n")])
    with pytest.raises(StateError, match="cut short"):
        target.read()
    with pytest.raises(StateError, match="cut short"):
        target.read_one("a")


def test_garbage_after_the_closing_line_sends_show_to_the_full_reader(tmp_path: Path) -> None:
    """Lines appended after the closing line are not skipped by the one-line reader."""
    target = store.Store(tmp_path)
    target.save(statefile.State(configs={"a": {"params": {}, "status": "todo", "attempts": 0}}))
    with open(target.state_path, "a") as handle:
        handle.write("configs: [oops\n")
    with pytest.raises(StateError):
        target.read_one("a")


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/St_Johns", "Asia/Kolkata"])
def test_now_iso_reads_as_datetime_writes_it_to_the_millisecond(
    zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """now_iso formats each second once; every call still names the instant datetime names, to
    the millisecond, with the offset in force then: across daylight-saving changes, half-hour
    offsets and microseconds that round into the next second."""
    import datetime
    import random
    import time

    monkeypatch.setenv("TZ", zone)
    time.tzset()
    clock.reset()
    rng = random.Random(7)
    # 2024-03-31 01:00 UTC: Paris moves from +01:00 to +02:00.
    moments = [1711846799.9995, 1711846799.9999996, 1711846800.0004, 1711846800.5]
    moments += [rng.uniform(0, 2e9) for _ in range(2000)]
    moments += [s + 0.9999996 for s in range(1_700_000_000, 1_700_000_200)]
    try:
        for moment in moments:
            monkeypatch.setattr(time, "time", lambda moment=moment: moment)
            offset = datetime.timedelta(seconds=time.localtime(moment).tm_gmtoff)
            local = datetime.datetime.fromtimestamp(moment, datetime.timezone(offset))
            expected = datetime.datetime.fromisoformat(local.isoformat(timespec="milliseconds"))
            text = clock.now_iso()
            written = datetime.datetime.fromisoformat(text)
            assert written == expected, moment  # the same instant, to the millisecond
            in_force = time.localtime(written.timestamp()).tm_gmtoff
            assert written.utcoffset() == datetime.timedelta(seconds=in_force), moment
            assert len(text) == len(local.isoformat(timespec="milliseconds")), text
    finally:
        monkeypatch.undo()
        time.tzset()
