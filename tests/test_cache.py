"""The request cache: keys, the n-th call rule, resuming without paying twice, many writers."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import resweep
from resweep import cache

# Where the real calls of the in-process tests are counted; set by the `calls` fixture.
CALLS: list[Path] = []


def record_call(text: str) -> None:
    """The side effect of a real call: one line appended to the calls file."""
    with open(CALLS[-1], "a", encoding="utf-8") as handle:
        handle.write(text + "\n")


def real_calls(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.fixture
def calls(tmp_path: Path) -> Any:
    path = tmp_path / "calls.txt"
    CALLS.append(path)
    yield path
    CALLS.remove(path)


_ask_lock = threading.Lock()


@resweep.cached
def ask(prompt: str, temperature: float = 0.0) -> str:
    """A non-deterministic model call: every real call gives a new answer."""
    with _ask_lock:  # threads of one process must not count the same call twice
        record_call(f"ask {prompt} {temperature}")
        return f"{prompt}#{len(real_calls(CALLS[-1]))}"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    tries: int = 3


def three_asks(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    return {"answers": [ask(f"{config.name}-q{i}") for i in range(config.tries)]}


def experiment_of(
    tmp_path: Path, function: Callable[..., Any], configs: list[Any], **options: Any
) -> resweep.Experiment:
    return resweep.Experiment(
        function=function,
        configs=configs,
        output_dir=tmp_path / "out",
        config_naming=lambda c: c.name,
        **options,
    )


def run(experiment: resweep.Experiment, **options: Any) -> resweep.RunReport:
    options.setdefault("backend", "sequential")
    return experiment.run(progress=False, **options)


def run_process(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(script),
            *args,
            *(["--progress=False"] if args[:1] == ("run",) else []),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=script.parent,
        check=False,
    )


# -- keys ------------------------------------------------------------------------------------


def key(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    return cache.call_key("f", fn, args, kwargs)


def f(prompt: str, temperature: float = 0.5, *, tags: Any = None) -> None:
    """A signature to bind calls against."""


def test_key_binds_arguments_by_name_with_defaults() -> None:
    """Positional, keyword and defaulted spellings of one call share one key."""
    assert key(f, "p") == key(f, prompt="p") == key(f, "p", 0.5) == key(f, "p", temperature=0.5)
    assert key(f, "p") != key(f, "p", 0.7)


def test_key_keeps_types_apart_and_ignores_dict_order() -> None:
    """1, 1.0, True and "1" are different calls; a dict's insertion order is not."""
    keys = {key(f, "p", value) for value in (1, 1.0, True, "1", None, math.nan)}
    assert len(keys) == 6
    assert key(f, "p", tags={"a": 1, "b": [1, 2]}) == key(f, "p", tags={"b": [1, 2], "a": 1})
    assert key(f, "p", tags={1: "x"}) != key(f, "p", tags={"1": "x"})


def test_key_encodes_plain_data_kinds() -> None:
    """Dataclasses, bytes, sets, paths and numpy arrays and scalars have stable encodings."""
    np = pytest.importorskip("numpy")
    for value in (Config("a"), b"\x00\xff", {"b", "a"}, Path("/x"), np.arange(6).reshape(2, 3)):
        assert key(f, "p", tags=value) == key(f, "p", tags=value)
    assert key(f, "p", tags=np.int64(3)) == key(f, "p", tags=3)
    assert key(f, "p", tags=np.zeros(2)) != key(f, "p", tags=np.zeros(2, dtype=np.int32))


def test_key_of_unencodable_argument_names_it() -> None:
    """An argument with no canonical encoding is a CacheKeyError naming function and argument."""
    with pytest.raises(resweep.CacheKeyError, match=r"f\(\): argument tags\['client'\] is a"):
        key(f, "p", tags={"client": threading.Lock()})
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(resweep.CacheKeyError, match="contains itself"):
        key(f, looped)


