"""Lifecycle hooks: their events and order under every backend, fail_fast, on_error, sweep files."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

import resweep
from conftest import run_script
from resweep.errors import ConfigError, HookError, LockedError, ResweepError
from resweep.files import RUN_FAILURE_FILE
from resweep.store import Store


def note(path: Path, line: str) -> None:
    # One O_APPEND write per line: lines never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def events(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text().splitlines()] if path.exists() else []


def flaky(config: dict[str, int], ctx: resweep.Context) -> dict[str, int]:
    """i=2 fails on its first attempt only; i=3 always fails."""
    if config["i"] == 3 or (config["i"] == 2 and ctx.attempt == 1):
        raise ValueError(f"broken {config['i']}")
    return {"double": 2 * config["i"]}


class Recorder:
    """A class hook that writes every event it hears, with what it is told, to a file."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.contexts: list[resweep.HookContext] = []

    def on_run_start(self, context: resweep.HookContext) -> None:
        self.contexts.append(context)
        note(self.log, "on_run_start")

    def on_config_start(self, context: resweep.HookContext) -> None:
        self.contexts.append(context)
        note(self.log, f"on_config_start {context.config} {context.attempt}")

    def on_config_end(self, context: resweep.HookContext, outcome: resweep.ConfigOutcome) -> None:
        self.contexts.append(context)
        # After the outcome is durable: a reader of the state already sees it.
        record = Store(context.output_dir).read().configs[outcome.name]
        assert record["attempts"] > outcome.attempt or record["status"] == outcome.status
        note(self.log, f"on_config_end {context.config} {outcome.attempt} {outcome.status}")

    def on_run_end(self, context: resweep.HookContext, report: resweep.RunReport) -> None:
        self.contexts.append(context)
        note(self.log, f"on_run_end {report.done} {report.failed}")

    def on_error(self, context: resweep.HookContext, error: BaseException) -> None:
        note(self.log, f"on_error {type(error).__name__}")


def check_order(lines: list[list[str]], n: int) -> None:
    """One on_run_start first, one on_run_end last, and each config's events in their order."""
    assert lines[0] == ["on_run_start"]
    assert lines[-1] == ["on_run_end", str(n - 1), "1"]
    by_config: dict[str, list[tuple[str, ...]]] = {}
    for line in lines[1:-1]:
        assert line[0] in ("on_config_start", "on_config_end"), line
        by_config.setdefault(line[1], []).append((line[0], *line[2:]))
    expected = {
        f"i={i}": [("on_config_start", "1"), ("on_config_end", "1", "done")] for i in range(n)
    }
    expected["i=2"] = [
        ("on_config_start", "1"), ("on_config_end", "1", "todo"),
        ("on_config_start", "2"), ("on_config_end", "2", "done"),
    ]  # fmt: skip
    expected["i=3"] = [
        ("on_config_start", "1"), ("on_config_end", "1", "todo"),
        ("on_config_start", "2"), ("on_config_end", "2", "failed"),
    ]  # fmt: skip
    assert by_config == expected


# Namespaces every hook reads, not one hook's own: warned of, as no hook has their id.
@pytest.mark.filterwarnings("ignore:extensions namespace:resweep.ResweepWarning")
@pytest.mark.parametrize("backend", ["sequential", "threading", "loky", "dask"])
def test_hooks_hear_every_event_in_order_under_every_backend(tmp_path: Path, backend: str) -> None:
    """Every backend tells hooks the same events in the same order: the run's start, each
    attempt's start and end (a retried one twice), the run's end; the context says where."""
    if backend == "dask":
        pytest.importorskip("distributed")
    log = tmp_path / "events.txt"
    recorder = Recorder(log)
    function_log = tmp_path / "function.txt"

    def function_hook(event: str, context: resweep.HookContext, payload: Any = None) -> None:
        note(function_log, f"{event} {context.config}")

    experiment = resweep.Experiment(
        function=flaky,
        configs=[{"i": i} for i in range(6)],
        output_dir=tmp_path / "out",
        name="order",
        retries=1,
        hooks=[recorder, function_hook],
        extensions={"team": {"channel": "#sweeps"}},
    )
    report = experiment.run(2, backend=backend, progress=False)
    assert (report.done, report.failed) == (5, 1)
    check_order(events(log), 6)
    # The function hook heard the same events, in the same order.
    assert [line[0] for line in events(function_log)] == [line[0] for line in events(log)]

    state = experiment.read_state()
    (session,) = state.sessions
    for context in recorder.contexts:
        assert context.session == session
        assert context.experiment == "order"
        assert context.output_dir == (tmp_path / "out").absolute()
        assert (context.backend, context.max_workers) == (backend, 2)
        assert context.extensions == {"team": {"channel": "#sweeps"}}
        assert context.fingerprint == state.configs["i=0"]["fingerprint"]
    ends = [c for c in recorder.contexts if c.config is not None]
    assert {c.config for c in ends} == {f"i={i}" for i in range(6)}
    assert all(c.params == {"i": int(c.config[2:])} for c in ends if c.config)
    # Every end says which worker ran the config: host:pid (and thread for threads).
    finished = [c for c in ends if c.worker is not None]
    assert len(finished) >= 8
    if backend == "loky":
        assert all(not c.worker.endswith(f":{os.getpid()}") for c in finished if c.worker)
    if backend == "dask":
        assert all(c.worker.startswith("tcp://") for c in finished if c.worker)


