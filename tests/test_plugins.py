"""Plugins: hooks and backends from an installed package's entry points, or registered."""

from __future__ import annotations

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
from resweep.pools.local import LocalPool

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
    ],
)  # fmt: skip
def test_an_unknown_id_is_one_line_listing_the_known_ones(
    tmp_path: Path, site: Path, write_script: Any, args: list[str], hook: str, message: str
) -> None:
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
    with pytest.raises(PluginError, match="lacks the Pool methods start, capacity"):
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