def test_key_does_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    """The key of a call with a set argument is the same under any PYTHONHASHSEED."""
    code = (
        "from resweep import cache\n"
        "def f(x): pass\n"
        "print(cache.call_key('f', f, ({'alpha', 'beta', 'gamma', 'delta'},), {}))\n"
    )
    seen = set()
    for seed in ("1", "2", "3"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        )
        seen.add(out.stdout)
    assert len(seen) == 1


def test_long_keys_are_hashed() -> None:
    """A call with a huge argument gets a short key that still tells calls apart."""
    a, b = key(f, "x" * 5000), key(f, "x" * 4999 + "y")
    assert len(a) < 200 and a != b


# -- recording -------------------------------------------------------------------------------


def test_outside_a_run_a_cached_function_is_a_plain_call(calls: Path) -> None:
    """Without a running config every call is made for real and nothing is stored."""
    assert ask("q") == "q#1"
    assert ask("q") == "q#2"
    assert len(real_calls(calls)) == 2


def test_three_identical_calls_record_three_answers(tmp_path: Path, calls: Path) -> None:
    """Sampling one prompt three times records three answers, replayed in the same order."""

    def sample(config: Config) -> dict[str, Any]:
        return {"answers": [ask("same") for _ in range(3)]}

    experiment = experiment_of(tmp_path, sample, [Config("a")])
    run(experiment)
    stored = experiment.config_record("a")["result"]["answers"]
    assert stored == ["same#1", "same#2", "same#3"]
    replay = experiment.replay("a")
    assert replay.equal and replay.result["answers"] == stored
    assert len(real_calls(calls)) == 3


def test_a_call_that_raises_is_not_recorded(tmp_path: Path, calls: Path) -> None:
    """A raising call takes no slot: the retry that succeeds is what replay answers first."""

    @resweep.cached
    def flaky(prompt: str) -> str:
        record_call(f"flaky {prompt}")
        if len(real_calls(CALLS[-1])) == 1:
            raise ConnectionError("503")
        return f"ok {len(real_calls(CALLS[-1]))}"

    def patient(config: Config) -> dict[str, Any]:
        try:
            return {"answer": flaky("p")}
        except ConnectionError:
            return {"answer": flaky("p"), "retried": True}

    experiment = experiment_of(tmp_path, patient, [Config("a")])
    run(experiment)
    assert experiment.config_record("a")["result"] == {"answer": "ok 2", "retried": True}
    replay = experiment.replay("a")
    assert replay.result == {"answer": "ok 2"}  # replay never sees the failure
    assert len(real_calls(calls)) == 2
    assert experiment.config_record("a")["cache_misses"] == 1


def test_nan_and_odd_values_replay_exactly(tmp_path: Path, calls: Path) -> None:
    """Answers such as NaN, -0.0, lone surrogates and big ints come back as recorded."""
    values = [math.nan, -0.0, "\ud800", 2**80, b"\x00", {"nested": (1, 2)}]

    @resweep.cached
    def odd(i: int) -> Any:
        record_call(f"odd {i}")
        return values[i]

    seen: list[Any] = []

    def collect(config: Config) -> None:
        seen.append([odd(i) for i in range(len(values))])

    experiment = experiment_of(tmp_path, collect, [Config("a")])
    run(experiment)
    experiment.replay("a")
    assert len(real_calls(calls)) == len(values)
    recorded, replayed = seen
    assert math.isnan(replayed[0]) and math.copysign(1, replayed[1]) == -1
    assert pickle.dumps(replayed[1:]) == pickle.dumps(recorded[1:])


def test_unpicklable_answer_fails_the_config_clearly(tmp_path: Path, calls: Path) -> None:
    """A cached function returning something pickle refuses fails its config with a clear error."""

    @resweep.cached
    def handle(prompt: str) -> Any:
        return threading.Lock()

    experiment = experiment_of(tmp_path, lambda c: {"x": str(handle("p"))}, [Config("a")])
    run(experiment)
    record = experiment.config_record("a")
    assert record["status"] == "failed"
    assert "handle('p') returned a lock that cannot be pickled" in record["error"]


