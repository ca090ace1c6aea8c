"""Dying workers and timeouts: the config that dies fails alone, every other config finishes."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import resweep


@dataclass(frozen=True)
class Job:
    kind: str
    i: int = 0


def _misbehave(config: Job, ctx: resweep.Context) -> dict[str, int]:
    (ctx.dir / f"ran-{ctx.attempt}").write_text("")
    if config.kind == "segfault":
        time.sleep(0.2)
        ctypes.string_at(0)  # a real SIGSEGV in C code
    elif config.kind == "exit":
        time.sleep(0.2)
        os._exit(3)
    elif config.kind == "oom-killed":
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer sends
    elif config.kind == "memory":
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, hard))
        try:
            blob = bytearray(4 * 1024**3)  # more than the limit allows
            return {"i": len(blob)}
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    elif config.kind == "sleep":
        time.sleep(60)
    elif config.kind == "c-sleep":
        ctypes.CDLL(None).sleep(60)  # blocked in C, not in Python
    time.sleep(0.1)
    return {"i": config.i}


def _run(tmp_path: Path, bad: list[str], *, max_workers: int, timeout_s: float | None = None):
    configs = [Job("ok", i) for i in range(6)] + [Job(kind) for kind in bad]
    configs += [Job("ok", i) for i in range(6, 10)]
    experiment = resweep.Experiment(
        function=_misbehave, configs=configs, output_dir=tmp_path / "out", timeout_s=timeout_s
    )
    report = experiment.run(max_workers, progress=False)
    return experiment, experiment.read_state(), report


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("segfault", "worker died: SIGSEGV"),
        ("exit", "worker died: exit code 3"),
        ("oom-killed", "worker died: SIGKILL"),
    ],
)
def test_a_dying_worker_fails_only_its_config(tmp_path: Path, kind: str, reason: str) -> None:
    """A config that kills its worker is failed with the reason; the other ten finish."""
    _, state, report = _run(tmp_path, [kind], max_workers=2)
    assert (report.done, report.failed, report.todo) == (10, 1, 0)
    failed = {n: r for n, r in state.configs.items() if r["status"] == "failed"}
    assert list(failed) == [f"kind={kind}"]
    assert failed[f"kind={kind}"]["error"] == reason
    for name, record in state.configs.items():
        if record["status"] == "done":
            assert record["result"] == {"i": record["params"]["i"]}, name


def test_a_memory_blow_up_under_a_limit_fails_alone(tmp_path: Path) -> None:
    """An allocation over the address-space limit fails that config with MemoryError."""
    _, state, report = _run(tmp_path, ["memory"], max_workers=2)
    assert (report.done, report.failed) == (10, 1)
    assert state.configs["kind=memory"]["error"].startswith("MemoryError")


def test_several_deaths_at_once_are_told_apart(tmp_path: Path) -> None:
    """Configs in flight beside a dying one are re-run, not failed; each culprit fails alone."""
    _, state, report = _run(tmp_path, ["segfault", "exit", "oom-killed"], max_workers=3)
    assert (report.done, report.failed, report.todo) == (10, 3, 0)
    errors = {n: r["error"] for n, r in state.configs.items() if r["status"] == "failed"}
    assert errors == {
        "kind=segfault": "worker died: SIGSEGV",
        "kind=exit": "worker died: exit code 3",
        "kind=oom-killed": "worker died: SIGKILL",
    }


@pytest.mark.parametrize("kind", ["sleep", "c-sleep"])
def test_a_config_past_timeout_is_stopped(tmp_path: Path, kind: str) -> None:
    """timeout_s stops a config blocked in time.sleep or in C; it fails with reason timeout."""
    started = time.monotonic()
    _, state, report = _run(tmp_path, [kind], max_workers=2, timeout_s=1.5)
    assert (report.done, report.failed, report.todo) == (10, 1, 0)
    assert state.configs[f"kind={kind}"]["error"].startswith("timeout")
    # Stopped long before its 60 s sleep would have ended.
    assert time.monotonic() - started < 45


def test_a_timed_out_config_is_retried_when_retries_allow(tmp_path: Path) -> None:
    """A timeout counts as a failed attempt: with retries=1 the config runs twice, then fails."""
    experiment = resweep.Experiment(
        function=_misbehave,
        configs=[Job("sleep"), Job("ok", 1)],
        output_dir=tmp_path / "out",
        timeout_s=1.0,
        retries=1,
    )
    report = experiment.run(2, progress=False)
    state = experiment.read_state()
    assert (report.done, report.failed) == (1, 1)
    assert state.configs["kind=sleep"]["attempts"] == 2
    assert sorted(p.name for p in (tmp_path / "out/configs/kind=sleep").glob("ran-*")) == [
        "ran-1",
        "ran-2",
    ]
