"""A fault campaign: random damage to a finished experiment, then every command must cope.

Each example copies a finished experiment directory, damages it one way (a file cut at any
byte, bytes appended, a journal line of the wrong shape, an unknown status, a hostile name, a
file swapped for a directory or a symbolic link), then runs `status`, `run` and
`force_summary` through the command line in this process. Each command either recovers (exit
0 or 1) or refuses in one line with exit 2; it never shows a traceback, and never changes a
byte of an experiment.yaml it refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resweep
from resweep import cache, cli

N_CONFIGS = 6
HOSTILE_NAMES = ["../escaped", "a/b", "", ".", "..", "-rf", "x\x00y", "é" * 130, " pad "]
# What the campaign tried, by kind of damage and by outcome: printed at the end of the session.
TRIED: Counter[str] = Counter()


@resweep.cached
def ask(x: int) -> int:
    return x + 1


def work_cached(config: dict[str, int]) -> dict[str, int]:
    return {"double": config["i"] * 2, "asked": ask(config["i"])}


def experiment(out: Path) -> resweep.Experiment:
    return resweep.Experiment(
        function=work_cached, configs=[{"i": i} for i in range(N_CONFIGS)], output_dir=out
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished experiment with a journal of later changes, a cache and a summary."""
    out = tmp_path_factory.mktemp("campaign") / "out"
    exp = experiment(out)
    exp.run(backend="sequential", progress=False)
    seq = exp.read_state().journal_seq
    # A journal on top, as a run killed after a compaction leaves one.
    lines = [
        [seq + 1, "i=1", {"status": "running", "attempts": 2}],
        [seq + 2, "i=2", {"status": "todo"}],
    ]
    (out / "journal.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


@dataclass(frozen=True)
class Damage:
    kind: str
    target: str
    at: float = 0.0
    data: bytes = b""
    name: str = ""

    def apply(self, out: Path) -> None:
        path = out / self.target
        if self.kind == "truncate" and path.is_file():
            size = path.stat().st_size
            os.truncate(path, int(size * self.at))
        elif self.kind == "append" and path.is_file():
            with open(path, "ab") as handle:
                handle.write(self.data)
        elif self.kind == "journal_shape":
            with open(out / "journal.jsonl", "ab") as handle:
                handle.write(self.data + b"\n")
        elif self.kind == "status":
            text = (out / "experiment.yaml").read_text()
            (out / "experiment.yaml").write_text(
                text.replace('"status": "done"', f'"status": {json.dumps(self.name)}', 1)
            )
        elif self.kind == "name":
            text = (out / "experiment.yaml").read_text()
            (out / "experiment.yaml").write_text(text.replace('"i=0"', json.dumps(self.name), 1))
        elif self.kind == "directory" and path.exists():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            path.mkdir()
        elif self.kind == "symlink" and path.exists():
            elsewhere = out.parent / f"elsewhere-{self.target.replace('/', '_')}"
            if path.is_dir():
                shutil.copytree(path, elsewhere, dirs_exist_ok=True)
                shutil.rmtree(path)
            else:
                shutil.copy(path, elsewhere)
                path.unlink()
            path.symlink_to(elsewhere)


TARGETS = ["experiment.yaml", "journal.jsonl", "configs", "cache", "summary.csv", "cache/cache.db"]
damages = st.one_of(
    st.builds(
        Damage,
        kind=st.just("truncate"),
        target=st.sampled_from(["experiment.yaml", "journal.jsonl", "cache/cache.db"]),
        at=st.floats(0, 1),
    ),
    st.builds(
        Damage,
        kind=st.just("append"),
        target=st.sampled_from(["experiment.yaml", "journal.jsonl"]),
        data=st.binary(min_size=1, max_size=40),
    ),
    st.builds(
        Damage,
        kind=st.just("journal_shape"),
        target=st.just("journal.jsonl"),
        data=st.sampled_from(
            [
                b'[9, "i=0", "x"]',
                b'[99, "i=0", {"status": "lost"}]',
                b'[99, ["i=0"], {}]',
                b'["99", "i=0", {}]',
                b"{}",
                b"[]",
                b"null",
                b'[99, "i=0", {"attempts": -1}]',
            ]
        ),
    ),
    st.builds(
        Damage,
        kind=st.just("status"),
        target=st.just("experiment.yaml"),
        name=st.text(max_size=12),
    ),
    st.builds(
        Damage,
        kind=st.just("name"),
        target=st.just("experiment.yaml"),
        name=st.sampled_from(HOSTILE_NAMES),
    ),
    st.builds(Damage, kind=st.just("directory"), target=st.sampled_from(TARGETS)),
    st.builds(Damage, kind=st.just("symlink"), target=st.sampled_from(TARGETS)),
)


def command(out: Path, *argv: str) -> tuple[int, str, str]:
    """Run one command line in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli.main(experiment(out), list(argv))
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, stdout.getvalue(), stderr.getvalue()


def campaign(finished: Path, damage: Damage, scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    out = scratch / "out"
    shutil.copytree(finished, out, symlinks=True)
    damage.apply(out)
    cache.close_caches()  # the last example's directory, and its cache, are gone
    for argv in (["status"], ["run", "--noprogress", "--backend", "sequential"], ["force_summary"]):
        state_path = out / "experiment.yaml"
        before = state_path.read_bytes() if state_path.is_file() else None
        code, stdout, stderr = command(out, *argv)
        TRIED[f"{damage.kind} {argv[0]} exit {code}"] += 1
        shown = f"{damage} {argv}: exit {code}\n{stdout}\n{stderr}"
        assert "Traceback" not in stdout + stderr, shown
        assert code in (0, 1, 2), shown
        if code == 2:
            assert len(stderr.strip().splitlines()) == 1, shown
            if before is not None and not state_path.is_symlink():
                assert state_path.read_bytes() == before, shown


@pytest.fixture(scope="module", autouse=True)
def report() -> object:
    yield None
    if TRIED:
        total = sum(TRIED.values())
        print(f"\nfault campaign: {total} commands on damaged directories")
        for line, n in sorted(TRIED.items()):
            print(f"  {n:4} {line}")


CAMPAIGN_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


@settings(max_examples=40, derandomize=True, **CAMPAIGN_SETTINGS)  # type: ignore[arg-type]
@given(damage=damages)
def test_every_command_recovers_or_refuses_in_one_line(
    finished: Path, tmp_path: Path, damage: Damage
) -> None:
    """After any damage, status, run and force_summary recover or exit 2 in one line."""
    campaign(finished, damage, tmp_path / "scratch")


@pytest.mark.slow
@settings(max_examples=400, **CAMPAIGN_SETTINGS)  # type: ignore[arg-type]
@given(damage=damages)
def test_every_command_recovers_or_refuses_in_one_line_at_length(
    finished: Path, tmp_path: Path, damage: Damage
) -> None:
    """The same campaign with ten times the budget and fresh random damage (make test-all)."""
    campaign(finished, damage, tmp_path / "scratch")
