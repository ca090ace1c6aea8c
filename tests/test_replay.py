"""Replay: re-running done configs from the cache, comparing results, and the CLI's exit codes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import resweep

# Where the real calls are counted; set by the `calls` fixture.
CALLS: list[Path] = []
# What the functions below read besides their config: flipped by tests to change a run.
KNOBS: dict[str, Any] = {"suffix": "", "bonus": 0}


def real_calls() -> list[str]:
    path = CALLS[-1]
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.fixture
def calls(tmp_path: Path) -> Any:
    path = tmp_path / "calls.txt"
    CALLS.append(path)
    yield path
    CALLS.remove(path)
    KNOBS.update(suffix="", bonus=0)


@resweep.cached(name="llm")
def ask(prompt: str, temperature: float = 0.7) -> str:
    """A paid, non-deterministic call: every real call gives a new answer."""
    with open(CALLS[-1], "a", encoding="utf-8") as handle:
        handle.write(f"{prompt}\n")
    return f"{prompt} -> {len(real_calls())}"


@dataclasses.dataclass(frozen=True)
class Config:
    model: str
    seed: int = 0


def evaluate(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    answers = [ask(f"{config.model}/{config.seed}/q{i}" + KNOBS["suffix"]) for i in range(4)]
    (ctx.dir / "answers.txt").write_text("\n".join(answers))
    return {"answers": answers, "score": len(answers) + KNOBS["bonus"], "meta": {"n": 4}}


@pytest.fixture
def experiment(tmp_path: Path, calls: Path) -> resweep.Experiment:
    """A finished experiment of four configs, four recorded calls each."""
    done = resweep.Experiment(
        function=evaluate,
        configs=resweep.grid(Config, model=["a", "b"], seed=[0, 1]),
        output_dir=tmp_path / "out",
    )
    report = done.run(backend="sequential", progress=False)
    assert report.done == 4
    return done


def test_full_replay_makes_no_real_call_and_reproduces_every_result(
    experiment: resweep.Experiment, calls: Path
) -> None:
    """Replaying every done config calls nothing for real and gives back every stored result."""
    before = real_calls()
    replays = experiment.replay()
    assert len(replays) == 4 and all(r.equal for r in replays)
    assert all(r.result == r.stored and r.cache_hits == 4 for r in replays)
    assert real_calls() == before


def test_replay_leaves_stored_artifacts_alone(
    experiment: resweep.Experiment, tmp_path: Path
) -> None:
    """During replay ctx.dir is a fresh temporary directory; stored artifacts keep their text."""
    name = next(iter(experiment.read_state().configs))
    stored = tmp_path / "out" / "configs" / name / "answers.txt"
    text = stored.read_text()
    KNOBS["bonus"] = 1
    experiment.replay(name)
    assert stored.read_text() == text


def test_replay_shows_a_changed_result_key_by_key(experiment: resweep.Experiment) -> None:
    """When the code now computes something else, replay names each differing key."""
    KNOBS["bonus"] = 1
    name = next(iter(experiment.read_state().configs))
    replay = experiment.replay(name)
    assert not replay.equal
    assert replay.differences == ["score: stored 4, replayed 5"]
    assert "score: stored 4, replayed 5" in replay.describe()


def test_changed_arguments_raise_cache_miss_without_a_real_call(
    experiment: resweep.Experiment,
) -> None:
    """A call whose arguments changed since recording is a CacheMiss, and nothing is called."""
    before = real_calls()
    KNOBS["suffix"] = " (reworded)"
    name = next(iter(experiment.read_state().configs))
    with pytest.raises(resweep.CacheMiss, match=r"llm\('a/0/q0 \(reworded\)'\)") as caught:
        experiment.replay(name)
    assert "was never recorded" in str(caught.value)
    assert real_calls() == before


def test_a_swallowed_cache_miss_still_fails_the_replay(tmp_path: Path, calls: Path) -> None:
    """Code that catches every exception cannot hide a CacheMiss from replay."""

    def forgiving(config: Config) -> dict[str, Any]:
        try:
            answer = ask(config.model + KNOBS["suffix"])
        except Exception:
            raise ValueError("fallback failed too") from None
        return {"answer": answer}

    experiment = resweep.Experiment(
        function=forgiving, configs=[Config("a")], output_dir=tmp_path / "out"
    )
    experiment.run(backend="sequential", progress=False)
    KNOBS["suffix"] = "!"
    with pytest.raises(resweep.CacheMiss):
        experiment.replay(next(iter(experiment.read_state().configs)))
    [replay] = experiment.replay()
    assert replay.kind == "cache miss" and not replay.equal
    assert len(real_calls()) == 1


def test_replay_refuses_unknown_and_unfinished_configs(experiment: resweep.Experiment) -> None:
    """Replay of an unknown name or a config that is not done is a clear error."""
    with pytest.raises(resweep.UnknownConfigError, match="no config named"):
        experiment.replay("nope")
    state = experiment.store.read()
    name = next(iter(state.configs))
    state.configs[name]["status"] = "todo"
    experiment.store.compact(state)
    with pytest.raises(resweep.ResweepError, match="only done and failed configs replay"):
        experiment.replay(name)


# -- the command line, as a real process ------------------------------------------------------

SCRIPT = """\
from __future__ import annotations

