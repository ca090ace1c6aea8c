"""Shared fixtures: small configs, hostile names, and experiment scripts run as real processes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from resweep import cache

# Scripts that the tests run as processes must import the resweep under test. A relative
# PYTHONPATH (PYTHONPATH=src) would resolve against their own working directory, a tmp_path,
# and let them import whatever resweep is installed instead: make its entries absolute.
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        os.path.abspath(entry) for entry in os.environ["PYTHONPATH"].split(os.pathsep) if entry
    )

# Names a user's config_naming might return that must never touch anything outside ctx.dir.
UNSAFE_NAMES = [
    "../x",
    "..",
    ".",
    "",
    "a/b",
    "/abs",
    "a\\b",
    "a\x00b",
    "a\nb",
    "tab\there",
    " lead",
]
# Names that look alarming but are safe as directory names and must be kept exactly.
ODD_SAFE_NAMES = ["a'; echo foo", 'say "hi"', "$(rm -rf x)", "naïve-🎉", "123", "a b"]


@dataclass(frozen=True)
class Config:
    model: str
    lr: float
    seed: int = 0


def square(config: Config) -> dict[str, float]:
    """The simplest work: a pure function of the config."""
    return {"score": config.lr * 10 + config.seed}


@pytest.fixture(autouse=True)
def _close_caches() -> object:
    """Each test gets fresh cache handles, so no SQLite file outlives its tmp_path."""
    yield
    cache.close_caches()


@pytest.fixture(params=UNSAFE_NAMES, ids=repr)
def unsafe_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(params=ODD_SAFE_NAMES, ids=repr)
def odd_safe_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def weird_tmp_path(tmp_path: Path) -> Path:
    """A directory whose path has spaces, quotes, shell syntax and unicode in it."""
    path = tmp_path / "we ird" / 'a\'; echo foo $(x) "ü🎉"'
    path.mkdir(parents=True)
    return path


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[[str], Path]:
    """Write an experiment script (`exp.py`) into tmp_path; output goes to tmp_path / "out"."""

    def write(body: str, filename: str = "exp.py") -> Path:
        head = textwrap.dedent(
            """\
            from __future__ import annotations

            import os
            import sys
            import time
            from dataclasses import dataclass

            import resweep

            OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
            """
        )
        tail = "\n\nif __name__ == '__main__':\n    experiment.run_cli()\n"
        path = tmp_path / filename
        path.write_text(head + textwrap.dedent(body) + tail, encoding="utf-8")
        return path

    return write


def run_script(
    script: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python script args...` as a real process and wait for it."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=script.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        check=False,
    )


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to itself and keeps int, float, bool and -0.0 apart."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
