"""Plugins: hooks and backends from an installed package's entry points, or registered."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

import resweep
from conftest import run_script
from resweep import plugins
from resweep.errors import PluginError
from resweep.options import RunOptions
from resweep.pools.base import Returned
from resweep.pools.local import LocalPool
from resweep.worker import Task

PACKAGE = """\
import os

from resweep.pools.local import LocalPool


class Audit:
    def on_config_end(self, context, outcome):
        context.artifacts.write_json(
            outcome.name + ".json", {"status": outcome.status, "settings": dict(context.settings)}
        )


def cluster(options):
    with open(os.environ["TINY_MARK"], "a") as mark:
        mark.write(f"pool for {options.max_workers} workers\\n")
    return LocalPool("threading", options.max_workers)
"""

ENTRY_POINTS = """\
[resweep.hooks]
audit = tinyplug:Audit

[resweep.backends]
tiny-cluster = tinyplug:cluster
"""


def install_package(
    site: Path, name: str, version: str, modules: dict[str, str], entry_points: str
) -> None:
    """A package as pip leaves it: its modules and a .dist-info with METADATA and entry points."""
    site.mkdir(parents=True, exist_ok=True)
    for module, text in modules.items():
        (site / f"{module}.py").write_text(text)
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)
    (info / "RECORD").write_text("")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """tinyplug 1.0, installed into a directory that the scripts find on PYTHONPATH."""
    site = tmp_path / "site"
    install_package(site, "tinyplug", "1.0", {"tinyplug": PACKAGE}, ENTRY_POINTS)
    return site


def plugin_env(site: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "TINY_MARK": str(tmp_path / "mark.txt"),
    }


SCRIPT = """
def work(config):
    return {"double": 2 * config["i"]}

experiment = resweep.Experiment(
    function=work,
    configs=[{"i": i} for i in range(4)],
    output_dir=OUT,
    hooks=[os.environ.get("HOOK", "audit")],
    extensions={"audit": {"bucket": "b1"}},
)
"""


def test_an_installed_plugin_is_listed_and_used(
    tmp_path: Path, site: Path, write_script: Any
) -> None:
    """A pip-installed package's hook and backend are listed by `plugins`, with their
    distribution, and a run uses both by id."""
    script = write_script(SCRIPT)
    env = plugin_env(site, tmp_path)
    listed = run_script(script, "plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = [line.split() for line in listed.stdout.splitlines()]
    assert ["audit", "tinyplug:Audit", "(tinyplug", "1.0)"] in lines
    assert ["tiny-cluster", "tinyplug:cluster", "(tinyplug", "1.0)"] in lines
    assert "loky, threading, sequential, dask" in listed.stdout

    proc = run_script(script, "run", "--backend", "tiny-cluster", "--max-workers", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mark.txt").read_text() == "pool for 2 workers\n"
    written = tmp_path / "out" / "hooks" / "audit" / "i=3.json"
    assert yaml.safe_load(written.read_text()) == {"status": "done", "settings": {"bucket": "b1"}}
    state = yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text())
    (session,) = state["sessions"].values()
    assert session["backend"] == "tiny-cluster"


@pytest.mark.parametrize(
    ("args", "hook", "message"),
    [
        (["--backend", "nope"], "audit", "unknown backend 'nope'; known backends: loky, threading, "
         "sequential, dask, tiny-cluster"),
        ([], "nope", "unknown hook 'nope'; known hooks: audit, mlflow"),
        (["--dry-run"], "nope", "unknown hook 'nope'; known hooks: audit, mlflow"),
    ],
)  # fmt: skip
def test_an_unknown_id_is_one_line_listing_the_known_ones(
    tmp_path: Path, site: Path, write_script: Any, args: list[str], hook: str, message: str
) -> None:
    """An unknown backend or hook id is exit 2 and one line naming the known ids, in a dry run
    too."""
    script = write_script(SCRIPT)
    proc = run_script(script, "run", *args, env={**plugin_env(site, tmp_path), "HOOK": hook})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "out" / "experiment.yaml").exists()


def test_an_entry_point_named_like_a_builtin_backend_is_listed_as_shadowed(
    tmp_path: Path, site: Path, write_script: Any
) -> None:
    """A package's backend `loky` never replaces resweep's own: `plugins` says it is shadowed,
    and the known backends name loky once."""
    install_package(
        site,
        "shadow",
        "2.0",
        {"shadowplug": PACKAGE},
        "[resweep.backends]\nloky = shadowplug:cluster\n",
    )
    script = write_script(SCRIPT)
    env = plugin_env(site, tmp_path)
    listed = run_script(script, "plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    assert (
        "  loky  shadowplug:cluster  (shadow 2.0)  shadowed: resweep's own loky is used"
        in listed.stdout.splitlines()
    )
    proc = run_script(script, "run", "--backend", "nope", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: unknown backend 'nope'; known backends: loky, threading, sequential, dask, "
        "tiny-cluster"
    )
    proc = run_script(script, "run", "--backend", "loky", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "mark.txt").exists()  # the package's factory never ran


def test_register_hook_and_backend_at_run_time(tmp_path: Path) -> None:
    """register_hook and register_backend make ids usable in this process, like entry points."""
    made: list[int] = []
    heard: list[str] = []

    def my_pool(options: RunOptions) -> LocalPool:
        made.append(options.max_workers)
        return LocalPool("sequential", options.max_workers)

    def counting(event: str, context: resweep.HookContext, payload: Any = None) -> None:
        heard.append(event)

    resweep.register_backend("in-test-pool", my_pool)
    resweep.register_hook("in-test-hook", counting)
    ids = {
        (p.kind, p.id, p.source)
        for p in [*plugins.installed("hook"), *plugins.installed("backend")]
    }
    assert ("hook", "in-test-hook", "registered") in ids
    assert ("backend", "in-test-pool", "registered") in ids
    experiment = resweep.Experiment(
        function=lambda c: {"x": c["x"]},
        configs=[{"x": 1}, {"x": 2}],
        output_dir=tmp_path / "out",
        hooks=["in-test-hook"],
    )
    report = experiment.run(3, backend="in-test-pool", progress=False)
    assert report.done == 2 and made == [3]
    assert heard.count("on_config_end") == 2 and heard[0] == "on_run_start"


def test_a_backend_id_cannot_hide_a_builtin_one() -> None:
    with pytest.raises(PluginError, match="resweep's own"):
        resweep.register_backend("loky", lambda options: None)
    with pytest.raises(PluginError, match="short name"):
        resweep.register_hook("a b/c", lambda *a: None)


def test_a_backend_that_returns_no_pool_is_a_clear_error(tmp_path: Path) -> None:
    resweep.register_backend("not-a-pool", lambda options: object())
    experiment = resweep.Experiment(
        function=lambda c: {"x": 1}, configs=[{"x": 1}], output_dir=tmp_path / "out"
    )
    with pytest.raises(PluginError, match="lacks the Pool members start, capacity"):
        experiment.run(backend="not-a-pool", progress=False)
    assert not (tmp_path / "out" / "experiment.yaml").exists()


def test_resweeps_own_pyproject_declares_the_mlflow_hook() -> None:
    """resweep[mlflow] provides hook id mlflow through resweep's own entry point."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    points = pyproject["project"]["entry-points"]["resweep.hooks"]
    assert points == {"mlflow": "resweep.mlflow_bridge:MlflowHook"}
    assert "mlflow-skinny" in " ".join(pyproject["project"]["optional-dependencies"]["mlflow"])
    module, _, attribute = points["mlflow"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attribute))