def test_a_run_with_nothing_to_run_still_starts_and_ends(tmp_path: Path) -> None:
    """Running a finished sweep again tells hooks the run started and ended, and nothing else."""
    log = tmp_path / "events.txt"
    experiment = resweep.Experiment(
        function=flaky, configs=[{"i": 0}], output_dir=tmp_path / "out", hooks=[Recorder(log)]
    )
    experiment.run(backend="sequential", progress=False)
    log.unlink()
    experiment.run(backend="sequential", progress=False)
    assert events(log) == [["on_run_start"], ["on_run_end", "1", "0"]]


def test_hook_with_fail_fast_stops_the_run_cleanly(tmp_path: Path, write_script: Any) -> None:
    """A hook that raises (fail_fast, the default) stops the run: nothing new starts, the state
    is saved, run_failure.txt says why, and the command exits 1 with one line."""
    script = write_script(
        """
        def work(config):
            return {"i": config["i"]}

        class Picky:
            def on_config_end(self, context, outcome):
                if os.environ.get("PICKY") and context.config == "i=1":
                    raise RuntimeError("cannot accept " + context.config)

        experiment = resweep.Experiment(
            function=work, configs=[{"i": i} for i in range(20)], output_dir=OUT, hooks=[Picky]
        )
        """
    )
    proc = run_script(script, "run", "--backend", "sequential", env={"PICKY": "1"})
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "hook '__main__.Picky' raised in on_config_end for config 'i=1'" in errors[0]
    assert "RuntimeError: cannot accept i=1" in errors[0]
    failure = (tmp_path / "out" / RUN_FAILURE_FILE).read_text()
    assert "run stopped by a hook that raised" in failure
    assert "RuntimeError: cannot accept i=1" in failure and "Traceback" in failure
    statuses = {
        n: r["status"]
        for n, r in yaml.safe_load((tmp_path / "out/experiment.yaml").read_text())[
            "configs"
        ].items()
    }
    assert statuses["i=0"] == statuses["i=1"] == "done"
    assert "running" not in statuses.values() and "todo" in statuses.values()
    # The next run, with a hook that accepts, does the rest.
    again = run_script(script, "run", "--backend", "sequential")
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "out" / RUN_FAILURE_FILE).exists()


def test_hook_without_fail_fast_is_logged_once_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With hooks_fail_fast=False a raising hook is logged once with its identifiers, its
    repeats counted, and every config still runs."""

    def grumpy(event: str, context: resweep.HookContext, payload: Any = None) -> None:
        if event == "on_config_end":
            raise KeyError(context.config)

    experiment = resweep.Experiment(
        function=flaky,
        configs=[{"i": i} for i in (0, 1, 4)],
        output_dir=tmp_path / "out",
        hooks=[grumpy],
        hooks_fail_fast=False,
    )
    with caplog.at_level(logging.WARNING, logger="resweep.hooks"):
        report = experiment.run(backend="threading", progress=False)
    assert report.done == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "resweep.hooks"]
    assert len(messages) == 2, messages
    assert "raised in on_config_end for config 'i=" in messages[0]
    assert "(attempt 1), session " in messages[0] and "KeyError" in messages[0]
    assert ".grumpy' raised" in messages[0] and "the run goes on" in messages[0]
    assert "raised 2 more times in on_config_end" in messages[1]


def test_a_hook_raising_in_on_error_is_logged_truly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises in on_error (fail_fast on) is logged as raising while the run was
    already stopping, not as a run that goes on; the run's own error is what ends it."""

    def clumsy(event: str, context: resweep.HookContext, payload: Any = None) -> None:
        if event == "on_error":
            raise OSError("cannot reach the chat server")

    def broken_setup() -> None:
        raise RuntimeError("no GPU")

    experiment = resweep.Experiment(
        function=flaky,
        configs=[{"i": 0}],
        output_dir=tmp_path / "out",
        setup=resweep.WorkerSetup(common=broken_setup),
        hooks=[clumsy],
    )
    with (
        caplog.at_level(logging.WARNING, logger="resweep.hooks"),
        pytest.raises(RuntimeError, match="no GPU"),
    ):
        experiment.run(backend="sequential", progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "resweep.hooks"]
    assert len(messages) == 1, messages
    assert "raised in on_error" in messages[0] and "cannot reach the chat server" in messages[0]
    assert "the run was already stopping" in messages[0]
    assert "goes on" not in messages[0] and "fail_fast is off" not in messages[0]