import os
from dataclasses import dataclass

import resweep

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS = os.path.join(HERE, "calls.txt")


@resweep.cached
def ask(prompt: str) -> str:
    with open(CALLS, "a") as handle:
        handle.write(prompt + "\\n")
    return f"answer {os.urandom(4).hex()}"


@dataclass(frozen=True)
class Config:
    seed: int


def evaluate(config: Config) -> dict:
    prompt = "question" + ("?" if os.environ.get("REPLAY_TEST") == "miss" else "")
    bonus = 1 if os.environ.get("REPLAY_TEST") == "differ" else 0
    return {"answer": ask(prompt), "score": config.seed + bonus}


experiment = resweep.Experiment(
    function=evaluate, configs=[Config(0), Config(1)], output_dir=os.path.join(HERE, "out")
)

if __name__ == "__main__":
    experiment.run_cli()
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """exp.py, run once to the end; replays never change what it stored."""
    path = tmp_path_factory.mktemp("cli") / "exp.py"
    path.write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    ran = cli(path, "run", "--progress=False")
    assert ran.returncode == 0, ran.stderr
    return path


def cli(script: Path, *args: str, mode: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=script.parent,
        env={**os.environ, "REPLAY_TEST": mode},
        check=False,
    )


@pytest.mark.parametrize(
    ("mode", "args", "code", "says"),
    [
        ("", [], 0, "replayed 2: 2 equal, 0 differ, 0 cache miss, 0 raised"),
        ("miss", [], 2, "replayed 2: 0 equal, 0 differ, 2 cache miss, 0 raised"),
        ("", ["--config", "seed=1"], 0, "seed=1: replayed result equals the stored one"),
        ("differ", [], 1, "score: stored 0, replayed 1"),
        ("miss", ["--config", "seed=0"], 2, "CacheMiss: config 'seed=0': call #1 ask('question?')"),
        ("", ["--config", "seed=9"], 2, "no config named 'seed=9'"),
    ],
    ids=["equal", "all-miss", "one-equal", "differ", "miss", "unknown"],
)
def test_cli_replay_exit_status(
    script: Path, mode: str, args: list[str], code: int, says: str
) -> None:
    """`replay` exits 0 when all equal, 1 when some differ, 2 on a CacheMiss or a bad name."""
    calls_before = (script.parent / "calls.txt").read_text()
    done = cli(script, "replay", *args, mode=mode)
    assert done.returncode == code, done.stdout + done.stderr
    assert says in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert (script.parent / "calls.txt").read_text() == calls_before


# -- a failed config replays to its exception ------------------------------------------------

FAILING = """\
import os

import resweep

HERE = os.path.dirname(os.path.abspath(__file__))


@resweep.cached
def ask(prompt):
    with open(os.path.join(HERE, "calls.txt"), "a") as handle:
        handle.write(prompt + "\\n")
    return "not json"


def evaluate(config):
    import json

    answer = ask(f"question {config['i']}")
    if config["i"] == 1:
        return {"parsed": json.loads(answer)}  # the bug being debugged
    return {"answer": answer}


experiment = resweep.Experiment(
    function=evaluate, configs=[{"i": 0}, {"i": 1}], output_dir=os.path.join(HERE, "out")
)

if __name__ == "__main__":
    experiment.run_cli()
"""


@pytest.fixture
def failing(tmp_path: Path) -> Path:
    path = tmp_path / "flaky.py"
    path.write_text(FAILING, encoding="utf-8")
    ran = cli(path, "run", "--progress=False")
    assert ran.returncode == 1, ran.stderr
    return path