def test_cache_off_calls_for_real_and_replay_refuses(tmp_path: Path, calls: Path) -> None:
    """With cache=False every call is real, no cache is created, and replay raises CacheMiss."""
    experiment = experiment_of(tmp_path, three_asks, [Config("a")], cache=False, retries=0)
    run(experiment)
    assert len(real_calls(calls)) == 3
    assert not (tmp_path / "out" / "cache").exists()
    with pytest.raises(resweep.CacheMiss, match="cache=False"):
        experiment.replay("a")
    assert len(real_calls(calls)) == 3


def test_ctx_call_records_partials_and_cached_functions_once(tmp_path: Path, calls: Path) -> None:
    """ctx.call keys a partial by its function and arguments, and a @cached function once."""

    def plain(prompt: str, suffix: str) -> str:
        record_call(f"plain {prompt}")
        return prompt + suffix

    def through_ctx(config: Config, ctx: resweep.Context) -> dict[str, Any]:
        a = ctx.call(functools.partial(plain, "p"), suffix="!")
        b = ctx.call(ask, "q")
        return {"a": a, "b": b}

    experiment = experiment_of(tmp_path, through_ctx, [Config("a")])
    run(experiment)
    assert experiment.config_record("a")["cache_misses"] == 2
    assert experiment.replay("a").equal
    assert len(real_calls(calls)) == 2


# -- resuming without paying twice -----------------------------------------------------------


def ask_then_fail_first(config: Config, ctx: resweep.Context) -> dict[str, Any]:
    answers = [ask(f"{config.name}-q{i}") for i in range(3)]
    if ctx.attempt == 1:
        raise RuntimeError("server went away")
    return {"answers": answers}


def test_an_automatic_retry_asks_afresh(tmp_path: Path, calls: Path) -> None:
    """A config retried within the run (retries=1) makes its calls again: a failed attempt's
    answers may be the reason it failed, so they are kept as its record, not replayed."""
    experiment = experiment_of(tmp_path, ask_then_fail_first, [Config("a")], retries=1)
    report = run(experiment)
    record = experiment.config_record("a")
    assert record["status"] == "done" and record["attempts"] == 2
    assert (record["cache_hits"], record["cache_misses"]) == (0, 3)
    assert len(real_calls(calls)) == 6
    assert (report.cache_hits, report.cache_misses) == (0, 6)


def test_retry_failed_asks_afresh_reuse_calls_answers_from_the_failed_attempt(
    tmp_path: Path, calls: Path
) -> None:
    """--retry-failed pays again; --reuse-calls answers the retry from the failed attempt's calls
    (the cheap path after fixing a bug in one's own code); --fresh drops only live calls."""
    experiment = experiment_of(tmp_path, ask_then_fail_first, [Config("a"), Config("b")])
    run(experiment)
    assert experiment.status()["failed"] == 2
    assert len(real_calls(calls)) == 6
    run(experiment, retry_failed=True, only="a")
    assert len(real_calls(calls)) == 9
    assert experiment.config_record("a")["cache_misses"] == 3
    run(experiment, retry_failed=True, only="b", reuse_calls=True)
    assert len(real_calls(calls)) == 9  # zero real calls for b
    assert experiment.config_record("b")["cache_hits"] == 3
    assert experiment.replay("a").equal and experiment.replay("b").equal
    assert len(real_calls(calls)) == 9


