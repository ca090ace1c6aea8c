"""The MLflow bridge against a real MLflow tracking store, read back through MLflow's client."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import run_script

mlflow = pytest.importorskip("mlflow")

N = 6
SCRIPT = """
SIDE = os.path.dirname(os.path.abspath(__file__))


def work(config):
    i = config["i"]
    if i == 2 and not os.environ.get("FIXED"):
        raise ValueError("two is broken")
    if i == 4 and os.environ.get("HANG"):
        open(os.path.join(SIDE, "started4"), "w").close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the test kills the run
            time.sleep(0.05)
    return {"score": i / 10, "nested": {"n": i}, "label": "text", "flag": True}


if os.environ.get("HANG_TAG"):
    # The file store writes a new run's tags one by one: hang before one until killed.
    from mlflow.store.tracking.file_store import FileStore

    set_tag = FileStore.set_tag

    def slow_set_tag(self, run_id, tag):
        if tag.key == os.environ["HANG_TAG"]:
            open(os.path.join(SIDE, "tagging"), "w").close()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # until the test kills the run
                time.sleep(0.05)
        return set_tag(self, run_id, tag)

    FileStore.set_tag = slow_set_tag


experiment = resweep.Experiment(
    function=work,
    configs=[{"i": i, "opt": {"lr": 0.1}} for i in range(6)],
    output_dir=OUT,
    name="bridge",
    hooks=[h for h in os.environ.get("HOOKS", "mlflow").split(",") if h],
)
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A file tracking store, and resweep's own entry points as pip would install them."""
    # For this process too, which reads the runs back.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    hooks = pyproject["project"]["entry-points"]["resweep.hooks"]
    info = tmp_path / "site" / "resweep_entry_points-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: resweep-entry-points\nVersion: 0\n"
    )
    (info / "entry_points.txt").write_text(
        "[resweep.hooks]\n" + "".join(f"{k} = {v}\n" for k, v in hooks.items())
    )
    return {
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        # MLflow 3 keeps the file store only on request; a database store would need SQLAlchemy.
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "PYTHONPATH": os.pathsep.join([str(info.parent), os.environ.get("PYTHONPATH", "")]),
    }


def child_runs(env: dict[str, str]) -> tuple[Any, list[Any]]:
    """The experiment's parent run and every run nested under it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("bridge")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("resweep.role") == "experiment"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == len(children) + 1
    return parent, children


def state(tmp_path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((tmp_path / "out" / "experiment.yaml").read_text())
    return loaded


def check_runs(tmp_path: Path, env: dict[str, str]) -> list[Any]:
    """Exactly one MLflow run per config, with the config's params, metrics and tags."""
    parent, children = child_runs(env)
    names = Counter(r.data.tags["resweep.config"] for r in children)
    assert names == Counter({f"i={i},opt.lr=0.1": 1 for i in range(N)})
    configs = state(tmp_path)["configs"]
    for run in children:
        name = run.data.tags["resweep.config"]
        record = configs[name]
        i = record["params"]["i"]
        assert run.data.params == {"i": str(i), "opt.lr": "0.1"}
        assert run.data.tags["mlflow.runName"] == name
        assert run.data.tags["resweep.status"] == record["status"]
        assert run.data.tags["resweep.attempts"] == str(record["attempts"])
        assert run.data.tags["resweep.session"] == record["session"]
        if record["status"] == "done":
            assert run.info.status == "FINISHED"
            assert run.data.metrics == {"score": i / 10, "nested.n": float(i)}
            assert run.data.tags["resweep.fingerprint"] == record["fingerprint"]
            assert "resweep.error" not in run.data.tags
        else:
            assert run.info.status == "FAILED"
            assert run.data.tags["resweep.error"] == "ValueError: two is broken"
            assert run.data.metrics == {}
    assert parent.data.tags["resweep.output_dir"] == str(tmp_path / "out")
    return children


def test_each_finished_config_is_one_nested_mlflow_run(
    tmp_path: Path, write_script: Any, env: dict[str, str]
) -> None:
    """A sweep logs one MLflow run per config under the experiment's parent run; running it
    again to retry the failed config updates that config's run and adds none."""
    script = write_script(SCRIPT)
    proc = run_script(script, "run", "--backend", "sequential", env=env)
    assert proc.returncode == 1, proc.stderr  # one config fails
    check_runs(tmp_path, env)
    assert (tmp_path / "out" / "hooks" / "mlflow" / "mlflow.json").exists()

    retried = run_script(script, "run", "--backend", "sequential", "--retry-failed", env=env)
    assert retried.returncode == 1, retried.stderr
    children = check_runs(tmp_path, env)
    (failed,) = [r for r in children if r.data.tags["resweep.status"] == "failed"]
    assert failed.data.tags["resweep.attempts"] == "2"


def test_an_output_dir_with_quotes_and_backslashes_is_found_again(
    tmp_path: Path, write_script: Any, env: dict[str, str]
) -> None:
    """A path holding ' or \\ is no filter-string trouble: running the sweep again finds its
    parent run and its config runs, and logs nothing twice."""
    odd = tmp_path / "it's a\\b"
    odd.mkdir()
    script = odd / "exp.py"
    shutil.copy(write_script(SCRIPT), script)
    for _ in range(2):
        proc = run_script(script, "run", "--backend", "sequential", env={**env, "FIXED": "1"})
        assert proc.returncode == 0, proc.stderr
        (odd / "out" / ".finished.json").unlink()  # the next run reads everything again
    parent, children = child_runs(env)
    assert parent.data.tags["resweep.output_dir"] == str(odd / "out")
    assert sorted(r.data.tags["resweep.config"] for r in children) == sorted(
        f"i={i},opt.lr=0.1" for i in range(N)
    )