HOOK_IDS_SCRIPT = """
SIDE = os.path.dirname(os.path.abspath(__file__))


class Notify:
    def on_run_start(self, context):
        with open(os.path.join(SIDE, "ids.txt"), "a") as f:
            f.write(f"{context.hook} {dict(context.settings)}\\n")


experiment = resweep.Experiment(
    function=lambda config: {"ok": 1},
    configs=[{"i": 0}],
    output_dir=OUT,
    hooks=[Notify(), lambda event, context, payload=None: None, Notify()],
    extensions={"__main__.Notify": {"channel": "#ml"}, "Notify": {"channel": "#lost"}},
)
"""


def test_hooks_defined_in_a_script_have_main_ids(tmp_path: Path, write_script: Any) -> None:
    """A hook defined in the script run is __main__.<name> (a lambda __main__.<lambda>), a
    second instance of a class gets -2; extensions reach it under that id, and a namespace no hook has is warned of."""
    script = write_script(HOOK_IDS_SCRIPT)
    proc = run_script(script, "run", "--backend", "sequential")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ids.txt").read_text().splitlines() == [
        "__main__.Notify {'channel': '#ml'}",
        "__main__.Notify-2 {}",
    ]
    warned = [line for line in proc.stderr.splitlines() if "extensions namespace" in line]
    assert len(warned) == 1, proc.stderr
    assert "'Notify' is no hook's id" in warned[0]
    assert "__main__.Notify, __main__.<lambda>, __main__.Notify-2" in warned[0]


def test_on_error_hears_of_a_run_that_could_not_start(tmp_path: Path) -> None:
    """on_error fires for a failure before the first config: a lock held by another run, a
    set-up that raises; on_run_start and on_run_end never do."""
    log = tmp_path / "events.txt"

    def broken_setup() -> None:
        raise RuntimeError("no GPU")

    experiment = resweep.Experiment(
        function=flaky, configs=[{"i": 0}], output_dir=tmp_path / "out", hooks=[Recorder(log)]
    )
    experiment.store.ensure_dir()
    with experiment.store.lock(), pytest.raises(LockedError):
        experiment.run(backend="sequential", progress=False)
    assert events(log) == [["on_error", "LockedError"]]
    log.unlink()

    experiment.setup = resweep.WorkerSetup(common=broken_setup)
    with pytest.raises(RuntimeError, match="no GPU"):
        experiment.run(backend="sequential", progress=False)
    assert events(log) == [["on_error", "RuntimeError"]]
    assert experiment.status()["todo"] == 1


def test_on_run_start_raising_stops_before_any_config(tmp_path: Path) -> None:
    """A hook that refuses the run at its start (fail_fast) runs no config and says so."""

    class Gate:
        def on_run_start(self, context: resweep.HookContext) -> None:
            raise PermissionError("sweeps are frozen")

    experiment = resweep.Experiment(
        function=flaky, configs=[{"i": 0}, {"i": 1}], output_dir=tmp_path / "out", hooks=[Gate()]
    )
    with pytest.raises(HookError, match=r"raised in on_run_start.*sweeps are frozen"):
        experiment.run(backend="threading", progress=False)
    assert experiment.status() == {"todo": 2, "running": 0, "done": 0, "failed": 0}
    assert (tmp_path / "out" / RUN_FAILURE_FILE).exists()


def test_replay_fires_no_hooks_unless_asked_to(tmp_path: Path) -> None:
    """Replaying configs tells hooks nothing, since it changes no outcome; replay(hooks=True)
    tells them, as a run whose backend is "replay"."""
    log = tmp_path / "events.txt"
    recorder = Recorder(log)
    experiment = resweep.Experiment(
        function=flaky,
        configs=[{"i": 0}, {"i": 3}],
        output_dir=tmp_path / "out",
        hooks=[recorder],
    )
    experiment.run(backend="sequential", progress=False)
    before = log.read_text()
    experiment.replay("i=0")
    experiment.replay(failed=True)
    assert log.read_text() == before

    log.unlink()
    recorder.contexts.clear()
    replays = experiment.replay(failed=True, hooks=True)
    assert isinstance(replays, list) and len(replays) == 2
    assert events(log) == [
        ["on_run_start"],
        ["on_config_start", "i=0", "1"], ["on_config_end", "i=0", "1", "done"],
        ["on_config_start", "i=3", "1"], ["on_config_end", "i=3", "1", "failed"],
        ["on_run_end", "1", "1"],
    ]  # fmt: skip
    assert {(c.backend, c.session) for c in recorder.contexts} == {("replay", None)}
    log.unlink()
    with pytest.raises(ValueError, match="broken 3"):
        experiment.replay("i=3", hooks=True)
    assert events(log)[-1] == ["on_error", "ValueError"]


class Misnamed:
    """A hook class whose only method is a typo of on_run_end."""

    def on_run_finish(self, context: resweep.HookContext, report: resweep.RunReport) -> None:
        raise AssertionError("never an event")


class CalledHook:
    """A class whose instances are function hooks: it defines __call__ and no event."""

    heard: ClassVar[list[str]] = []

    def __call__(self, event: str, context: resweep.HookContext, payload: Any = None) -> None:
        self.heard.append(event)