def test_an_interrupted_attempt_is_not_a_failure_its_calls_are_reused(
    tmp_path: Path, calls: Path
) -> None:
    """A call left recorded under the config, as an attempt cut off mid-way leaves it, answers the
    next attempt (test_config_killed_between_calls... kills a real worker for the same rule)."""
    experiment = experiment_of(tmp_path, three_asks, [Config("a")])
    out = tmp_path / "out"
    with cache.scope(out, "a", "record", cache.CallStats()):
        ask("a-q0")  # as an attempt that was killed after its first call leaves it
    assert len(real_calls(calls)) == 1
    run(experiment)
    assert len(real_calls(calls)) == 3
    assert experiment.config_record("a")["cache_hits"] == 1


def test_retries_get_a_good_answer_from_a_model_whose_first_answer_is_bad(
    tmp_path: Path, calls: Path
) -> None:
    """With retries, a config whose first answer was malformed succeeds on a fresh answer."""

    def flaky(config: Config, ctx: resweep.Context) -> dict[str, Any]:
        answer = ask(f"{config.name}-json")
        asked = real_calls(calls).count(f"ask {config.name}-json 0.0")
        if asked == 1:  # the model's first answer to each prompt is malformed
            raise ValueError(f"malformed JSON from the model: {answer!r}")
        return {"answer": answer}

    experiment = experiment_of(tmp_path, flaky, [Config(f"c{i}") for i in range(8)], retries=3)
    report = run(experiment)
    assert (report.done, report.failed) == (8, 0)
    # Each config paid for its bad answer and one good one; none replayed the bad one.
    assert len(real_calls(calls)) == 16


# -- isolation -------------------------------------------------------------------------------


def same_prompt_slowly(config: Config) -> dict[str, Any]:
    answers = []
    for _ in range(2):
        answers.append(ask("shared prompt"))
        time.sleep(0.02)  # let the other configs' threads interleave
    return {"answers": answers}


def test_threading_backend_keeps_configs_apart(tmp_path: Path, calls: Path) -> None:
    """Configs running in threads of one process never answer each other's calls."""
    configs = [Config(f"c{i}") for i in range(4)]
    experiment = experiment_of(tmp_path, same_prompt_slowly, configs)
    run(experiment, backend="threading", max_workers=4)
    assert len(real_calls(calls)) == 8
    results = [experiment.config_record(c.name) for c in configs]
    assert all((r["cache_hits"], r["cache_misses"]) == (0, 2) for r in results)
    answers = [a for r in results for a in r["result"]["answers"]]
    assert len(set(answers)) == 8
    assert all(r.equal for r in experiment.replay())
    assert len(real_calls(calls)) == 8


def test_threads_with_a_copied_context_share_their_config_cache(
    tmp_path: Path, calls: Path
) -> None:
    """Calls made from a config's own thread pool, with its context copied, are recorded."""

    def fan_out(config: Config) -> dict[str, Any]:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(contextvars.copy_context().run, ask, f"q{i}") for i in range(8)]
            return {"answers": sorted(f.result() for f in futures)}

    experiment = experiment_of(tmp_path, fan_out, [Config("a")])
    run(experiment)
    assert experiment.config_record("a")["cache_misses"] == 8
    assert experiment.replay("a").equal
    assert len(real_calls(calls)) == 8


# -- real processes --------------------------------------------------------------------------

SCRIPT_HEAD = """\
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import resweep

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS = os.path.join(HERE, "calls.txt")


@resweep.cached
def ask(prompt: str) -> str:
    with open(CALLS, "a") as handle:  # one short append: atomic between processes
        handle.write(f"{os.getpid()} {prompt}\\n")
    return f"answer to {prompt} from {os.getpid()}"


@dataclass(frozen=True)
class Config:
    i: int
"""


def write_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "exp.py"
    tail = "\n\nif __name__ == '__main__':\n    experiment.run_cli()\n"
    script.write_text(SCRIPT_HEAD + textwrap.dedent(body) + tail, encoding="utf-8")
    return script


