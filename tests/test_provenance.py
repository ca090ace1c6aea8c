"""Run sessions and code fingerprints: recorded with every run, shown, and compared by status."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import resweep
from conftest import Config, run_script, square
from resweep import files, provenance
from resweep.store import Store

MODULE = """\
import functools


def helper(x):
    return x + 1


def work(config):
    return {"y": helper(config)}


def decorate(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        return fn(*args)

    return wrapper


wrapped = decorate(work)


class Callable:
    def __call__(self, config):
        return {"y": config}
"""

SCRIPT = """\
@dataclass(frozen=True)
class Config:
    x: int


CALLS = os.path.join(os.path.dirname(OUT), "calls.txt")


def work(config: Config) -> dict:
    with open(CALLS, "a") as calls:
        calls.write(f"{config.x}\\n")
    return {"y": config.x * 1}


experiment = resweep.Experiment(
    function=work,
    configs=resweep.grid(Config, x=[0, 1, 2]),
    output_dir=OUT,
    name="provenance",
)
"""

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def load_module(path: Path, text: str) -> ModuleType:
    """Write text to path and import it under a name of its own."""
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"prov_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git(cwd: Path, *args: str) -> str:
    """Run git in a throwaway repository of the test."""
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def calls(tmp_path: Path) -> list[int]:
    """The x of every config executed so far, in the order they ran."""
    path = tmp_path / "calls.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def state(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text())
    return data


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Callable[[str, str], ModuleType]]:
    """Import module versions written to tmp_path; each gets a fresh file and name."""
    yield lambda name, text: load_module(tmp_path / f"{name}.py", text)


def test_fingerprint_is_stable_for_the_same_code(
    modules: Callable[[str, str], ModuleType],
) -> None:
    """The same source in two files gives the same fingerprint."""
    first, second = modules("a", MODULE), modules("b", MODULE)
    assert provenance.fingerprint(first.work) == provenance.fingerprint(second.work)
    assert (
        provenance.compare(provenance.fingerprint(first.work), provenance.fingerprint(second.work))
        is None
    )


def test_fingerprint_tells_function_changes_from_module_changes(
    modules: Callable[[str, str], ModuleType],
) -> None:
    """Editing the function or a helper it calls changes the function's part; editing code it
    does not call, or a comment, changes only the module part."""
    before = provenance.fingerprint(modules("v1", MODULE).work)
    function = modules("v2", MODULE.replace('{"y": helper(config)}', '{"y": helper(config) * 2}'))
    helper = modules("v3", MODULE.replace("return x + 1", "return x + 2"))
    unrelated = modules("v4", MODULE.replace('{"y": config}', '{"y": -config}') + "# note\n")
    assert provenance.compare(before, provenance.fingerprint(function.work)) == (
        provenance.FUNCTION_CHANGED
    )
    assert provenance.compare(before, provenance.fingerprint(helper.work)) == (
        provenance.FUNCTION_CHANGED
    )
    assert provenance.compare(before, provenance.fingerprint(unrelated.work)) == (
        provenance.MODULE_CHANGED
    )
    assert provenance.compare(None, before) is None
    old = provenance.code_digests(modules("v5", MODULE).work)
    assert sorted(old) == ["helper", "work"]
    assert provenance.changed_code(old, provenance.code_digests(helper.work)) == ["helper"]
    assert provenance.changed_code(old, provenance.code_digests(unrelated.work)) == []
    assert provenance.changed_code(None, old) is None


HELPERS = """\
LIMITS = {"low": 1, "high": frozenset({"a", "b", "c"})}


def scale(x):
    return x * 2


class Model:
    def predict(self, x):
        return scale(x) + LIMITS["low"]
"""

USER = """\
import os

import {helpers}
from {helpers} import Model

PREFIX = "p-"


def work(config):
    return {{"y": Model().predict(config), "tag": PREFIX + os.sep, "z": {helpers}.scale(1)}}


def unused():
    return 0
"""


def test_code_digests_follow_calls_into_other_project_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the function calls in another module of the project counts as the function: classes,
    their methods' calls, constants; the standard library and code it never calls do not."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "helpers_a.py").write_text(HELPERS, encoding="utf-8")
    user = load_module(tmp_path / "user_a.py", USER.format(helpers="helpers_a"))
    code = provenance.code_digests(user.work)
    assert sorted(code) == [
        "PREFIX",
        "helpers_a.LIMITS",
        "helpers_a.Model",
        "helpers_a.scale",
        "work",
    ]
    before = provenance.fingerprint(user.work)
    # The same code in another process gives the same digests: no hash seed in a set's order.
    program = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import user_a; "
        "from resweep import provenance; print(provenance.fingerprint(user_a.work))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert out.stdout.strip() == before
    # The helper module edited, the user's module unchanged: only the helper is named.
    (tmp_path / "helpers_a.py").write_text(HELPERS.replace("x * 2", "x * 20"), encoding="utf-8")
    monkeypatch.delitem(sys.modules, "helpers_a")
    changed = load_module(tmp_path / "user_b.py", USER.format(helpers="helpers_a"))
    assert provenance.compare(before, provenance.fingerprint(changed.work)) == (
        provenance.FUNCTION_CHANGED
    )
    assert provenance.changed_code(code, provenance.code_digests(changed.work)) == [
        "helpers_a.scale"
    ]


def test_fingerprint_sees_through_decorators_partials_and_callables(
    modules: Callable[[str, str], ModuleType],
) -> None:
    """A decorated function, a partial and a callable instance are fingerprinted by their code."""
    module = modules("wrapped", MODULE)
    plain = provenance.fingerprint(module.work)
    assert provenance.fingerprint(module.wrapped) == plain
    assert provenance.fingerprint(functools.partial(module.work)) == plain
    instance = provenance.fingerprint(module.Callable())
    assert instance != plain
    assert instance.split(".")[1] == plain.split(".")[1]


def test_fingerprint_of_code_without_source_does_not_fail() -> None:
    """A builtin has no source; its fingerprint is still a stable string."""
    assert provenance.fingerprint(len) == provenance.fingerprint(len)


def test_new_session_records_who_where_and_what(tmp_path: Path) -> None:
    """A session has start and end, host, user, pid, versions, git, backend and max_workers."""
    module = load_module(tmp_path / "nogit.py", MODULE)
    session_id, record = provenance.new_session(module.work, backend="loky", max_workers=3)
    assert len(session_id) == 12
    assert record["end_time"] is None and record["start_time"]
    assert record["pid"] == os.getpid()
    assert record["host"] and record["user"]
    assert (record["backend"], record["max_workers"]) == ("loky", 3)
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["versions"]["resweep"] == resweep.__version__
    # Imported distributions are recorded too, not only resweep's own dependencies.
    assert "pytest" in record["versions"]
    assert record["source"] == str(tmp_path / "nogit.py")
    assert record["fingerprint"] == provenance.fingerprint(module.work)
    assert record["git"] is None
    assert yaml.safe_load(json.dumps(record)) == record


@needs_git
def test_session_git_commit_and_dirty_flag(tmp_path: Path) -> None:
    """The git commit is recorded; a changed tracked file or an uncommitted source is dirty."""
    git(tmp_path, "init", "-q")
    tracked = load_module(tmp_path / "tracked.py", MODULE)
    git(tmp_path, "add", "tracked.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    head = git(tmp_path, "rev-parse", "HEAD")
    record = provenance.new_session(tracked.work, backend="sequential", max_workers=1)[1]
    assert record["git"] == {"commit": head, "dirty": False}
    untracked = load_module(tmp_path / "untracked.py", MODULE)
    record = provenance.new_session(untracked.work, backend="sequential", max_workers=1)[1]
    assert record["git"] == {"commit": head, "dirty": True}
    (tmp_path / "tracked.py").write_text(MODULE + "# edited\n")
    record = provenance.new_session(tracked.work, backend="sequential", max_workers=1)[1]
    assert record["git"] == {"commit": head, "dirty": True}


def test_changed_configs_counts_only_done_configs_with_other_code() -> None:
    """Todo, failed and unfingerprinted configs are never counted as changed."""
    a, b, x, y = "a" * 12, "b" * 12, "c" * 12, "d" * 12
    configs = {
        "same": {"status": "done", "fingerprint": f"v2:{a}.{b}"},
        "function": {"status": "done", "fingerprint": f"v2:{x}.{y}"},
        "module": {"status": "done", "fingerprint": f"v2:{a}.{y}"},
        "unknown": {"status": "done"},
        "failed": {"status": "failed", "fingerprint": f"v2:{x}.{y}"},
        "todo": {"status": "todo", "fingerprint": f"v2:{x}.{y}"},
    }
    assert provenance.changed_configs(configs, f"v2:{a}.{b}") == {
        "function": provenance.FUNCTION_CHANGED,
        "module": provenance.MODULE_CHANGED,
    }


# Fingerprints that this resweep cannot compare with its own: the first format (one digest of
# 16 hex digits), a version from a newer resweep, digests of another length, and junk.
UNKNOWN_FINGERPRINTS = [
    "0749b8ecfae8f366",
    "v9:0749b8ecfae8.f366a01b2c4d",
    "v2:0749b8ecfae8f366.f366a01b2c4d",
    "v2:0749B8ECFAE8.F366A01B2C4D",
    "v2:",
    "v3:0749b8ecfae8.f366a01b2c4d",
    "v2:0749b8ecfae8.f366a01b2c4d.0749b8ecfae8",
    "",
    42,
    ["0749b8ecfae8", "f366a01b2c4d"],
]


@pytest.mark.parametrize("recorded", UNKNOWN_FINGERPRINTS, ids=repr)
def test_a_fingerprint_in_an_older_or_unknown_format_reads_as_unknown(
    recorded: Any, modules: Callable[[str, str], ModuleType]
) -> None:
    """A fingerprint in an older or unknown format cannot be compared and is never "changed"."""
    current = provenance.fingerprint(modules("now", MODULE).work)
    assert not provenance.comparable(recorded)
    assert provenance.compare(recorded, current) is None
    configs = {"old": {"status": "done", "fingerprint": recorded}}
    assert provenance.changed_configs(configs, current) == {}


def test_the_current_format_is_versioned_and_round_trips_through_the_state(
    tmp_path: Path,
) -> None:
    """A fingerprint written to the state file reads back equal and comparable, as v3."""
    experiment = resweep.Experiment(
        function=square, configs=resweep.grid(Config, model=["a"], lr=[0.1]), output_dir=tmp_path
    )
    experiment.run(backend="sequential", progress=False)
    current = provenance.fingerprint(square)
    assert current.startswith(f"v{provenance.FINGERPRINT_VERSION}:")
    assert len(current) == len("v3:") + 3 * provenance.DIGEST_HEX_DIGITS + 2
    (record,) = Store(tmp_path).read().configs.values()
    (as_yaml,) = yaml.safe_load((tmp_path / "experiment.yaml").read_text())["configs"].values()
    assert record["fingerprint"] == as_yaml["fingerprint"] == current
    assert provenance.comparable(current)
    assert provenance.compare(record["fingerprint"], current) is None
    assert provenance.changed_configs({"x": record}, current) == {}


def test_an_unversioned_fingerprint_compares_as_version_1(
    modules: Callable[[str, str], ModuleType],
) -> None:
    """The unversioned "<function>.<module>" form written before versions still compares, by
    the function's own source: an edit to a helper it calls reads as a module change there."""
    current = provenance.fingerprint(modules("v1", MODULE).work)
    function = provenance.fingerprint(
        modules("v2", MODULE.replace('{"y": helper(config)}', '{"y": helper(config) * 2}')).work
    )
    helper = provenance.fingerprint(
        modules("v3", MODULE.replace("return x + 1", "return x + 2")).work
    )

    def unversioned(fingerprint: str) -> str:
        return ".".join(fingerprint.partition(":")[2].split(".")[:2])

    def version_2(fingerprint: str) -> str:
        return f"v2:{unversioned(fingerprint)}"

    assert provenance.comparable(unversioned(current))
    assert provenance.compare(unversioned(current), current) is None
    assert provenance.compare(unversioned(function), current) == provenance.FUNCTION_CHANGED
    assert provenance.compare(unversioned(helper), current) == provenance.MODULE_CHANGED
    assert provenance.compare(version_2(current), current) is None
    assert provenance.compare(version_2(function), current) == provenance.FUNCTION_CHANGED
    configs = {
        "same": {"status": "done", "fingerprint": unversioned(current)},
        "function": {"status": "done", "fingerprint": unversioned(function)},
    }
    assert provenance.changed_configs(configs, current) == {"function": provenance.FUNCTION_CHANGED}


def test_describe_session_of_a_missing_session() -> None:
    """A record pointing at no known session says so instead of failing."""
    assert "missing" in provenance.describe_session("abc", {})["note"]
    assert provenance.describe_session(None, {})["session"] is None


@needs_git
def test_show_prints_the_session_that_produced_a_config(
    tmp_path: Path, write_script: Callable[[str], Path]
) -> None:
    """`show NAME` prints host, user, pid, versions, git commit, backend, workers and code match."""
    script = write_script(SCRIPT)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "exp.py")
    git(tmp_path, "commit", "-q", "-m", "experiment")
    head = git(tmp_path, "rev-parse", "HEAD")
    proc = run_script(script, "run", "--max-workers", "2", "--progress=False")
    assert proc.returncode == 0, proc.stderr
    data = state(tmp_path)
    ((session_id, session),) = data["sessions"].items()
    assert session["end_time"] >= session["start_time"]
    assert session["pid"] != os.getpid()
    assert (session["backend"], session["max_workers"]) == ("loky", 2)
    assert session["git"] == {"commit": head, "dirty": False}
    record = data["configs"]["x=1"]
    assert record["session"] == session_id
    assert record["fingerprint"] == session["fingerprint"]

    shown = run_script(script, "show", "x=1")
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    assert printed["provenance"] == {
        "session": session_id,
        **{k: session[k] for k in ("start_time", "end_time", "host", "user", "pid")},
        "git_commit": head,
        "git_dirty": False,
        "backend": "loky",
        "max_workers": 2,
        "source": str(script),
        "versions": session["versions"],
    }
    assert printed["provenance"]["versions"]["resweep"] == resweep.__version__
    assert printed["code"] == "matches the current code"


