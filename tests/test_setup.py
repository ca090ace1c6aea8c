"""Setting resweep up: what `make demo` installs is enough, and holds no dev tool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What only the dev extra installs: `make demo` must neither need nor install any of them.
DEV_ONLY = ("pytest", "mypy", "ruff", "dask", "distributed", "hypothesis")


def _clean_env() -> dict[str, str]:
    """This process's environment without what would let the new venv see other packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quickstart_runs_with_the_runtime_dependencies_alone(tmp_path: Path) -> None:
    """A fresh venv with `pip install .` (no extras) runs the quickstart and loads its summary.

    This is what `make demo` relies on; it needs PyPI for the runtime dependencies.
    """
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(ROOT)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    work = tmp_path / "work"
    work.mkdir()
    script = ROOT / "experiments" / "quickstart.py"
    run = subprocess.run(
        [str(python), str(script), "run", "--max-workers", "2", "--noprogress"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "done 27, failed 0, todo 0" in run.stdout

    probe = f"""
import importlib.util, json, resweep
df = resweep.load_summary("results/quickstart")
print(json.dumps({{
    "resweep": resweep.__file__,
    "rows": len(df),
    "statuses": sorted(set(df["status"].astype(str))),
    "dev": [m for m in {DEV_ONLY!r} if importlib.util.find_spec(m) is not None],
}}))
"""
    out = subprocess.run(
        [str(python), "-c", probe], env=env, cwd=work, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout)
    # The installed copy, not the source tree: the package as a wheel holds all it needs.
    assert Path(seen["resweep"]).is_relative_to(venv), seen["resweep"]
    assert seen["rows"] == 27
    assert seen["statuses"] == ["done"]
    assert seen["dev"] == [], f"dev-only packages installed without the dev extra: {seen['dev']}"
