"""Runs: every backend, resume, failure isolation, logs, retries, selection, recovery."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import resweep
from conftest import Config
from resweep import files
from resweep.errors import ConfigError, SelectionError

BACKENDS = ["sequential", "threading", "loky"]
CONFIGS = [Config("a", 0.1), Config("b", 0.2), Config("c", 0.3, seed=1), Config("d", 0.4)]


def _mark_call(ctx: resweep.Context) -> None:
    """Leave one line per execution in the shared directory, whichever process runs it."""
    with open(Path(ctx.shared) / "calls.txt", "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.name} {ctx.attempt}\n")


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def evaluate(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    _mark_call(ctx)
    (ctx.dir / "artifact.txt").write_text(f"{config.model}")
    if config.model == "b":
        raise ValueError(f"bad config {config.model}\nsecond line")
    return {
        "score": config.lr * 10,
        "name": ctx.name,
        "dir": str(ctx.dir),
        "attempt": ctx.attempt,
        "pid": os.getpid(),
    }


def fine(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    _mark_call(ctx)
    return {"score": config.lr}


def flaky(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    _mark_call(ctx)
    if ctx.attempt == 1:
        raise RuntimeError("transient")
    return {"attempt": ctx.attempt}


def noisy(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    import sys

    print(f"stdout of {ctx.name}")
    print(f"stderr of {ctx.name}", file=sys.stderr)
    ctx.log.info("log record of %s", ctx.name)
    ctx.log.warning("ünïcode 🎉")
    return {"ok": True}


def unsafe_result(config: Config) -> Any:
    if config.model == "a":
        return {"fine": 1, "deep": {"inner": [1, {1, 2}]}}
    if config.model == "b":
        return [1, 2]
    if config.model == "c":
        return {"path": Path("x")}
    return {"ok": 1}


def odd_values(config: Config) -> dict[str, Any]:
    return {
        "nan": float("nan"),
        "inf": float("inf"),
        "tiny": 1e-05,
        "text": "naïve 🎉",
        "numeric_text": "1e5",
        "nested": {"list": [None, True, 2]},
    }


def setup_common() -> str:
    return f"common from {os.getpid()}"


def setup_per_worker(value: str) -> None:
    os.environ["RESWEEP_TEST_SETUP"] = f"{value} / worker {os.getpid()}"


def with_setup(config: Config) -> dict[str, Any]:
    return {"setup": os.environ.get("RESWEEP_TEST_SETUP"), "pid": os.getpid()}


def make(tmp_path: Path, function: Any = evaluate, configs: Any = None, **kwargs: Any) -> Any:
    return resweep.Experiment(
        function=function,
        configs=CONFIGS if configs is None else configs,
        output_dir=tmp_path / "out",
        context=str(tmp_path),
        **kwargs,
    )


def run(experiment: resweep.Experiment, backend: str = "sequential", **kwargs: Any) -> Any:
    return experiment.run(kwargs.pop("max_workers", 2), backend=backend, progress=False, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_runs_every_config_and_isolates_a_failure(
    tmp_path: Path, backend: str
) -> None:
    """Each backend runs all configs; the raising one is failed with its error, the rest done."""
    experiment = make(tmp_path)
    report = run(experiment, backend)
    assert (report.done, report.failed, report.todo, report.executed) == (3, 1, 0, 4)
    assert report.exit_code == 1
    state = experiment.read_state()
    failed = state.configs["lr=0.2,model=b"]
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: bad config b"
    assert failed["result"] is None
    trace = (tmp_path / "out/configs/lr=0.2,model=b/exception.txt").read_text()
    assert "Traceback" in trace and "ValueError: bad config b" in trace and "evaluate" in trace
    assert not (tmp_path / "out/configs/lr=0.2,model=b/result.yaml").exists()
    done = state.configs["lr=0.3,model=c,seed=1"]
    assert done["status"] == "done"
    assert done["attempts"] == 1
    assert done["result"]["score"] == 3.0
    assert done["result"]["name"] == "lr=0.3,model=c,seed=1"
    assert done["result"]["attempt"] == 1
    config_dir = tmp_path / "out" / "configs" / "lr=0.3,model=c,seed=1"
    assert Path(done["result"]["dir"]) == config_dir
    assert (config_dir / "artifact.txt").read_text() == "c"
    # The result is in the state, not in a file of the config's own.
    assert sorted(p.name for p in config_dir.iterdir()) == ["artifact.txt"]
    assert done["start_time"] <= done["end_time"]
    assert not (tmp_path / "out" / "summary.csv").exists()
    if backend == "loky":
        assert done["result"]["pid"] != os.getpid()
    else:
        assert done["result"]["pid"] == os.getpid()


def test_state_file_is_plain_yaml_after_a_run(tmp_path: Path) -> None:
    """experiment.yaml after a run reads with yaml.safe_load into name, configs and records."""
    experiment = make(tmp_path, name="demo", description="a test")
    run(experiment)
    data = yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text(encoding="utf-8"))
    assert data["name"] == "demo" and data["description"] == "a test"
    assert set(data["configs"]) == {
        "lr=0.1,model=a",
        "lr=0.2,model=b",
        "lr=0.3,model=c,seed=1",
        "lr=0.4,model=d",
    }
    record = data["configs"]["lr=0.1,model=a"]
    assert record["params"] == {"lr": 0.1, "model": "a", "seed": 0}
    assert {"status", "attempts", "start_time", "end_time"} <= set(record)
    assert not (tmp_path / "out" / "journal.jsonl").exists()


def test_second_run_executes_only_what_is_not_done(tmp_path: Path) -> None:
    """Running again runs nothing new: done stays done and failed waits for retry_failed."""
    experiment = make(tmp_path)
    run(experiment)
    assert len(calls(tmp_path)) == 4
    report = run(make(tmp_path))
    assert report.executed == 0
    assert (report.done, report.failed) == (3, 1)
    assert len(calls(tmp_path)) == 4


def test_growing_the_config_list_adds_only_the_new_ones(tmp_path: Path) -> None:
    """A longer config list runs only the configs that were not there before."""
    run(make(tmp_path, fine, CONFIGS[:2]))
    report = run(make(tmp_path, fine, [*CONFIGS, Config("e", 0.5)]))
    assert report.executed == 3
    assert sorted(calls(tmp_path)) == sorted(
        [
            "lr=0.1,model=a 1",
            "lr=0.2,model=b 1",
            "lr=0.3,model=c,seed=1 1",
            "lr=0.4,model=d 1",
            "lr=0.5,model=e 1",
        ]
    )
    assert report.done == 5


@dataclass(frozen=True)
class Optimizer:
    lr: float = 0.1


@dataclass(frozen=True)
class NestedV1:
    model: str
    opt: Optimizer = field(default_factory=Optimizer)


@dataclass(frozen=True)
class OptimizerV2:
    lr: float = 0.1
    momentum: float = 0.9


@dataclass(frozen=True)
class NestedV2:
    model: str
    opt: OptimizerV2 = field(default_factory=OptimizerV2)
    dropout: float = 0.0


def nested_work(config: Any, ctx: resweep.Context) -> dict[str, Any]:
    _mark_call(ctx)
    return {"lr": config.opt.lr}


def test_adding_fields_with_defaults_keeps_done_configs_done(tmp_path: Path) -> None:
    """A config class (or a nested one) that grows a defaulted field reruns nothing."""
    run(make(tmp_path, nested_work, [NestedV1("a"), NestedV1("b", Optimizer(0.5))]))
    report = run(make(tmp_path, nested_work, [NestedV2("a"), NestedV2("b", OptimizerV2(0.5))]))
    assert report.executed == 0 and report.done == 2
    params = make(tmp_path).read_state().configs["model=b,opt.lr=0.5"]["params"]
    assert params == {"dropout": 0.0, "model": "b", "opt": {"lr": 0.5, "momentum": 0.9}}


def test_a_name_whose_params_changed_is_refused(tmp_path: Path) -> None:
    """A config_naming that gives a different config an existing name is a ConfigError."""
    run(make(tmp_path, fine, [Config("a", 0.1)], config_naming=lambda c: "fixed"))
    with pytest.raises(ConfigError, match=r"lr=0\.1.*lr=0\.2"):
        run(make(tmp_path, fine, [Config("a", 0.2)], config_naming=lambda c: "fixed"))


def test_result_that_is_not_yaml_safe_fails_that_config_naming_the_key(tmp_path: Path) -> None:
    """A set, a list result or a Path fails only its config, with a message naming the key."""
    experiment = make(tmp_path, unsafe_result)
    report = run(experiment)
    assert (report.done, report.failed) == (1, 3)
    configs = experiment.read_state().configs
    assert "'deep.inner[1]'" in configs["lr=0.1,model=a"]["error"]
    assert "set" in configs["lr=0.1,model=a"]["error"]
    assert "ResultError" in configs["lr=0.1,model=a"]["error"]
    assert "returned a list" in configs["lr=0.2,model=b"]["error"]
    assert "'path'" in configs["lr=0.3,model=c,seed=1"]["error"]
    assert configs["lr=0.4,model=d"]["status"] == "done"


def test_odd_result_values_are_stored_and_read_back(tmp_path: Path) -> None:
    """NaN, infinity, tiny floats, emoji and numeric-looking strings survive the state file."""
    experiment = make(tmp_path, odd_values, CONFIGS[:1])
    assert run(experiment).done == 1
    result = experiment.read_state().configs["lr=0.1,model=a"]["result"]
    assert math.isnan(result["nan"]) and result["inf"] == math.inf
    assert result["tiny"] == 1e-05 and result["text"] == "naïve 🎉"
    assert result["numeric_text"] == "1e5" and result["nested"] == {"list": [None, True, 2]}
    loaded = yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text(encoding="utf-8"))
    assert loaded["configs"]["lr=0.1,model=a"]["result"]["numeric_text"] == "1e5"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stdout_stderr_and_ctx_log_land_in_log_txt(
    tmp_path: Path, backend: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """What a config prints or logs goes to its own log.txt, not to the terminal."""
    experiment = make(tmp_path, noisy, CONFIGS[:3])
    assert run(experiment, backend).done == 3
    for name in experiment.read_state().configs:
        text = (tmp_path / "out" / "configs" / name / "log.txt").read_text(encoding="utf-8")
        assert f"stdout of {name}\n" in text
        assert f"stderr of {name}\n" in text
        assert f"INFO log record of {name}" in text
        assert "WARNING ünïcode 🎉" in text
        assert text.count("stdout of") == 1
    out, err = capfd.readouterr()
    assert "stdout of" not in out + err and "log record" not in out + err


def test_a_silent_config_has_no_log_file(tmp_path: Path) -> None:
    """A config that prints nothing leaves no empty log.txt behind."""
    run(make(tmp_path, fine, CONFIGS[:1]))
    assert not (tmp_path / "out" / "configs" / "lr=0.1,model=a" / "log.txt").exists()


def test_retries_rerun_a_failing_config_within_one_run(tmp_path: Path) -> None:
    """With retries=1 a config that fails once is done at attempt 2; without it, failed."""
    experiment = make(tmp_path, flaky, CONFIGS[:2], retries=1)
    report = run(experiment)
    assert (report.done, report.failed, report.executed) == (2, 0, 4)
    record = experiment.read_state().configs["lr=0.1,model=a"]
    assert record["attempts"] == 2 and record["result"] == {"attempt": 2}
    assert record["error"] is None

    other = resweep.Experiment(
        function=flaky, configs=CONFIGS[:1], output_dir=tmp_path / "other", context=str(tmp_path)
    )
    report = run(other)
    assert (report.done, report.failed) == (0, 1)
    assert other.read_state().configs["lr=0.1,model=a"]["attempts"] == 1


def test_retry_failed_reruns_only_failed_configs(tmp_path: Path) -> None:
    """retry_failed runs the failed configs again, as their next attempt, and nothing else."""
    experiment = make(tmp_path, flaky, CONFIGS[:2])
    assert run(experiment).failed == 2
    assert run(make(tmp_path, flaky, CONFIGS[:3])).executed == 1  # only the new one
    report = run(make(tmp_path, flaky, CONFIGS[:3]), retry_failed=True)
    assert report.executed == 3  # two failed, and the new one that failed its first attempt
    assert report.done == 3
    assert sorted(c for c in calls(tmp_path) if c.endswith(" 2")) == [
        "lr=0.1,model=a 2",
        "lr=0.2,model=b 2",
        "lr=0.3,model=c,seed=1 2",
    ]


def test_only_runs_the_configs_matching_a_glob(tmp_path: Path) -> None:
    """only='*model=[ab]' runs two configs and leaves the others todo; a glob matching none is
    an error."""
    experiment = make(tmp_path, fine)
    report = run(experiment, only="*model=[ab]")
    assert (report.done, report.todo, report.executed) == (2, 2, 2)
    assert experiment.status() == {"todo": 2, "running": 0, "done": 2, "failed": 0}
    with pytest.raises(SelectionError, match=r"--only 'nothing\*' matches none of 4 configs"):
        run(experiment, only="nothing*")


def test_hand_edit_failed_to_todo_is_honoured(tmp_path: Path) -> None:
    """Editing a status from failed to todo in experiment.yaml makes the next run retry it."""
    experiment = make(tmp_path, flaky, CONFIGS[:2])
    run(experiment)
    path = tmp_path / "out" / "experiment.yaml"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    edited = [
        ln.replace('"status": "failed"', '"status": "todo"') if "model=a" in ln else ln
        for ln in lines
    ]
    path.write_text("".join(edited), encoding="utf-8")
    assert experiment.status()["todo"] == 1
    report = run(make(tmp_path, flaky, CONFIGS[:2]))
    assert report.executed == 1
    configs = experiment.read_state().configs
    assert configs["lr=0.1,model=a"]["status"] == "done"
    assert configs["lr=0.1,model=a"]["attempts"] == 2
    assert configs["lr=0.2,model=b"]["status"] == "failed"


def finished_then_left_running(tmp_path: Path) -> Any:
    """Two configs run to the end, then shown running, as a run that died would leave them."""
    experiment = make(tmp_path, fine, CONFIGS[:2])
    run(experiment)
    path = tmp_path / "out" / "experiment.yaml"
    path.write_text(
        path.read_text(encoding="utf-8").replace('"status": "done"', '"status": "running"'),
        encoding="utf-8",
    )
    return experiment


def test_configs_left_running_are_settled_by_the_next_run(tmp_path: Path) -> None:
    """A config left running with its result written is done; one without a result runs again."""
    experiment = finished_then_left_running(tmp_path)
    # As a worker leaves it: config a's result in its results file, config b's not.
    session = experiment.config_record("lr=0.1,model=a")["session"]
    kept = files.ResultLog(tmp_path / "out" / files.RESULTS_DIR)
    stored = files.StoredResult({"score": 0.1}, 1, "2024-01-01", 0.5, session=session)
    kept.append("lr=0.1,model=a", stored)
    # A line from another run (a file copied in) does not count, whatever it says.
    foreign = files.StoredResult({"score": 9.9}, 1, "2024-01-01", 0.5, session="0" * 12)
    kept.append("lr=0.2,model=b", foreign)
    kept.close()
    report = run(make(tmp_path, fine, CONFIGS[:2]))
    assert report.executed == 1
    assert calls(tmp_path)[-1] == "lr=0.2,model=b 2"
    configs = experiment.read_state().configs
    assert configs["lr=0.1,model=a"]["status"] == "done"
    assert configs["lr=0.1,model=a"]["attempts"] == 1
    assert configs["lr=0.1,model=a"]["result"] == {"score": 0.1}
    assert configs["lr=0.2,model=b"]["status"] == "done"


def test_a_directory_from_an_earlier_version_settles_from_its_result_files(
    tmp_path: Path,
) -> None:
    """Earlier versions kept a result.yaml per done config: one a dead run left running with
    its result.yaml written is done with that result, not run again."""
    experiment = finished_then_left_running(tmp_path)
    old = tmp_path / "out" / "configs" / "lr=0.1,model=a"
    old.mkdir(parents=True)
    result_line = '{"score": 0.75}'
    meta = f'{{"attempt": 1, "end_time": "2024-01-01", "duration_s": 1.0, "bytes": {len(result_line)}}}'
    (old / "result.yaml").write_text(f"# resweep: {meta}\n{result_line}\n", encoding="utf-8")
    report = run(make(tmp_path, fine, CONFIGS[:2]))
    assert report.executed == 1
    assert calls(tmp_path)[-1] == "lr=0.2,model=b 2"
    configs = experiment.read_state().configs
    assert configs["lr=0.1,model=a"]["result"] == {"score": 0.75}
    assert configs["lr=0.1,model=a"]["status"] == "done"


def test_result_reads_a_done_configs_result_and_refuses_any_other(tmp_path: Path) -> None:
    """experiment.result(name) is the stored result; a failed or unknown config is an error."""
    experiment = make(tmp_path)
    run(experiment)
    assert experiment.result("lr=0.1,model=a")["score"] == 1.0
    with pytest.raises(ConfigError, match="is failed, not done"):
        experiment.result("lr=0.2,model=b")
    with pytest.raises(resweep.ResweepError, match=re.escape("did you mean 'lr=0.1,model=a'")):
        experiment.result("lr=0.1,model=A")


def test_a_config_run_again_as_the_same_attempt_sheds_the_stale_traceback(
    tmp_path: Path,
) -> None:
    """A record dropped by clean_index and added again restarts at attempt 1: the traceback
    (and an earlier version's result.yaml) left by the execution before do not stay."""
    run(make(tmp_path, flaky, CONFIGS[:2]))  # both fail their first attempt
    stale = tmp_path / "out" / "configs" / "lr=0.1,model=a"
    assert (stale / "exception.txt").exists()
    (stale / "result.yaml").write_text('# resweep: {"attempt": 1, "bytes": 2}\n{}\n')
    assert make(tmp_path, flaky, CONFIGS[1:2]).clean_index() == ["lr=0.1,model=a"]
    again = make(tmp_path, fine, CONFIGS[:2])
    run(again)
    assert again.config_record("lr=0.1,model=a")["attempts"] == 1
    assert again.result("lr=0.1,model=a") == {"score": 0.1}
    assert sorted(p.name for p in stale.iterdir()) == ["log.txt"]


def quiet(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    return {"score": config.lr}


def chatty(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    if config.model == "a":
        print("printed")
    elif config.model == "b":
        ctx.log.info("logged")
    elif config.model == "c":
        (ctx.dir / "artifact.txt").write_text("kept")
    else:
        str(ctx)  # looking at ctx does not make the directory
    return {"score": config.lr}


@pytest.mark.parametrize("backend", ["sequential", "threading", "loky"])
def test_a_config_that_keeps_nothing_leaves_no_file_of_its_own(
    tmp_path: Path, backend: str
) -> None:
    """Silent, artifact-free configs cost no directory: their results are in the state, and a
    run leaves a few files of resweep's own, whatever the number of configs."""
    configs = [Config(m, i / 100) for m in "xyz" for i in range(40)]
    experiment = make(tmp_path, quiet, configs)
    assert run(experiment, backend).done == 120
    out = tmp_path / "out"
    assert list((out / "configs").iterdir()) == []
    assert len(list(out.rglob("*"))) <= 10, sorted(p.name for p in out.rglob("*"))
    assert experiment.result("lr=0.39,model=z") == {"score": 0.39}
    assert resweep.load_summary(out)["score"].sum() == pytest.approx(3 * sum(range(40)) / 100)


@pytest.mark.parametrize("backend", ["sequential", "loky"])
def test_a_config_dir_is_made_by_what_needs_it(tmp_path: Path, backend: str) -> None:
    """A print, a log record or an artifact makes the config's directory; nothing else does."""
    experiment = make(tmp_path, chatty)
    assert run(experiment, backend).done == 4
    configs = tmp_path / "out" / "configs"
    made = {p.name: sorted(f.name for f in p.iterdir()) for p in configs.iterdir()}
    assert made == {
        "lr=0.1,model=a": ["log.txt"],
        "lr=0.2,model=b": ["log.txt"],
        "lr=0.3,model=c,seed=1": ["artifact.txt"],
    }
    assert "printed" in (configs / "lr=0.1,model=a" / "log.txt").read_text()
    assert "logged" in (configs / "lr=0.2,model=b" / "log.txt").read_text()


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_worker_setup_runs_common_once_and_per_worker_in_each_process(
    tmp_path: Path, backend: str
) -> None:
    """common runs once in this process; per_worker has run in every process before its configs."""
    configs = [Config("m", i / 10) for i in range(6)]
    experiment = make(
        tmp_path,
        with_setup,
        configs,
        setup=resweep.WorkerSetup(common=setup_common, per_worker=setup_per_worker),
    )
    assert run(experiment, backend).done == 6
    results = [r["result"] for r in experiment.read_state().configs.values()]
    for result in results:
        assert result["setup"] == f"common from {os.getpid()} / worker {result['pid']}"


def plain_function(config: Config) -> None:
    assert isinstance(config, Config)


def test_function_without_ctx_and_none_result(tmp_path: Path) -> None:
    """A one-parameter function gets only the config, and a None result is a done config."""
    experiment = make(tmp_path, plain_function, CONFIGS[:1])
    assert run(experiment).done == 1
    assert experiment.read_state().configs["lr=0.1,model=a"]["result"] is None
    assert (tmp_path / "out" / "summary.csv").exists()


def test_dict_configs_run_and_keep_their_params(tmp_path: Path) -> None:
    """Plain dict configs are named and passed to the function as they were given."""
    experiment = make(tmp_path, lambda c: {"got": c["x"]}, [{"x": 1}, {"x": 1.0}, {"x": "1"}])
    assert run(experiment).done == 3
    configs = experiment.read_state().configs
    assert len(configs) == 3
    got = sorted((type(r["result"]["got"]).__name__, r["params"]["x"]) for r in configs.values())
    assert got == [("float", 1.0), ("int", 1), ("str", "1")]


@pytest.mark.parametrize("backend", ["sequential", "loky"])
def test_an_output_dir_with_a_hostile_path_works(weird_tmp_path: Path, backend: str) -> None:
    """Spaces, quotes, shell syntax and unicode in output_dir change nothing."""
    experiment = resweep.Experiment(
        function=fine,
        configs=CONFIGS,
        output_dir=weird_tmp_path / "out",
        context=str(weird_tmp_path),
    )
    assert run(experiment, backend).done == 4
    assert len(calls(weird_tmp_path)) == 4
    assert resweep.open(weird_tmp_path / "out").status()["done"] == 4
    assert len(resweep.load_summary(weird_tmp_path / "out")) == 4


def test_configs_with_nan_and_infinite_params_resume(tmp_path: Path) -> None:
    """A config whose params hold NaN or infinity is the same config on the next run."""
    configs = [{"x": float("nan")}, {"x": float("inf")}, {"x": [float("nan"), 1]}]
    first = run(make(tmp_path, lambda c: {"ok": True}, configs))
    assert first.done == 3
    again = run(make(tmp_path, lambda c: {"ok": True}, configs))
    assert (again.executed, again.done) == (0, 3)


def test_resuming_a_finished_sweep_writes_nothing(tmp_path: Path) -> None:
    """A run with nothing to do and nothing new leaves experiment.yaml untouched (fast resume)."""
    experiment = make(tmp_path, fine)
    assert run(experiment).done == len(experiment.configs)
    state = tmp_path / "out" / "experiment.yaml"
    before = (state.read_bytes(), state.stat().st_mtime_ns)
    assert run(experiment).executed == 0
    assert (state.read_bytes(), state.stat().st_mtime_ns) == before


def test_a_finished_sweep_run_again_names_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its marker vouches for the unchanged configs: no naming, no state read, no write."""
    run(make(tmp_path, fine))
    state = tmp_path / "out" / "experiment.yaml"
    before = (state.read_bytes(), state.stat().st_mtime_ns)

    def must_not_name(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished sweep was named again")

    monkeypatch.setattr("resweep.identity.name_configs", must_not_name)
    monkeypatch.setattr("resweep.store.Store.read", must_not_name)
    report = run(make(tmp_path, fine))
    assert (report.done, report.failed, report.todo, report.executed) == (4, 0, 0, 0)
    assert (state.read_bytes(), state.stat().st_mtime_ns) == before


def test_a_same_size_hand_edit_right_after_a_run_is_honoured(tmp_path: Path) -> None:
    """done -> todo keeps the file's size and may keep its mtime tick; the marker still sees it."""
    run(make(tmp_path, fine, CONFIGS[:2]))
    path = tmp_path / "out" / "experiment.yaml"
    text = path.read_text(encoding="utf-8")
    edited = "".join(
        ln.replace('"status": "done"', '"status": "todo"') if "model=a" in ln else ln
        for ln in text.splitlines(keepends=True)
    )
    assert len(edited) == len(text) and edited != text
    before = path.stat()
    with open(path, "r+", encoding="utf-8") as handle:  # in place: same inode
        handle.write(edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as if within the same tick
    report = run(make(tmp_path, fine, CONFIGS[:2]))
    assert report.executed == 1
    assert calls(tmp_path).count("lr=0.1,model=a 2") == 1


def test_a_finished_sweep_with_failures_still_retries_them(tmp_path: Path) -> None:
    """The marker of a sweep that ended with failed configs does not hide them from
    retry_failed."""
    run(make(tmp_path, flaky, CONFIGS[:2]))
    assert run(make(tmp_path, flaky, CONFIGS[:2])).executed == 0
    report = run(make(tmp_path, flaky, CONFIGS[:2]), retry_failed=True)
    assert (report.executed, report.done, report.failed) == (2, 2, 0)


def test_a_new_description_reaches_a_finished_sweeps_state(tmp_path: Path) -> None:
    """name and description are part of what the marker vouches for."""
    run(make(tmp_path, fine, description="first"))
    run(make(tmp_path, fine, description="second"))
    assert make(tmp_path, fine).read_state().description == "second"


def _config_class(seed_default: int) -> Any:
    """The same class, as edited between two runs: only the default of seed differs."""
    return make_dataclass(
        "Edited",
        [("model", str), ("lr", float), ("seed", int, field(default=seed_default))],
        frozen=True,
    )


def test_a_changed_class_default_renames_configs_of_a_finished_sweep(tmp_path: Path) -> None:
    """Equal instances under a new default have new names: the marker must not hide them."""
    old = _config_class(seed_default=0)
    run(make(tmp_path, fine, [old("a", 0.1, 0)]))
    new = _config_class(seed_default=1)
    report = run(make(tmp_path, fine, [new("a", 0.1, 0)]))
    assert report.executed == 1
    assert set(make(tmp_path, fine).read_state().configs) == {
        "lr=0.1,model=a",
        "lr=0.1,model=a,seed=0",
    }


def worker_pid(config: dict[str, int]) -> dict[str, int]:
    return {"pid": os.getpid()}


def _worker_pids(experiment: resweep.Experiment) -> set[int]:
    return {record["result"]["pid"] for record in experiment.store.read().configs.values()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_stay_for_the_next_run_unless_the_process_ends_with_this_one(
    tmp_path: Path,
) -> None:
    """In a notebook the worker pool stays warm from one run to the next; the command line,
    whose process ends with the run, lets the workers go once the last config is recorded, and
    they are gone when it returns."""
    from resweep.pools.local import pool_released_at_end

    def sweep(name: str) -> resweep.Experiment:
        configs = [{"i": i} for i in range(6)]
        return resweep.Experiment(function=worker_pid, configs=configs, output_dir=tmp_path / name)

    first, second, last, after = sweep("first"), sweep("second"), sweep("last"), sweep("after")
    first.run(2, progress=False)
    second.run(2, progress=False)
    assert _worker_pids(first) & _worker_pids(second)  # the same processes ran both
    with pool_released_at_end():
        assert last.run(2, progress=False).done == 6
    assert not any(map(_alive, _worker_pids(last)))  # gone, and reaped, when the block ends
    after.run(2, progress=False)
    assert not _worker_pids(last) & _worker_pids(after)  # the next run needed new workers


@pytest.mark.parametrize("backend", ["loky", "dask"])
def test_an_experiment_that_cannot_travel_to_workers_is_one_clear_error(
    tmp_path: Path, backend: str
) -> None:
    """A context that cannot be pickled stops a process run before any config starts."""
    import threading

    experiment = resweep.Experiment(
        function=lambda c: None,
        configs=[{"i": 1}, {"i": 2}],
        output_dir=tmp_path / "out",
        context=threading.Lock(),
    )
    with pytest.raises(resweep.ResweepError, match="cannot be sent to worker processes"):
        experiment.run(2, backend=backend, progress=False)
    assert experiment.status() == {"todo": 2, "running": 0, "done": 0, "failed": 0}
    # The threads backend shares this process: the same experiment runs there.
    assert experiment.run(2, backend="threading", progress=False).done == 2


@pytest.mark.parametrize("backend", ["loky", "dask", "threading"])
def test_a_traceback_from_a_worker_shows_the_script_s_file_line_and_source(
    tmp_path: Path, backend: str
) -> None:
    """exception.txt names the script's real path and shows its source lines on every backend,
    not the "<dynamic-code>" of a function sent by value."""
    import subprocess
    import sys

    script = tmp_path / "exp.py"
    script.write_text(
        "import resweep\n"
        "def helper(x):\n"
        "    raise ValueError('boom')\n"
        "def work(config):\n"
        "    helper(config['i'])\n"
        "experiment = resweep.Experiment(function=work, configs=[{'i': 1}], output_dir='out')\n"
        "if __name__ == '__main__':\n"
        "    experiment.run_cli()\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), "run", "--noprogress", "--backend", backend],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    trace = (tmp_path / "out" / "configs" / "i=1" / "exception.txt").read_text()
    assert f'File "{script}", line 3, in helper' in trace
    assert "raise ValueError('boom')" in trace
    assert "<dynamic-code>" not in trace


@pytest.mark.parametrize("backend", ["sequential", "threading", "loky"])
def test_fail_fast_hands_out_nothing_after_the_first_failure(tmp_path: Path, backend: str) -> None:
    """run(fail_fast=True), pytest's -x: after the first failed config nothing new starts,
    what runs finishes, the rest stays todo with no attempt used."""

    def second_fails(config: dict[str, int]) -> dict[str, int]:
        if config["i"] == 1:
            raise ValueError("broken")
        return {"i": config["i"]}

    experiment = resweep.Experiment(
        function=second_fails, configs=[{"i": i} for i in range(8)], output_dir=tmp_path / "out"
    )
    report = experiment.run(1, backend=backend, fail_fast=True, progress=False)
    assert report.failed == 1 and report.exit_code == 1
    state = experiment.read_state().configs
    assert state["i=1"]["status"] == "failed"
    assert state["i=0"]["status"] == "done"
    later = [state[f"i={i}"] for i in range(2, 8)]
    assert {r["status"] for r in later} == {"todo"}
    assert {r["attempts"] for r in later} == {0}
    # Without it, the next run takes every config that is left.
    assert experiment.run(1, backend=backend, progress=False).done == 7