def test_bad_hooks_are_refused_before_anything_runs(tmp_path: Path) -> None:
    """An unknown id, a path that does not import, an object that is no hook, or a class with no
    event method (a typo): one clear error before the state is touched."""
    for hooks, message in (
        (["no-such-hook"], "unknown hook 'no-such-hook'; known hooks:"),
        (["no_such_module.Hook"], "cannot import no_such_module"),
        ([42], "is not a hook: give a class with on_"),
        ([Misnamed], r"class Misnamed defines no event method \(on_run_finish is no event\); "
         "define any of on_run_start, on_config_start, on_config_end, on_run_end, on_error"),
    ):  # fmt: skip
        experiment = resweep.Experiment(
            function=flaky, configs=[{"i": 0}], output_dir=tmp_path / "out", hooks=hooks
        )
        with pytest.raises(ResweepError, match=message):
            experiment.run(backend="sequential", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_class_with_no_event_is_refused_in_one_line(tmp_path: Path, write_script: Any) -> None:
    """A hook class with only a misspelt event is exit 2 and one line naming it; a class whose
    instances are callable is a function hook."""
    script = write_script(
        """
        class Notify:
            def on_run_finish(self, context, report):
                pass

        experiment = resweep.Experiment(
            function=lambda c: c, configs=[{"i": 0}], output_dir=OUT, hooks=[Notify]
        )
        """
    )
    proc = run_script(script, "run", "--backend", "sequential")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: hook '__main__.Notify': class Notify defines no event method (on_run_finish is "
        "no event); define any of on_run_start, on_config_start, on_config_end, on_run_end, "
        "on_error"
    )
    assert not (tmp_path / "out" / "experiment.yaml").exists()

    CalledHook.heard.clear()
    experiment = resweep.Experiment(
        function=flaky, configs=[{"i": 0}], output_dir=tmp_path / "called", hooks=[CalledHook]
    )
    experiment.run(backend="sequential", progress=False)
    assert CalledHook.heard[0] == "on_run_start" and CalledHook.heard[-1] == "on_run_end"


FAIL_FAST_SCRIPT = """
SIDE = os.path.dirname(os.path.abspath(__file__))
STOP = os.path.join(OUT, ".workers", "stop")


def wait_for(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def work(config):
    if config["i"] == 0:
        open(os.path.join(SIDE, "started0"), "w").close()
        wait_for(STOP)  # still running when the failure stops the run
        return {"i": 0}
    if config["i"] == 1:
        wait_for(os.path.join(SIDE, "started0"))
        raise ValueError("fails for good")
    return {"i": config["i"]}


def heard(event, context, payload=None):
    with open(os.path.join(SIDE, "events.txt"), "a") as f:
        f.write(f"{event} {context.config}\\n")


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(10)], output_dir=OUT, hooks=[heard]
)
"""


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_fail_fast_with_configs_in_flight(tmp_path: Path, write_script: Any, backend: str) -> None:
    """run --fail-fast: a config fails for good while another runs; the running one finishes
    and is recorded, nothing new starts, the rest stays todo with no attempt used."""
    script = write_script(FAIL_FAST_SCRIPT)
    proc = run_script(
        script, "run", "--fail-fast", "--max-workers", "2", "--backend", backend, "--noprogress"
    )
    assert proc.returncode == 1, proc.stderr
    configs = yaml.safe_load((tmp_path / "out/experiment.yaml").read_text())["configs"]
    assert configs["i=0"]["status"] == "done" and configs["i=0"]["result"] == {"i": 0}
    assert configs["i=1"]["status"] == "failed"
    assert {configs[f"i={i}"]["status"] for i in range(2, 10)} == {"todo"}
    assert {configs[f"i={i}"]["attempts"] for i in range(2, 10)} == {0}
    heard = (tmp_path / "events.txt").read_text().splitlines()
    assert "on_config_end i=0" in heard and "on_config_end i=1" in heard
    assert not [line for line in heard if line.startswith("on_config_start i=") and
                int(line.rsplit("=", 1)[1]) >= 2]  # fmt: skip
    assert heard[-1] == "on_run_end None"


def quick(config: dict[str, int]) -> dict[str, int]:
    time.sleep(0.01)  # fast enough that the Dask pool sends configs in batches
    return {"i": config["i"]}


def test_a_hook_that_stops_a_dask_run_hears_only_configs_that_ran(tmp_path: Path) -> None:
    """On Dask, configs travel in batches; a hook that stops the run (fail_fast) while a batch
    runs hears on_config_start only for configs that really started, each with its
    on_config_end, never for the rest of the batch, which stays todo with no attempt used."""
    pytest.importorskip("distributed")
    starts: list[str] = []
    ends: list[str] = []

    class Picky:
        def on_config_start(self, context: resweep.HookContext) -> None:
            assert context.config is not None
            starts.append(context.config)

        def on_config_end(
            self, context: resweep.HookContext, outcome: resweep.ConfigOutcome
        ) -> None:
            ends.append(outcome.name)
            # Raise while several configs are heard started: a batch is out, or at the 60th end.
            if len(set(starts) - set(ends)) >= 3 or len(ends) == 60:
                raise RuntimeError("stop the sweep")

    experiment = resweep.Experiment(
        function=quick,
        configs=[{"i": i} for i in range(400)],
        output_dir=tmp_path / "out",
        hooks=[Picky()],
    )
    with pytest.raises(HookError, match="stop the sweep"):
        experiment.run(1, backend="dask", progress=False)
    configs = experiment.read_state().configs
    assert len(starts) == len(set(starts)) and sorted(starts) == sorted(ends)
    assert all(configs[name]["attempts"] == 1 for name in starts)
    assert {configs[name]["status"] for name in starts} == {"done"}
    assert all(r["attempts"] == 0 for n, r in configs.items() if n not in set(starts))
    assert len(starts) < 400


def first_fails(config: dict[str, int], ctx: resweep.Context) -> dict[str, int]:
    time.sleep(0.05)  # slow enough that the Dask pool sends each config alone
    if config["i"] == 0 and ctx.attempt == 1:
        raise ValueError("first attempt")
    return {"i": config["i"]}


def test_a_dask_retry_is_heard_to_start_only_when_it_starts(tmp_path: Path) -> None:
    """On Dask, a retried config queued behind others is not said to start while it waits: a
    hook that stops the run when it hears the retry start also hears it end."""
    pytest.importorskip("distributed")
    heard: list[tuple[str, str | None, int | None]] = []

    class StopAtRetry:
        def on_config_start(self, context: resweep.HookContext) -> None:
            heard.append(("start", context.config, context.attempt))
            if context.attempt == 2:
                raise RuntimeError("stop at the retry")

        def on_config_end(
            self, context: resweep.HookContext, outcome: resweep.ConfigOutcome
        ) -> None:
            heard.append(("end", outcome.name, outcome.attempt))

    experiment = resweep.Experiment(
        function=first_fails,
        configs=[{"i": i} for i in range(20)],
        output_dir=tmp_path / "out",
        retries=1,
        hooks=[StopAtRetry()],
    )
    with pytest.raises(HookError, match="stop at the retry"):
        experiment.run(1, backend="dask", progress=False)
    starts = [(name, attempt) for event, name, attempt in heard if event == "start"]
    ends = [(name, attempt) for event, name, attempt in heard if event == "end"]
    assert ("i=0", 2) in starts
    assert sorted(starts) == sorted(ends)
    assert experiment.read_state().configs["i=0"]["attempts"] == 2


# -- sweep files -------------------------------------------------------------------------------


SWEEP = """\
base: {model: a}
axes:
  - mode: grid
    params: {lr: [0.1, 0.01]}
hooks:
  fail_fast: false
  plugins: [test_hooks.sweep_hook]
extensions:
  notify: {channel: "#ml"}
"""

heard_from_sweep: list[tuple[str, str | None, Any]] = []


def sweep_hook(event: str, context: resweep.HookContext, payload: Any = None) -> None:
    heard_from_sweep.append((event, context.config, dict(context.extensions)))
    if event == "on_config_end":
        raise RuntimeError("logged, not fatal: the sweep file turned fail_fast off")


@pytest.mark.filterwarnings("ignore:extensions namespace:resweep.ResweepWarning")
def test_a_sweep_file_declares_hooks_and_extensions(tmp_path: Path) -> None:
    """A sweep file's hooks: (with fail_fast) and extensions: reach the experiment that takes
    its configs; the experiment's own settings come first."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    configs = resweep.load_configs(sweep)
    assert configs == [{"model": "a", "lr": 0.1}, {"model": "a", "lr": 0.01}]
    heard_from_sweep.clear()
    experiment = resweep.Experiment(
        function=lambda c: {"ok": 1},
        configs=configs,
        output_dir=tmp_path / "out",
        extensions={"mine": {"x": 1}},
    )
    report = experiment.run(backend="sequential", progress=False)
    assert report.done == 2
    assert [e for e, _, _ in heard_from_sweep] == [
        "on_run_start", "on_config_start", "on_config_end", "on_config_start", "on_config_end",
        "on_run_end",
    ]  # fmt: skip
    assert all(
        ext == {"notify": {"channel": "#ml"}, "mine": {"x": 1}} for _, _, ext in heard_from_sweep
    )
    # The experiment's own choice wins over the file's.
    strict = resweep.Experiment(
        function=lambda c: {"ok": 1},
        configs=configs,
        output_dir=tmp_path / "strict",
        hooks_fail_fast=True,
    )
    with pytest.raises(HookError):
        strict.run(backend="sequential", progress=False)


@pytest.mark.filterwarnings("ignore:extensions namespace:resweep.ResweepWarning")
def test_a_slice_of_a_sweep_file_keeps_its_hooks(tmp_path: Path) -> None:
    """load_configs(...)[:1] is a shorter sweep with the same hooks and extensions, not a
    plain list that silently drops them; one config is still a config."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    configs = resweep.load_configs(sweep)
    first = configs[:1]
    assert first == [{"model": "a", "lr": 0.1}]
    assert configs[0] == {"model": "a", "lr": 0.1}
    assert configs[::-1] == [{"model": "a", "lr": 0.01}, {"model": "a", "lr": 0.1}]
    heard_from_sweep.clear()
    experiment = resweep.Experiment(
        function=lambda c: {"ok": 1}, configs=first, output_dir=tmp_path / "out"
    )
    assert experiment.run(backend="sequential", progress=False).done == 1
    assert [e for e, _, _ in heard_from_sweep] == [
        "on_run_start", "on_config_start", "on_config_end", "on_run_end",
    ]  # fmt: skip
    assert heard_from_sweep[0][2] == {"notify": {"channel": "#ml"}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hooks: mlflow\n", "hooks must be a list"),
        ("hooks: {plugins: [a], fail_fast: maybe}\n", "fail_fast must be true or false"),
        ("hooks: {plugin: [a]}\n", "did you mean 'plugins'"),
        ("extensions: [a]\n", "extensions must be a mapping"),
    ],
)
def test_a_sweep_file_with_bad_hooks_is_a_clear_error(
    tmp_path: Path, text: str, message: str
) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {a: 1}\n" + text)
    with pytest.raises(ConfigError, match=message):
        resweep.load_configs(sweep)