def test_a_failed_config_replays_to_its_exception_without_a_real_call(failing: Path) -> None:
    """replay --config of a failed config raises its exception again, from the recorded
    calls, with a traceback that starts in the user's own file; exit 1."""
    calls = (failing.parent / "calls.txt").read_text()
    done = cli(failing, "replay", "--config", "i=1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "JSONDecodeError" in done.stderr
    assert f'File "{failing}"' in done.stderr and "json.loads(answer)" in done.stderr
    assert "fire" not in done.stderr and "resweep/replay.py" not in done.stderr
    assert (failing.parent / "calls.txt").read_text() == calls


def test_replay_pdb_stops_in_the_debugger_at_the_exception(failing: Path) -> None:
    """--pdb enters the post-mortem debugger where the config raised (driven on stdin)."""
    done = subprocess.run(
        [sys.executable, str(failing), "replay", "--config", "i=1", "--pdb"],
        input="p s\nq\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=failing.parent,
        check=False,
    )
    assert "(Pdb)" in done.stdout
    assert "'not json'" in done.stdout  # the recorded answer, where json.loads gave up on it
    assert done.returncode == 1


def test_replay_of_everything_with_failed_reports_each_config(failing: Path) -> None:
    """replay --failed goes through done and failed configs; none stops the others."""
    done = cli(failing, "replay", "--failed")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "i=1: raised: JSONDecodeError" in done.stdout
    assert "replayed 2: 1 equal, 0 differ, 0 cache miss, 1 raised" in done.stdout


# -- a shareable cache ----------------------------------------------------------------------------


@resweep.cached
def structured(kind: str) -> Any:
    """JSON-shaped answers are stored as JSON text; a tuple only a pickle keeps exactly."""
    return ("a", 1) if kind == "tuple" else {"text": "plain", "score": 0.5, "tags": ["x"]}


def shape(config: dict[str, str]) -> dict[str, Any]:
    answer = structured(config["kind"])
    return {"answer": list(answer) if isinstance(answer, tuple) else answer}


def test_a_copied_cache_replays_json_answers_and_refuses_pickles_with_no_pickle(
    tmp_path: Path,
) -> None:
    """A result directory shared with someone replays with allow_pickle=False as far as its
    answers are JSON, readable with sqlite3; an answer stored as a pickle is refused."""
    import shutil
    import sqlite3

    configs = [{"kind": "json"}, {"kind": "tuple"}]
    resweep.Experiment(function=shape, configs=configs, output_dir=tmp_path / "mine").run(
        backend="sequential", progress=False
    )
    shutil.copytree(tmp_path / "mine", tmp_path / "theirs")
    theirs = resweep.Experiment(function=shape, configs=configs, output_dir=tmp_path / "theirs")
    rows = sqlite3.connect(tmp_path / "theirs" / "cache" / "cache.db").execute(
        "SELECT value FROM Cache"
    )
    values = [value for (value,) in rows]
    assert '{"text": "plain", "score": 0.5, "tags": ["x"]}' in values  # readable as it is
    assert theirs.replay("kind=json", allow_pickle=False).equal
    with pytest.raises(resweep.ResweepError, match="recorded as a pickle"):
        theirs.replay("kind=tuple", allow_pickle=False)
    every = theirs.replay(allow_pickle=False)
    assert sorted(r.kind for r in every) == ["equal", "raised"]
    assert all(r.equal for r in theirs.replay())  # with pickles allowed, both replay


def logging_evaluate(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    ctx.log.info("asking about %s", config.model)
    ctx.log.warning("two\nlines")
    return evaluate(config, ctx)


def test_replay_prefixes_every_log_line_with_the_config_name(
    tmp_path: Path, calls: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replaying many configs, every ctx.log line on stderr says which config wrote it."""
    experiment = resweep.Experiment(
        function=logging_evaluate,
        configs=resweep.grid(Config, model=["a", "b"], seed=[0, 1]),
        output_dir=tmp_path / "out",
    )
    experiment.run(backend="sequential", progress=False)
    capsys.readouterr()
    replays = experiment.replay()
    assert isinstance(replays, list) and all(r.equal for r in replays)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 * 4
    for replay in replays:
        mine = [line for line in lines if line.startswith(f"[{replay.name}] ")]
        assert len(mine) == 3
        assert f"INFO asking about {replay.name[len('model=') :][0]}" in mine[0]
        assert mine[2] == f"[{replay.name}] lines"
