"""The Dask backend on real local clusters: results travel back, faults stay contained."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

import resweep
from resweep.store import Store

distributed = pytest.importorskip("distributed")

DASK_CLI = str(Path(sys.executable).with_name("dask"))
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2

# Every knob comes from the environment, so one script serves every test.
SCRIPT = """\
import os
import time

import resweep

HERE = os.path.dirname(os.path.abspath(__file__))
SIDE = os.environ.get("EXP_SIDE", HERE)
N = int(os.environ.get("EXP_N", "6"))
SLEEP = float(os.environ.get("EXP_SLEEP", "0.1"))
FAIL = int(os.environ.get("EXP_FAIL", "-1"))
HANG = int(os.environ.get("EXP_HANG", "-1"))
TIMEOUT = os.environ.get("EXP_TIMEOUT")


def note(kind, name):
    # One O_APPEND write per line: lines from concurrent processes never interleave.
    fd = os.open(os.path.join(SIDE, kind + ".txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, f"{name} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)


def task_key():
    from distributed import get_worker

    try:
        return get_worker().get_current_task()
    except ValueError:  # not on a Dask worker: replay
        return "none"


@resweep.cached
def ask(x):
    note("calls", x)
    return x * 10


def probe(name):
    # Held while this execution runs: a second execution that finds it held overlaps it.
    import fcntl

    os.makedirs(os.path.join(SIDE, "probes"), exist_ok=True)
    fd = os.open(os.path.join(SIDE, "probes", name), os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        note("overlaps", name)
    return fd


def work(config, ctx):
    held = probe(ctx.name)
    note("starts", ctx.name)
    note("tasks", f"{ctx.name}|{task_key()}")
    print("printed", config["i"])
    ctx.log.info("logged %s", config["i"])
    answer = ask(config["i"])
    (ctx.dir / "artifact.txt").write_text("made on a worker")
    if config["i"] == HANG:
        time.sleep(3600)
    time.sleep(SLEEP)
    if config["i"] == FAIL and ctx.attempt == 1:
        raise ValueError("boom")
    note("completions", ctx.name)
    note("dirs", str(ctx.dir))
    os.close(held)
    return {"answer": answer}


experiment = resweep.Experiment(
    function=work,
    configs=[{"i": i} for i in range(N)],
    output_dir=os.path.join(HERE, "out"),
    name="dask-test",
    timeout_s=float(TIMEOUT) if TIMEOUT else None,
)

if __name__ == "__main__":
    experiment.run_cli()
"""


def write_script(directory: Path) -> Path:
    path = directory / "exp.py"
    path.write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    return path


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RESWEEP_", "EXP_"))}
    return {**base, "PYTHONUNBUFFERED": "1", **extra}


def run(
    script: Path, *args: str, timeout: float = 120, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=script.parent,
        env=env(**extra),
        check=False,
    )


def start(script: Path, *args: str, **extra: str) -> subprocess.Popen[bytes]:
    """Start a run in its own process group, as a terminal would; output to run.out/run.err."""
    with open(script.parent / "run.out", "wb") as out, open(script.parent / "run.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=out,
            stderr=err,
            cwd=script.parent,
            env=env(**extra),
            start_new_session=True,
        )


def lines(side: Path, kind: str) -> list[tuple[str, int]]:
    """(config, pid) per line of a side-effect file."""
    path = side / f"{kind}.txt"
    if not path.exists():
        return []
    pairs = [line.rsplit(" ", 1) for line in path.read_text().splitlines()]
    return [(name, int(pid)) for name, pid in pairs]


def wait_for(predicate: Callable[[], object], timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def statuses(out: Path) -> dict[str, str]:
    """Every config's status as a new run would see it (journal applied, dead runs settled)."""
    return {name: r["status"] for name, r in Store(out).read().configs.items()}


def recorded_done(out: Path) -> int:
    """How many configs the state shows done now (none before the state file exists)."""
    with contextlib.suppress(resweep.ResweepError):
        return list(statuses(out).values()).count("done")
    return 0


def one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    shown = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(shown) == 1 and needle in shown[0], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture
def local_scheduler() -> Iterator[str]:
    """A scheduler with no workers of its own, in this process; tests add `dask worker`s."""
    cluster = distributed.LocalCluster(
        n_workers=0, dashboard_address=":0", silence_logs=logging.ERROR, processes=True
    )
    try:
        yield str(cluster.scheduler_address)
    finally:
        cluster.close()


def start_worker(
    address: str, workdir: Path, preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    """A `dask worker` process with its own working and scratch directories."""
    (workdir / "local").mkdir(parents=True, exist_ok=True)
    log = open(workdir / "worker.log", "wb")  # noqa: SIM115 (the child holds it)
    try:
        return subprocess.Popen(
            [DASK_CLI, "worker", address, "--nthreads", "1", "--nworkers", "1",
             "--local-directory", str(workdir / "local"), "--no-dashboard"],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(HOME=str(workdir)),
            preexec_fn=preexec_fn,
            start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for_workers(address: str, n: int) -> None:
    with distributed.Client(address, timeout=30) as client:
        client.wait_for_workers(n, timeout=60)


def test_local_cluster_runs_a_sweep(tmp_path: Path) -> None:
    """A LocalCluster of worker processes runs the sweep; a retry reuses the recorded calls."""
    script = write_script(tmp_path)
    proc = run(script, "run", "--backend", "dask", "--max-workers", "2", EXP_FAIL="3")
    assert proc.returncode == 1, proc.stderr
    out = tmp_path / "out"
    assert statuses(out) == {f"i={i}": "failed" if i == 3 else "done" for i in range(6)}
    state = yaml.safe_load((out / "experiment.yaml").read_text())
    assert state["configs"]["i=0"]["result"]["answer"] == 0
    assert state["configs"]["i=3"]["error"] == "ValueError: boom"
    # The coordinator wrote what the workers shipped back; the result is in the state alone.
    assert not (out / "configs/i=1/result.yaml").exists()
    assert "printed 1" in (out / "configs/i=1/log.txt").read_text()
    assert "logged 1" in (out / "configs/i=1/log.txt").read_text()
    assert "ValueError: boom" in (out / "configs/i=3/exception.txt").read_text()
    # Workers on this machine see output_dir, so ctx.dir is the real directory.
    assert str(out / "configs/i=1") in {path for path, _ in lines(tmp_path, "dirs")}
    assert (out / "configs/i=1/artifact.txt").exists()
    assert len(lines(tmp_path, "calls")) == 6

    again = run(
        script, "run", "--backend", "dask", "--max-workers", "2", "--retry-failed", "--reuse-calls"
    )
    assert again.returncode == 0, again.stderr
    record = yaml.safe_load((out / "experiment.yaml").read_text())["configs"]["i=3"]
    assert record["status"] == "done" and record["attempts"] == 2
    # The failed attempt's call travelled back and was kept as its record: --reuse-calls
    # answers the retry from it, so the retry did not pay for it again.
    assert record["cache_hits"] == 1 and record["cache_misses"] == 0
    assert len(lines(tmp_path, "calls")) == 6
    assert not (out / "configs/i=3/exception.txt").exists()
    assert (out / "summary.csv").exists()

    replay = run(script, "replay", "--config", "i=2")
    assert replay.returncode == 0, replay.stderr + replay.stdout
    assert len(lines(tmp_path, "calls")) == 6


def test_killed_worker_reruns_only_its_config(tmp_path: Path) -> None:
    """SIGKILL of one Dask worker mid-config: at the end every config is done exactly once."""
    script = write_script(tmp_path)
    proc = start(
        script, "run", "--backend", "dask", "--max-workers", "2", EXP_N="8", EXP_SLEEP="1.5"
    )
    try:
        wait_for(lambda: len(lines(tmp_path, "starts")) >= 3, what="three configs started")
        # The config that started last is far from its end: its worker dies mid-config. (A
        # moment later, not at once: a result that has not yet left a dying worker is lost
        # with it, and Dask computes that config again.)
        time.sleep(0.5)
        victim, pid = lines(tmp_path, "starts")[-1]
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=120) == 0, (tmp_path / "run.err").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert set(statuses(tmp_path / "out").values()) == {"done"}
    completions = Counter(name for name, _ in lines(tmp_path, "completions"))
    assert completions == Counter({f"i={i}": 1 for i in range(8)})
    assert Counter(name for name, _ in lines(tmp_path, "starts"))[victim] == 2


def test_fast_configs_travel_in_batches(tmp_path: Path) -> None:
    """Fast configs share Dask tasks; a worker killed mid-batch leaves each config done once."""
    script = write_script(tmp_path)
    proc = start(
        script, "run", "--backend", "dask", "--max-workers", "2", EXP_N="400", EXP_SLEEP="0.01"
    )
    try:
        wait_for(lambda: len(lines(tmp_path, "starts")) >= 120, what="120 configs started")
        victim, pid = lines(tmp_path, "starts")[-1]
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=120) == 0, (tmp_path / "run.err").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    state = Store(tmp_path / "out").read()
    assert {r["status"] for r in state.configs.values()} == {"done"}
    # A batch that died with its worker ran again as the same attempt, recorded once.
    assert {r["attempts"] for r in state.configs.values()} == {1}
    completions = Counter(name for name, _ in lines(tmp_path, "completions"))
    assert set(completions) == {f"i={i}" for i in range(400)}
    # The victim's batch ran again: the config cut off, and those after it in the batch.
    assert Counter(name for name, _ in lines(tmp_path, "starts"))[victim] == 2
    tasks = {entry.split("|")[1] for entry, _ in lines(tmp_path, "tasks")}
    assert len(tasks) < 200


def test_timeout_inside_a_batch_fails_only_that_config(tmp_path: Path) -> None:
    """A fast config that hangs in a batch times out alone; the rest of its batch is done."""
    # Config 150 of 200: dispatched once batches have grown (the first tasks carry one config).
    script = write_script(tmp_path)
    proc = run(
        script, "run", "--backend", "dask", "--max-workers", "2",
        EXP_N="200", EXP_SLEEP="0.002", EXP_HANG="150", EXP_TIMEOUT="3",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    state = yaml.safe_load((tmp_path / "out/experiment.yaml").read_text())
    hung = state["configs"].pop("i=150")
    assert hung["status"] == "failed" and hung["error"].startswith("timeout")
    assert {r["status"] for r in state["configs"].values()} == {"done"}
    assert {r["attempts"] for r in state["configs"].values()} == {1}
    # The run did send configs in batches: some Dask task ran several configs.
    runs = [entry.split("|") for entry, _ in lines(tmp_path, "tasks")]
    assert max(Counter(key for _, key in runs).values()) > 1


def test_coordinator_killed_resumes_on_a_fresh_cluster(tmp_path: Path) -> None:
    """SIGKILL of the coordinator (and its cluster) loses no finished config; a new run ends it."""
    script = write_script(tmp_path)
    args = ("run", "--backend", "dask", "--max-workers", "2")
    proc = start(script, *args, EXP_N="10", EXP_SLEEP="0.5")
    try:
        wait_for(lambda: len(lines(tmp_path, "completions")) >= 4, what="four configs done")
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    before = {name for name, status in statuses(tmp_path / "out").items() if status == "done"}
    assert before, "nothing was recorded before the kill"
    again = run(script, *args, EXP_N="10", EXP_SLEEP="0.5")
    assert again.returncode == 0, again.stderr
    assert set(statuses(tmp_path / "out").values()) == {"done"}
    completions = Counter(name for name, _ in lines(tmp_path, "completions"))
    assert all(completions[name] == 1 for name in before), completions


def _drop_file_permission_override() -> None:
    """In the worker: root without the capabilities that let it ignore file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a worker that cannot read")
def test_worker_without_the_output_dir(tmp_path: Path, local_scheduler: str) -> None:
    """A worker that cannot read output_dir still gets results, logs and calls recorded.

    The worker runs as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (a setuid to
    `nobody` cannot reach the interpreter under /root here), and output_dir has mode 000:
    the coordinator, with its capabilities, writes it; the worker cannot even look inside.
    """
    script = write_script(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o000)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    worker = start_worker(local_scheduler, workdir, _drop_file_permission_override)
    try:
        wait_for_workers(local_scheduler, 1)
        proc = run(script, "run", "--backend", "dask", "--scheduler", local_scheduler, EXP_FAIL="2")
        assert proc.returncode == 1, proc.stderr + (workdir / "worker.log").read_text()
        state = yaml.safe_load((out / "experiment.yaml").read_text())
        record = state["configs"]["i=1"]
        assert record["status"] == "done" and record["cache_misses"] == 1
        # ctx.dir was a scratch directory on the worker, under its own local directory.
        dirs = [path for path, _ in lines(tmp_path, "dirs")]
        assert dirs and all(path.startswith(str(workdir / "local")) for path in dirs)
        assert not (out / "configs/i=1/artifact.txt").exists()
        assert "printed 1" in (out / "configs/i=1/log.txt").read_text()
        assert "ValueError: boom" in (out / "configs/i=2/exception.txt").read_text()
        assert len(lines(tmp_path, "calls")) == 6

        replay = run(script, "replay", "--config", "i=1")
        assert replay.returncode == 0, replay.stderr + replay.stdout
        assert len(lines(tmp_path, "calls")) == 6
        retry = run(
            script, "run", "--backend", "dask", "--scheduler", local_scheduler,
            "--retry-failed", "--reuse-calls",
        )  # fmt: skip
        assert retry.returncode == 0, retry.stderr
        record = yaml.safe_load((out / "experiment.yaml").read_text())["configs"]["i=2"]
        # The failed attempt's call, shipped back from a worker that cannot see output_dir,
        # answers the retry: --reuse-calls pays nothing again.
        assert record["status"] == "done" and record["cache_hits"] == 1
        assert len(lines(tmp_path, "calls")) == 6
        # The run's scratch on the worker is gone once the run ends.
        assert not list((workdir / "local").rglob("resweep-*"))
    finally:
        stop(worker)
        out.chmod(0o755)


def test_timeout_restarts_the_worker(tmp_path: Path) -> None:
    """A config past timeout_s fails with reason timeout; its worker restarts, the rest finish."""
    script = write_script(tmp_path)
    started = time.monotonic()
    proc = run(
        script, "run", "--backend", "dask", "--max-workers", "2",
        EXP_HANG="1", EXP_TIMEOUT="3", EXP_N="5",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 60
    state = yaml.safe_load((tmp_path / "out/experiment.yaml").read_text())
    assert state["configs"]["i=1"]["status"] == "failed"
    assert state["configs"]["i=1"]["error"].startswith("timeout")
    assert all(state["configs"][f"i={i}"]["status"] == "done" for i in (0, 2, 3, 4))


def test_ctrl_c_drops_queued_configs_and_exits_130(tmp_path: Path) -> None:
    """Ctrl-C (to the whole process group) lets running configs finish, drops the queue: 130."""
    script = write_script(tmp_path)
    args = ("run", "--backend", "dask", "--max-workers", "2")
    proc = start(script, *args, EXP_N="8", EXP_SLEEP="1.5")
    wait_for(lambda: len(lines(tmp_path, "starts")) >= 2, what="two configs started")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130, (tmp_path / "run.err").read_text()
    found = statuses(tmp_path / "out")
    assert "running" not in found.values()
    assert len(lines(tmp_path, "completions")) == list(found.values()).count("done") < 8
    again = run(script, *args, EXP_N="8", EXP_SLEEP="0")
    assert again.returncode == 0, again.stderr
    completions = Counter(name for name, _ in lines(tmp_path, "completions"))
    assert completions == Counter({f"i={i}": 1 for i in range(8)})


@pytest.mark.slow
def test_lost_scheduler_stops_the_run(tmp_path: Path) -> None:
    """The scheduler going away stops the run with one line, exit 2, and the state saved."""
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    port = 8787 + os.getpid() % 1000
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [DASK_CLI, "scheduler", "--port", str(port), "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    worker = start_worker(address, workdir)
    try:
        wait_for_workers(address, 1)
        script = write_script(tmp_path)
        proc = start(
            script, "run", "--backend", "dask", "--scheduler", address, EXP_N="10", EXP_SLEEP="0.5"
        )
        # Recorded, not just returned: an outcome still on its way is lost with the scheduler.
        wait_for(lambda: recorded_done(tmp_path / "out") >= 2, what="two configs done")
        os.killpg(scheduler.pid, signal.SIGKILL)
        assert proc.wait(timeout=120) == 2
        err = (tmp_path / "run.err").read_text()
        shown = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(shown) == 1 and "lost the Dask scheduler" in shown[0], err
        assert "Traceback" not in err, err
        found = statuses(tmp_path / "out")
        assert "running" not in found.values()
        done = [n for n, s in found.items() if s == "done"]
        assert len(done) >= 2
        assert {n for n, _ in lines(tmp_path, "completions")} >= set(done)
    finally:
        stop(worker)
        stop(scheduler)


def test_scheduler_needs_the_dask_backend(tmp_path: Path) -> None:
    """--scheduler with another backend is a one-line error, exit 2."""
    script = write_script(tmp_path)
    proc = run(script, "run", "--scheduler", "tcp://127.0.0.1:1")
    assert proc.returncode == 2
    one_line_error(proc, "--backend dask")


def test_unreachable_scheduler_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler address nothing listens on: one clear error, nothing marked running."""
    from resweep.pools import dask as dask_pool

    monkeypatch.setattr(dask_pool, "CONNECT_TIMEOUT_S", 1.0)
    experiment = resweep.Experiment(
        function=lambda c: None, configs=[{"i": 1}], output_dir=tmp_path / "out"
    )
    with pytest.raises(resweep.ResweepError, match="cannot reach the Dask scheduler"):
        experiment.run(backend="dask", scheduler="tcp://127.0.0.1:1", progress=False)
    assert statuses(tmp_path / "out") == {"i=1": "todo"}


def test_missing_dask_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Dask installed, backend='dask' is one line saying what to pip install."""
    monkeypatch.setitem(sys.modules, "distributed", None)
    experiment = resweep.Experiment(
        function=lambda c: None, configs=[{"i": 1}], output_dir=tmp_path / "out"
    )
    with pytest.raises(resweep.ResweepError, match=r"pip install 'dask\[distributed\]>=2024\.1'"):
        experiment.run(backend="dask", progress=False)


def test_a_run_right_after_a_sigkill_never_overlaps_a_config_still_on_the_cluster(
    tmp_path: Path,
) -> None:
    """SIGKILL the coordinator alone mid-config; start again at once: no execution overlaps."""
    script = write_script(tmp_path)
    args = ("run", "--backend", "dask", "--max-workers", "1")
    for round_ in range(2):
        before = len(lines(tmp_path, "starts"))
        proc = start(script, *args, EXP_N="3", EXP_SLEEP="3")
        wait_for(lambda n=before: len(lines(tmp_path, "starts")) > n, what="a config to start")
        os.kill(proc.pid, signal.SIGKILL)  # the coordinator alone: its workers live on
        proc.wait(timeout=30)
        assert round_ < 2
    again = run(script, *args, EXP_N="3", EXP_SLEEP="3", timeout=180)
    assert again.returncode == 0, again.stderr
    assert lines(tmp_path, "overlaps") == []
    assert set(statuses(tmp_path / "out").values()) == {"done"}


def test_configs_no_worker_started_use_no_attempt(tmp_path: Path, local_scheduler: str) -> None:
    """On a cluster with no workers, handed-out configs that never started keep attempts 0."""
    script = write_script(tmp_path)
    proc = start(script, "run", "--backend", "dask", "--scheduler", local_scheduler, EXP_N="4")
    try:
        wait_for(
            lambda: (
                (tmp_path / "out" / "journal.jsonl").exists()
                and "running" in (tmp_path / "out" / "journal.jsonl").read_text()
            ),
            what="configs handed to the cluster",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    state = resweep.open(tmp_path / "out").state
    assert {r["status"] for r in state.configs.values()} == {"todo"}
    assert {r["attempts"] for r in state.configs.values()} == {0}


def test_a_local_cluster_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    """Workers that die while the local cluster starts: one line, exit 2, nothing marked running."""
    script = write_script(tmp_path)
    proc = run(
        script, "run", "--backend", "dask", "--max-workers", "1",
        DASK_DISTRIBUTED__WORKER__PRELOAD="resweep_no_such_module_to_preload",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    one_line_error(proc, "could not start a local Dask cluster")
    assert set(statuses(tmp_path / "out").values()) == {"todo"}