# -- artifacts -------------------------------------------------------------------------------


def test_hooks_write_artifacts_atomically_under_their_own_directory(tmp_path: Path) -> None:
    """context.artifacts writes JSON and CSV under output_dir/hooks/<hook id>/, never outside."""

    class Audit:
        def on_config_end(
            self, context: resweep.HookContext, outcome: resweep.ConfigOutcome
        ) -> None:
            context.artifacts.write_json(
                f"per_config/{outcome.name}.json", {"status": outcome.status}
            )

        def on_run_end(self, context: resweep.HookContext, report: resweep.RunReport) -> None:
            context.artifacts.write_csv(
                "report.csv", [{"done": report.done, "failed": report.failed}]
            )
            with pytest.raises(ResweepError, match=r"'\.\.'"):
                context.artifacts.write_json("../escape.json", {})
            with pytest.raises(
                ResweepError,
                match=r"'/etc/x' is an absolute path; give a path relative to the hook's "
                r"directory \(.*/out/hooks/audit\)",
            ):
                context.artifacts.write_json("/etc/x", {})

    resweep.register_hook("audit", Audit)
    experiment = resweep.Experiment(
        function=flaky, configs=[{"i": 0}, {"i": 3}], output_dir=tmp_path / "out", hooks=["audit"]
    )
    experiment.run(backend="sequential", progress=False)
    root = tmp_path / "out" / "hooks" / "audit"
    assert (root / "report.csv").read_text() == "done,failed\n1,1\n"
    assert (root / "per_config" / "i=3.json").read_text() == '{\n  "status": "failed"\n}\n'
    assert sorted(p.name for p in root.iterdir()) == ["per_config", "report.csv"]
    assert not (tmp_path / "out" / "escape.json").exists()


