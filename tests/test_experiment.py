"""Experiment: validation, status, configs from disk, clean_index, record, Context."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import resweep
from conftest import Config, square
from resweep.errors import ConfigError, ResweepError, UnknownConfigError
from resweep.runner import RunReport
from resweep.worker import takes_context

CONFIGS = [Config("a", 0.1), Config("b", 0.2), Config("c", 0.3)]


def make(tmp_path: Path, configs: Any = CONFIGS, **kwargs: Any) -> resweep.Experiment:
    return resweep.Experiment(
        function=square, configs=configs, output_dir=tmp_path / "out", **kwargs
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"setup": lambda: None}, "WorkerSetup"),
        ({"function": 3}, "callable"),
    ],
    ids=["retries", "timeout", "setup", "function"],
)
def test_bad_experiment_fields_are_config_errors(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    """An unusable field fails when the experiment is declared."""
    arguments: dict[str, Any] = {"function": square, "configs": CONFIGS, "output_dir": tmp_path}
    with pytest.raises(ConfigError, match=message):
        resweep.Experiment(**{**arguments, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"backend": "spark"}, "unknown backend"), ({"max_workers": 0}, "max_workers")],
)
def test_bad_run_arguments_fail_before_writing(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    """An unknown backend or zero workers is an error and creates nothing."""
    with pytest.raises(ResweepError, match=message):
        make(tmp_path).run(progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_experiment_is_keyword_only() -> None:
    """Experiment takes keyword arguments only."""
    with pytest.raises(TypeError):
        resweep.Experiment(square, CONFIGS, "out")  # type: ignore[call-arg]


def test_configs_from_a_generator_are_kept(tmp_path: Path) -> None:
    """A generator of configs is read once into a list, so it can be run twice."""
    experiment = make(tmp_path, (Config(m, 0.1) for m in "xy"))
    assert experiment.run(backend="sequential", progress=False).done == 2
    assert experiment.run(backend="sequential", progress=False).done == 2


def test_status_counts_every_status(tmp_path: Path) -> None:
    """status() counts todo, running, done and failed."""
    experiment = make(tmp_path)
    experiment.run(backend="sequential", progress=False, only="*model=a")
    assert experiment.status() == {"todo": 2, "running": 0, "done": 1, "failed": 0}


def test_relative_output_dir_resolves_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative output_dir lands under the directory the run starts from, created if missing."""
    monkeypatch.chdir(tmp_path)
    experiment = resweep.Experiment(function=square, configs=CONFIGS, output_dir="deep/er/out")
    experiment.run(backend="sequential", progress=False)
    assert (tmp_path / "deep" / "er" / "out" / "experiment.yaml").exists()
    assert (tmp_path / "deep" / "er" / "out" / "summary.csv").exists()


def test_configs_none_takes_the_configs_from_disk(tmp_path: Path) -> None:
    """configs=None runs the configs the state file holds, as dicts of their params."""
    make(tmp_path).run(backend="sequential", progress=False, only="*model=a")
    seen: list[Any] = []

    def work(config: dict[str, Any]) -> dict[str, Any]:
        seen.append(config)
        return {"score": config["lr"]}

    again = resweep.Experiment(
        function=work,
        configs=None,
        output_dir=tmp_path / "out",
    )
    report = again.run(backend="sequential", progress=False)
    assert report.executed == 2 and report.done == 3
    assert sorted(c["model"] for c in seen) == ["b", "c"]
    assert seen[0] == {"lr": 0.2, "model": "b", "seed": 0}


def test_clean_index_drops_configs_no_longer_declared(tmp_path: Path) -> None:
    """clean_index removes the state records of configs the script dropped, and names them."""
    make(tmp_path).run(backend="sequential", progress=False)
    smaller = make(tmp_path, CONFIGS[:1])
    assert smaller.clean_index() == ["lr=0.2,model=b", "lr=0.3,model=c"]
    assert list(smaller.read_state().configs) == ["lr=0.1,model=a"]
    assert smaller.clean_index() == []
    with pytest.raises(ResweepError, match="configs is None"):
        resweep.Experiment(function=square, configs=None, output_dir=tmp_path / "out").clean_index()