def test_status_detects_a_changed_function_and_rerun_changed_reruns_exactly_those(
    tmp_path: Path, write_script: Callable[[str], Path]
) -> None:
    """After an edit to the function, status counts the stale configs and --rerun-changed redoes them."""
    script = write_script(SCRIPT)
    args = ("--backend", "sequential", "--progress=False")
    assert run_script(script, "run", *args).returncode == 0
    assert calls(tmp_path) == [0, 1, 2]
    assert "warning" not in run_script(script, "status").stdout

    # New code for the function, and one more config that the new code produces.
    text = script.read_text()
    text = text.replace("config.x * 1", "config.x * 2").replace("x=[0, 1, 2]", "x=[0, 1, 2, 3]")
    script.write_text(text)
    assert run_script(script, "run", *args).returncode == 0
    assert calls(tmp_path) == [0, 1, 2, 3]
    new_record = state(tmp_path)["configs"]["x=3"]

    status = run_script(script, "status")
    assert "warning: 3 done configs were produced before changes to work;" in status.stdout
    assert "run --rerun-changed" in status.stdout
    payload = json.loads(run_script(script, "status", "--json").stdout)
    assert payload["changed"] == payload["function_changed"] == 3
    assert payload["changed_code"] == ["work"] and "--rerun-changed" in payload["warnings"][0]
    shown = yaml.safe_load(run_script(script, "show", "x=0").stdout)
    assert shown["code"] == f"differs, {provenance.FUNCTION_CHANGED} (work)"

    dry = run_script(script, "run", "--dry-run", "--rerun-changed")
    assert [line.split() for line in dry.stdout.splitlines()[1:]] == [
        ["changed", "x=0"], ["changed", "x=1"], ["changed", "x=2"],
    ]  # fmt: skip

    assert run_script(script, "run", "--rerun-changed", *args).returncode == 0
    assert calls(tmp_path) == [0, 1, 2, 3, 0, 1, 2]
    data = state(tmp_path)
    assert [data["configs"][f"x={x}"]["result"]["y"] for x in range(4)] == [0, 2, 4, 6]
    assert data["configs"]["x=3"] == new_record
    assert len(data["sessions"]) == 3
    assert "warning" not in run_script(script, "status").stdout

    # A change elsewhere in the module (a grid shrunk, a comment) is one quiet line, no warning,
    # and --rerun-changed leaves those configs alone.
    script.write_text(
        script.read_text() + "\n\ndef unused():  # a helper nothing calls\n    pass\n"
    )
    status = run_script(script, "status")
    assert "warning" not in status.stdout
    assert status.stdout.splitlines()[-1] == (
        "4 done configs were produced before edits elsewhere in the function's module; "
        "the function and the code it calls are unchanged, so they count as current"
    )
    payload = json.loads(run_script(script, "status", "--json").stdout)
    assert (payload["changed"], payload["function_changed"], payload["warnings"]) == (4, 0, [])
    dry = run_script(script, "run", "--dry-run", "--rerun-changed")
    assert dry.stdout.startswith("would run 0 configs")