def test_an_artifact_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """hooks/ as a symbolic link stops the run before anything is written through it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "hooks").symlink_to(elsewhere)
    experiment = resweep.Experiment(function=flaky, configs=[{"i": 0}], output_dir=tmp_path / "out")
    with pytest.raises(ResweepError, match="symbolic link"):
        experiment.run(backend="sequential", progress=False)
    writer = resweep.ArtifactWriter(tmp_path / "out", "hooks", "x")
    with pytest.raises(ResweepError, match="symbolic link"):
        writer.write_json("a.json", {})
    assert list(elsewhere.iterdir()) == []


# -- hooks that misbehave ----------------------------------------------------------------------


EXITING_SCRIPT = """
SIDE = os.path.dirname(os.path.abspath(__file__))


def work(config):
    return {"i": config["i"]}


def heard(event, context, payload=None):
    with open(os.path.join(SIDE, "events.txt"), "a") as f:
        f.write(event + "\\n")


class Quitter:
    def on_config_end(self, context, outcome):
        if context.config == "i=1":
            sys.exit(int(os.environ["EXIT_CODE"]))


experiment = resweep.Experiment(
    function=work,
    configs=[{"i": i} for i in range(4)],
    output_dir=OUT,
    hooks=[Quitter, heard],
    hooks_fail_fast=bool(os.environ.get("FAIL_FAST")),
)
"""


@pytest.mark.parametrize("code", ["0", "3"])
def test_sys_exit_in_a_hook_is_a_hook_failure(tmp_path: Path, write_script: Any, code: str) -> None:
    """sys.exit() in a hook does not end the run with its status: with fail_fast it stops the
    run like any raising hook (exit 1, one line, on_error heard); without, it is logged."""
    script = write_script(EXITING_SCRIPT)
    env = {"EXIT_CODE": code, "FAIL_FAST": "1"}
    proc = run_script(script, "run", "--backend", "sequential", "--noprogress", env=env)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "hook '__main__.Quitter' raised in on_config_end for config 'i=1'" in errors[0]
    assert "SystemExit" in errors[0] and "hooks fail_fast is on" in errors[0]
    failure = (tmp_path / "out" / RUN_FAILURE_FILE).read_text()
    assert "run stopped by a hook that raised" in failure and "SystemExit" in failure
    assert (tmp_path / "events.txt").read_text().splitlines()[-1] == "on_error"

    (tmp_path / "events.txt").unlink()
    shutil.rmtree(tmp_path / "out")
    env = {"EXIT_CODE": code, "FAIL_FAST": ""}
    proc = run_script(script, "run", "--backend", "sequential", "--noprogress", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "raised in on_config_end for config 'i=1'" in proc.stderr
    assert "SystemExit" in proc.stderr and "the run goes on" in proc.stderr
    assert (tmp_path / "events.txt").read_text().splitlines()[-1] == "on_run_end"
    assert Store(tmp_path / "out").read().counts()["done"] == 4


def test_an_artifact_name_near_the_file_name_limit_is_a_clear_error(tmp_path: Path) -> None:
    """A name whose temporary file (".name.pid.tmp") would pass 255 bytes is refused by name,
    not by an OSError; one that leaves room is written."""
    writer = resweep.ArtifactWriter(tmp_path, "hooks", "audit")
    fits = "a" * 226 + ".json"  # 231 bytes
    assert writer.write_json(fits, {"x": 1}).read_text() == '{\n  "x": 1\n}\n'
    for name in ("a" * 245 + ".json", "é" * 120 + ".json", f"sub/{'b' * 250}.csv"):
        with pytest.raises(ResweepError, match=r"is longer than 231 bytes .*give a shorter name"):
            writer.write_json(name, {"x": 1})
    assert sorted(p.name for p in (tmp_path / "hooks" / "audit").iterdir()) == [fits]


class Vandal:
    """A hook that changes everything it is handed."""

    def on_config_start(self, context: resweep.HookContext) -> None:
        assert context.params is not None
        context.params["lr"] = 12345  # type: ignore[index]
        context.settings["nested"]["x"] = "changed"
        context.extensions["team"]["channel"] = "#changed"  # type: ignore[index]

    def on_config_end(self, context: resweep.HookContext, outcome: resweep.ConfigOutcome) -> None:
        assert context.params is not None
        context.params["lr"] = 12345  # type: ignore[index]
        context.params["opt"]["momentum"] = -1  # type: ignore[index]
        outcome.result["score"] = -1
        outcome.result["curve"].append(99)


@pytest.mark.filterwarnings("ignore:extensions namespace:resweep.ResweepWarning")
def test_hooks_get_copies_and_cannot_change_the_state(tmp_path: Path) -> None:
    """A hook that changes the params, the result or the extensions it is handed changes its own
    copies: the state, summary.csv, the user's extensions and the next hook's view stay as they
    were, and the next run accepts the directory."""
    seen: list[tuple[Any, Any, Any]] = []

    def watcher(event: str, context: resweep.HookContext, payload: Any = None) -> None:
        if event == "on_config_end":
            seen.append((context.params, payload.result, context.extensions))

    extensions = {"test_hooks.Vandal": {"nested": {"x": 1}}, "team": {"channel": "#ml"}}
    configs = [{"lr": 0.1, "opt": {"momentum": 0.9}}, {"lr": 0.01, "opt": {"momentum": 0.5}}]

    def score(config: dict[str, Any]) -> dict[str, Any]:
        return {"score": config["lr"] * 10, "curve": [1, 2]}

    def experiment() -> resweep.Experiment:
        return resweep.Experiment(
            function=score,
            configs=configs,
            output_dir=tmp_path / "out",
            hooks=[Vandal, watcher],
            extensions=extensions,
        )

    first = experiment()
    assert first.run(backend="threading", progress=False).done == 2
    state = first.read_state()
    by_lr = {r["params"]["lr"]: r for r in state.configs.values()}
    assert set(by_lr) == {0.1, 0.01}
    assert by_lr[0.1]["params"]["opt"] == {"momentum": 0.9}
    assert by_lr[0.1]["result"] == {"score": 1.0, "curve": [1, 2]}
    summary = (tmp_path / "out" / "summary.csv").read_text()
    assert "12345" not in summary and "-1" not in summary and "99" not in summary
    assert extensions == {"test_hooks.Vandal": {"nested": {"x": 1}}, "team": {"channel": "#ml"}}
    for params, result, seen_extensions in seen:
        assert params["lr"] in (0.1, 0.01) and params["opt"]["momentum"] in (0.9, 0.5)
        assert result["curve"] == [1, 2] and result["score"] in (1.0, 0.1)
        assert seen_extensions == extensions
    assert experiment().run(backend="threading", progress=False).exit_code == 0


heard_once: list[str] = []


def counting_hook(event: str, context: resweep.HookContext, payload: Any = None) -> None:
    heard_once.append(f"{context.hook} {event} {dict(context.settings)}")


@pytest.mark.parametrize("own", ["counting", "test_hooks.counting_hook", counting_hook])
def test_a_hook_declared_by_the_experiment_and_its_sweep_file_runs_once(
    tmp_path: Path, own: Any
) -> None:
    """The experiment and its sweep file naming the same hook (its id or its dotted path) load
    it once, with its settings."""
    resweep.register_hook("counting", counting_hook)
    listed = own if isinstance(own, str) else "test_hooks.counting_hook"
    hook_id = own if isinstance(own, str) else "test_hooks.counting_hook"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {{a: 1}}\nhooks: [{listed}]\nextensions:\n  {hook_id}: {{level: 3}}\n")
    heard_once.clear()
    experiment = resweep.Experiment(
        function=lambda c: {"ok": 1},
        configs=resweep.load_configs(sweep),
        output_dir=tmp_path / "out",
        hooks=[own],
    )
    experiment.run(backend="sequential", progress=False)
    assert heard_once == [
        f"{hook_id} {event} {{'level': 3}}"
        for event in ("on_run_start", "on_config_start", "on_config_end", "on_run_end")
    ]


@pytest.mark.parametrize(
    "hooks", [["counting", "counting"], ["test_hooks.counting_hook", "test_hooks:counting_hook"],
              [counting_hook, counting_hook], [CalledHook, CalledHook]],
)  # fmt: skip
def test_the_same_hook_twice_in_one_list_is_refused(tmp_path: Path, hooks: list[Any]) -> None:
    """One list naming a hook twice is an error before anything runs, not a hook run twice."""
    resweep.register_hook("counting", counting_hook)
    experiment = resweep.Experiment(
        function=lambda c: {"ok": 1}, configs=[{"a": 1}], output_dir=tmp_path / "out", hooks=hooks
    )
    with pytest.raises(ConfigError, match=r"hook '.*' is declared twice in hooks; declare it once"):
        experiment.run(backend="sequential", progress=False)
    assert not (tmp_path / "out").exists()
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {a: 1}\nhooks: [counting, counting]\n")
    from_file = resweep.Experiment(
        function=lambda c: {"ok": 1},
        configs=resweep.load_configs(sweep),
        output_dir=tmp_path / "out",
    )
    with pytest.raises(ConfigError, match="'counting' is declared twice"):
        from_file.run(backend="sequential", progress=False)


def test_two_instances_of_one_class_are_two_hooks(tmp_path: Path) -> None:
    """Two instances of a hook class (say, with different settings) both run, the second with
    id <class path>-2."""
    first, second = Recorder(tmp_path / "a.txt"), Recorder(tmp_path / "b.txt")
    experiment = resweep.Experiment(
        function=flaky, configs=[{"i": 0}], output_dir=tmp_path / "out", hooks=[first, second]
    )
    experiment.run(backend="sequential", progress=False)
    assert events(tmp_path / "a.txt") == events(tmp_path / "b.txt") != []
    assert {c.hook for c in second.contexts} == {"test_hooks.Recorder-2"}


HANGING_SCRIPT = """
SIDE = os.path.dirname(os.path.abspath(__file__))