# -- plugin backends that misbehave ------------------------------------------------------------


class StrayPool(LocalPool):
    """Hands back every outcome twice, and one for a config that does not exist."""

    def wait(self, timeout_s: float, in_flight: dict[str, Task], *, stopping: bool) -> Returned:
        returned = super().wait(timeout_s, in_flight, stopping=stopping)
        ghosts = [dataclasses.replace(o, name="ghost") for o in returned.outcomes]
        returned.outcomes = [*returned.outcomes, *returned.outcomes, *ghosts]
        return returned


def test_outcomes_for_configs_not_in_flight_are_ignored_with_one_warning(tmp_path: Path) -> None:
    """A plugin pool that hands back an outcome twice, or one for an unknown config, is warned of
    once, naming it; the run records each config once and finishes."""
    resweep.register_backend("stray", lambda options: StrayPool("threading", 2))
    experiment = resweep.Experiment(
        function=lambda c: {"x": c["x"]},
        configs=[{"x": i} for i in range(5)],
        output_dir=tmp_path / "out",
    )
    with pytest.warns(resweep.ResweepWarning) as caught:
        report = experiment.run(2, backend="stray", progress=False)
    assert (report.done, report.executed) == (5, 5)
    messages = [str(w.message) for w in caught if issubclass(w.category, resweep.ResweepWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("backend 'stray' handed back configs that are not running (")
    assert "an unknown name or an outcome given twice; ignored" in messages[0]
    state = experiment.read_state()
    assert sorted(state.configs) == [f"x={i}" for i in range(5)]
    assert {r["attempts"] for r in state.configs.values()} == {1}


BROKEN_BACKEND_SCRIPT = """
from resweep.pools.local import LocalPool


class Broken(LocalPool):
    def wait(self, timeout_s, in_flight, *, stopping):
        returned = super().wait(timeout_s, in_flight, stopping=stopping)
        if returned.outcomes:
            if os.environ["BREAK"] == "exit":
                sys.exit(0)
            raise RuntimeError("lost the cluster")
        return returned


def factory(options):
    if os.environ["BREAK"] == "factory":
        sys.exit(0)
    return Broken("threading", options.max_workers)


resweep.register_backend("broken", factory)


def work(config):
    return {"i": config["i"]}


experiment = resweep.Experiment(
    function=work, configs=[{"i": i} for i in range(6)], output_dir=OUT
)
"""


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("raise", "backend 'broken' raised in wait: RuntimeError: lost the cluster; the run "
         "stopped, state saved, details in run_failure.txt"),
        ("exit", "backend 'broken' raised in wait: SystemExit: 0; the run stopped, state saved, "
         "details in run_failure.txt"),
        ("factory", "backend 'broken' could not start a pool: SystemExit: 0"),
    ],
)  # fmt: skip
def test_a_plugin_backend_that_raises_is_one_line_naming_it(
    tmp_path: Path, write_script: Any, how: str, message: str
) -> None:
    """A plugin pool that raises (or calls sys.exit) mid-run stops the run with one line naming
    the backend, exit 2, its state saved and the traceback in run_failure.txt; a run with a
    working backend then does the rest."""
    script = write_script(BROKEN_BACKEND_SCRIPT)
    proc = run_script(script, "run", "--backend", "broken", "--noprogress", env={"BREAK": how})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {message}"
    failure = tmp_path / "out" / "run_failure.txt"
    if how == "factory":
        assert not (tmp_path / "out" / "experiment.yaml").exists()
        return
    text = failure.read_text()
    assert "run stopped by a plugin backend that raised" in text and "Traceback" in text
    state = yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text())
    assert {r["status"] for r in state["configs"].values()} <= {"done", "todo"}
    again = run_script(script, "run", "--backend", "threading", "--noprogress", env={"BREAK": ""})
    assert again.returncode == 0, again.stderr