def test_a_recovered_config_keeps_its_session_and_fingerprint(tmp_path: Path) -> None:
    """A config whose result was written but never recorded (a crash) gets both back."""
    experiment = resweep.Experiment(
        function=square, configs=resweep.grid(Config, model=["a"], lr=[0.1]), output_dir=tmp_path
    )
    experiment.run(backend="sequential", progress=False)
    store = Store(tmp_path)
    crashed = store.read()
    ((name, record),) = crashed.configs.items()
    expected = {"session": record["session"], "fingerprint": record["fingerprint"]}
    # As a worker leaves it when its run is killed before recording the result.
    kept = files.ResultLog(tmp_path / files.RESULTS_DIR)
    stored = files.StoredResult(record["result"], 1, record["end_time"], 0.1, **expected)
    kept.append(name, stored)
    kept.close()
    # Dispatch records the session; the fingerprint comes with the result.
    record.update(status="running", fingerprint=None)
    store.save(crashed)
    experiment.run(backend="sequential", progress=False)
    (record,) = store.read().configs.values()
    assert record["status"] == "done"
    assert {k: record[k] for k in expected} == expected


def test_status_show_and_rerun_changed_leave_unknown_fingerprints_alone(
    tmp_path: Path, write_script: Callable[[str], Path]
) -> None:
    """status, show and --rerun-changed count an old-format fingerprint as unknown, not changed."""
    script = write_script(SCRIPT)
    assert run_script(script, "run", "--backend", "sequential", "--progress=False").returncode == 0
    path = tmp_path / "out" / "experiment.yaml"
    current = state(tmp_path)["configs"]["x=0"]["fingerprint"]
    module = current.split(".")[1]
    # x=0: the first format, one digest; x=1: the unversioned form, from another function.
    recorded = {"x=0": "0749b8ecfae8f366", "x=1": f"{'0' * provenance.DIGEST_HEX_DIGITS}.{module}"}
    lines = path.read_text().splitlines(keepends=True)
    for index, line in enumerate(lines):
        for name, fingerprint in recorded.items():
            if line.startswith(f'  "{name}": '):
                lines[index] = line.replace(current, fingerprint)
    path.write_text("".join(lines))

    status = run_script(script, "status").stdout
    assert "warning: 1 done configs were produced by a different version" in status
    shown = yaml.safe_load(run_script(script, "show", "x=0").stdout)
    assert shown["code"] == "cannot tell, its fingerprint is in an older or unknown format"
    shown = yaml.safe_load(run_script(script, "show", "x=1").stdout)
    assert shown["code"] == f"differs, {provenance.FUNCTION_CHANGED}"
    dry = run_script(script, "run", "--dry-run", "--rerun-changed").stdout
    assert [line.split() for line in dry.splitlines()[1:]] == [["changed", "x=1"]]