def work(config):
    return {"i": config["i"]}


class Hanging:
    def on_config_end(self, context, outcome):
        if os.environ.get("HANG"):
            open(os.path.join(SIDE, "in_hook"), "w").close()
            time.sleep(3600)  # a call that never returns

    def on_run_end(self, context, report):
        with open(os.path.join(SIDE, "run_end.txt"), "w") as f:
            f.write(f"{report.done} {report.signal}")


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(6)], output_dir=OUT, hooks=[Hanging]
)
"""


def wait_for_file(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("backend", ["loky", "threading"])
@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT", "SIGINT"]])
def test_a_hard_stop_interrupts_a_hanging_hook(
    tmp_path: Path, write_script: Any, backend: str, signals: list[str]
) -> None:
    """SIGTERM, or a second Ctrl-C, stops a run whose hook hangs, whatever the backend: the
    state is saved with nothing left running, on_run_end hears the stop, and the exit status
    says which signal it was."""
    script = write_script(HANGING_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), "run", "--backend", backend, "--max-workers", "2",
         "--noprogress"],
        cwd=tmp_path,
        env={**os.environ, "HANG": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for_file(tmp_path / "in_hook", proc)
        for number, name in enumerate(signals):
            proc.send_signal(getattr(signal, name))
            if number == 0 and len(signals) > 1:
                # The first Ctrl-C was heard: it asked the workers to start nothing more.
                wait_for_file(tmp_path / "out" / ".workers" / "stop", proc)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == (143 if signals == ["SIGTERM"] else 130), err
    assert "Traceback" not in err, err
    done, stopped_by = (tmp_path / "run_end.txt").read_text().split()
    assert stopped_by == signals[0] and int(done) >= 1
    statuses = {r["status"] for r in Store(tmp_path / "out").read().configs.values()}
    assert statuses <= {"done", "todo"} and "done" in statuses
    again = run_script(script, "run", "--backend", backend, "--noprogress")
    assert again.returncode == 0, again.stderr