def test_config_killed_between_calls_resumes_paying_only_for_new_calls(tmp_path: Path) -> None:
    """After SIGKILL between calls, the resumed config makes only the calls it had not made."""
    script = write_script(
        tmp_path,
        """
        def evaluate(config: Config, ctx: resweep.Context) -> dict:
            answers = []
            for q in range(6):
                answers.append(ask(f"q{q}"))
                if q == 2 and ctx.attempt == 1:
                    open(os.path.join(HERE, "between-calls"), "w").close()
                    time.sleep(60)  # killed here
            return {"answers": answers}

        experiment = resweep.Experiment(
            function=evaluate, configs=[Config(0)], output_dir=os.path.join(HERE, "out")
        )
        """,
    )
    process = subprocess.Popen(
        [sys.executable, str(script), "run", "--backend", "sequential", "--progress=False"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "between-calls").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    made = [line.split()[1] for line in real_calls(tmp_path / "calls.txt")]
    assert made == ["q0", "q1", "q2"]
    resumed = run_process(script, "run", "--backend", "sequential")
    assert resumed.returncode == 0, resumed.stderr
    made = [line.split()[1] for line in real_calls(tmp_path / "calls.txt")]
    assert made == ["q0", "q1", "q2", "q3", "q4", "q5"]
    shown = run_process(script, "show", "i=0")
    assert "cache_hits: 3" in shown.stdout and "cache_misses: 3" in shown.stdout


def test_eight_loky_workers_record_at_once_and_lose_nothing(tmp_path: Path) -> None:
    """Eight worker processes opening and writing one cache together lose no recorded call."""
    n_configs, n_calls = 24, 5
    script = write_script(
        tmp_path,
        f"""
        def evaluate(config: Config) -> dict:
            return {{"answers": [ask(f"{{config.i}}-{{q}}") for q in range({n_calls})]}}

        experiment = resweep.Experiment(
            function=evaluate,
            configs=[Config(i) for i in range({n_configs})],
            output_dir=os.path.join(HERE, "out"),
        )
        """,
    )
    ran = run_process(script, "run", "--max-workers", "8", "--backend", "loky")
    assert ran.returncode == 0, ran.stderr
    made = real_calls(tmp_path / "calls.txt")
    assert len(made) == n_configs * n_calls
    assert len({line.split()[0] for line in made}) > 1  # several processes really did record
    import diskcache

    with diskcache.Cache(str(tmp_path / "out" / "cache")) as stored:
        assert len(stored) == n_configs * n_calls
    replayed = run_process(script, "replay")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"replayed {n_configs}: {n_configs} equal" in replayed.stdout
    assert len(real_calls(tmp_path / "calls.txt")) == n_configs * n_calls


OPENER = """\
import sys, time
from resweep import cache

start_at, index = float(sys.argv[1]), int(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))  # every process opens at the same instant
handle = cache.open_cache(sys.argv[3])
for n in range(20):
    handle.set(f"{index}/{n}", n, tag=str(index), retry=True)
"""


def test_many_processes_opening_the_cache_at_once_do_not_fail(tmp_path: Path) -> None:
    """Twelve processes that open one new cache at the same instant all succeed."""
    start_at = str(time.time() + 3)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, start_at, str(i), str(tmp_path)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(12)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 12, "\n".join(errors)
    assert len(cache.open_cache(tmp_path)) == 12 * 20


def test_async_functions_cannot_be_decorated() -> None:
    """@resweep.cached on an async function is refused at decoration time."""

    async def fetch(prompt: str) -> str:
        return prompt

    with pytest.raises(TypeError, match="it is async"):
        resweep.cached(fetch)


def test_reuse_calls_without_retry_failed_is_refused(tmp_path: Path) -> None:
    """--reuse-calls only answers retried failed configs: alone it is a clear error, not a no-op."""
    experiment = experiment_of(tmp_path, three_asks, [Config("a")])
    with pytest.raises(resweep.ResweepError, match="goes with --retry-failed"):
        experiment.run(reuse_calls=True, progress=False)