def test_record_of_unknown_name_suggests_close_names(tmp_path: Path) -> None:
    """Asking for a config that does not exist names close matches."""
    experiment = make(tmp_path)
    experiment.run(backend="sequential", progress=False)
    assert experiment.config_record("lr=0.1,model=a")["status"] == "done"
    with pytest.raises(UnknownConfigError, match=r"did you mean 'lr=0.1,model=a'"):
        experiment.config_record("lr=0.1,model=A")


def test_suggestions_find_the_same_fields_in_another_order(tmp_path: Path) -> None:
    """A name whose key=value pairs are in another order suggests the name that has them, first,
    even among thousands of names."""
    experiment = make(tmp_path)
    experiment.run(backend="sequential", progress=False)
    with pytest.raises(UnknownConfigError, match=r"did you mean 'lr=0.2,model=b'"):
        experiment.config_record("model=b,lr=0.2")
    with pytest.raises(UnknownConfigError, match=r"did you mean 'lr=0.3,model=c'"):
        experiment.config_record("model=c,seed=0,lr=0.3")  # and a field at its default
    many = [{"model": f"m{i}", "seed": i % 7} for i in range(3000)]
    big = resweep.Experiment(function=lambda c: None, configs=many, output_dir=tmp_path / "big")
    big.run(backend="sequential", progress=False)
    with pytest.raises(UnknownConfigError, match=r"did you mean 'model=m2024,seed=1'"):
        big.config_record("seed=1,model=m2024")


def test_context_exposes_name_config_dir_shared_attempt(tmp_path: Path) -> None:
    """ctx carries the config's name, config, directory, shared object and attempt."""
    seen: dict[str, Any] = {}

    def work(config: Config, ctx: resweep.Context) -> None:
        seen.update(
            name=ctx.name,
            config=ctx.config,
            dir=ctx.dir,
            shared=ctx.shared,
            attempt=ctx.attempt,
            exists=ctx.dir.is_dir(),
            log=ctx.log.name,
        )

    experiment = make(tmp_path, CONFIGS[:1], context={"k": 1})
    experiment.function = work
    experiment.run(backend="sequential", progress=False)
    assert seen == {
        "name": "lr=0.1,model=a",
        "config": CONFIGS[0],
        "dir": tmp_path / "out" / "configs" / "lr=0.1,model=a",
        "shared": {"k": 1},
        "attempt": 1,
        "exists": True,
        "log": "resweep.lr=0.1,model=a",
    }


def _two(a: Any, b: Any) -> None: ...
def _one(a: Any) -> None: ...
def _varargs(*args: Any) -> None: ...
def _keyword(a: Any, *, ctx: Any) -> None: ...


@pytest.mark.parametrize(
    ("function", "expected"),
    [(_two, True), (_one, False), (_varargs, True), (_keyword, False), (print, True)],
)
def test_takes_context_when_a_second_positional_parameter_exists(
    function: Any, expected: bool
) -> None:
    """ctx is passed when the function accepts a second positional argument."""
    assert takes_context(function) is expected


@pytest.mark.parametrize(
    ("report", "code"),
    [
        (RunReport(done=3, failed=0, todo=0, interrupted=0), 0),
        (RunReport(done=2, failed=1, todo=0, interrupted=0), 1),
        (RunReport(done=2, failed=0, todo=1, interrupted=0), 1),
        (RunReport(done=2, failed=0, todo=1, interrupted=1, signal="SIGINT"), 130),
        (RunReport(done=2, failed=0, todo=1, interrupted=1, signal="SIGTERM"), 143),
    ],
)
def test_run_report_exit_codes(report: RunReport, code: int) -> None:
    """0 when all done, 1 when some failed or left, 130 on Ctrl-C, 143 on SIGTERM."""
    assert report.exit_code == code


def test_a_second_run_while_one_is_active_is_refused(tmp_path: Path) -> None:
    """A run on a directory another run holds stops with a message naming that run."""
    experiment = make(tmp_path)
    experiment.run(backend="sequential", progress=False, only="*model=a")
    with (
        experiment.store.lock(),
        pytest.raises(resweep.LockedError, match=f"pid {os.getpid()}"),
    ):
        make(tmp_path).run(backend="sequential", progress=False)
    assert experiment.status()["todo"] == 2