def test_a_failed_config_that_later_succeeds_loses_its_error_tag(
    tmp_path: Path, write_script: Any, env: dict[str, str]
) -> None:
    """A config that failed, then succeeds with --retry-failed: its one MLflow run is FINISHED
    and no longer carries the error of the attempt before."""
    script = write_script(SCRIPT)
    assert run_script(script, "run", "--backend", "sequential", env=env).returncode == 1
    (failed,) = [r for r in check_runs(tmp_path, env) if r.info.status == "FAILED"]
    assert failed.data.tags["resweep.error"] == "ValueError: two is broken"

    fixed = {**env, "FIXED": "1"}
    retried = run_script(script, "run", "--backend", "sequential", "--retry-failed", env=fixed)
    assert retried.returncode == 0, retried.stderr
    children = check_runs(tmp_path, env)
    (again,) = [r for r in children if r.data.tags["resweep.config"] == "i=2,opt.lr=0.1"]
    assert again.info.run_id == failed.info.run_id
    assert again.info.status == "FINISHED"
    assert again.data.tags["resweep.attempts"] == "2"


def test_a_killed_and_resumed_sweep_logs_every_config_once(
    tmp_path: Path, write_script: Any, env: dict[str, str]
) -> None:
    """SIGKILL the run while a config runs, resume it: every config is in MLflow exactly once."""
    script = write_script(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), "run", "--noprogress"],
        cwd=tmp_path,
        env={**os.environ, **env, "HANG": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    kill_when(proc, tmp_path / "started4")
    _, before = child_runs(env)
    assert "i=4,opt.lr=0.1" not in {r.data.tags["resweep.config"] for r in before}

    resumed = run_script(script, "run", env=env)
    assert resumed.returncode == 1, resumed.stderr
    check_runs(tmp_path, env)


def test_no_tracking_store_mlflow_skinny_can_open_is_one_clear_line(
    tmp_path: Path, write_script: Any, env: dict[str, str]
) -> None:
    """With MLFLOW_TRACKING_URI unset, MLflow 3 picks a SQLite store that mlflow-skinny (no
    SQLAlchemy) cannot open: the run is refused at its start, exit 2, with one line saying
    what to set, and no config runs."""
    script = write_script(SCRIPT)
    skinny = tmp_path / "skinny"
    skinny.mkdir()
    # As in an install of mlflow-skinny: SQLAlchemy cannot be imported.
    (skinny / "sitecustomize.py").write_text("import sys\nsys.modules['sqlalchemy'] = None\n")
    unset = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, str(script), "run", "--backend", "sequential"],
        cwd=tmp_path,
        env={**unset, "PYTHONPATH": os.pathsep.join([str(skinny), env["PYTHONPATH"]])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: the mlflow hook: MLFLOW_TRACKING_URI is not set"), line
    assert "sqlite" in line and "set MLFLOW_TRACKING_URI" in line
    assert "MLFLOW_ALLOW_FILE_STORE=true" in line
    assert state(tmp_path)["configs"]["i=0,opt.lr=0.1"]["status"] == "todo"


def kill_when(proc: subprocess.Popen[bytes], marker: Path) -> None:
    """SIGKILL proc once marker exists."""
    try:
        deadline = time.monotonic() + 90
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("tag", ["mlflow.parentRunId", "resweep.config", "resweep.attempts"])
def test_a_run_killed_while_the_bridge_makes_a_config_run_leaves_no_duplicate(
    tmp_path: Path, write_script: Any, env: dict[str, str], tag: str
) -> None:
    """SIGKILL the run while MLflow writes the tags of a config's new run one by one: the
    resumed run deletes the half-made run and logs the config again, once."""
    script = write_script(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), "run", "--backend", "sequential", "--noprogress"],
        cwd=tmp_path,
        env={**os.environ, **env, "HANG_TAG": tag},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    kill_when(proc, tmp_path / "tagging")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("bridge")
    assert len(client.search_runs([experiment.experiment_id])) == 2  # the parent, one half-made

    resumed = run_script(script, "run", "--backend", "sequential", env=env)
    assert resumed.returncode == 1, resumed.stderr
    check_runs(tmp_path, env)
    again = run_script(script, "run", "--backend", "sequential", env=env)
    assert again.returncode == 1, again.stderr
    check_runs(tmp_path, env)


def test_configs_finished_without_the_bridge_are_logged_when_it_comes(
    tmp_path: Path, write_script: Any, env: dict[str, str]
) -> None:
    """A sweep run without the bridge, then run again with it: the bridge logs what it missed,
    as it does for configs a killed run finished after its last hook call."""
    script = write_script(SCRIPT)
    without = run_script(script, "run", "--backend", "sequential", env={**env, "HOOKS": ""})
    assert without.returncode == 1, without.stderr
    assert not (tmp_path / "mlruns").exists()
    assert run_script(script, "run", "--backend", "sequential", env=env).returncode == 1
    check_runs(tmp_path, env)
