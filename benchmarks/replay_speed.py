"""Replay against the original run, for a config whose cached calls each take 100 ms.

Goal: replay at least 100x faster than the run that recorded it. Both are measured here.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import resweep
from resweep import cache

CALL_S = 0.1
CALLS_PER_CONFIG = 10
REPLAYS = 5
GOAL_RATIO = 100.0


@resweep.cached
def slow_model(prompt: str, seed: int) -> str:
    """Stands in for a 100 ms model request."""
    time.sleep(CALL_S)
    return f"answer to {prompt} (seed {seed})"


@dataclass(frozen=True)
class Config:
    seed: int


def evaluate(config: Config) -> dict[str, Any]:
    answers = [slow_model(f"question {i}", config.seed) for i in range(CALLS_PER_CONFIG)]
    return {"answers": answers, "n": len(answers)}


def measure(output_dir: Path) -> dict[str, float]:
    """Seconds for the original run, its config alone, and the median of a few replays."""
    experiment = resweep.Experiment(
        function=evaluate, configs=[Config(0)], output_dir=output_dir, name="replay-speed"
    )
    started = time.perf_counter()
    experiment.run(backend="sequential", progress=False)
    run_s = time.perf_counter() - started
    name = next(iter(experiment.read_state().configs))
    config_s = float(experiment.config_record(name)["duration_s"])
    cache.close_caches()  # the first replay opens the cache as a fresh process would
    replays = []
    for _ in range(REPLAYS):
        started = time.perf_counter()
        replay = experiment.replay(name)
        replays.append(time.perf_counter() - started)
        assert replay.equal and replay.cache_hits == CALLS_PER_CONFIG
    return {
        "original run": run_s,
        "config in the run": config_s,
        "first replay": replays[0],
        "replay (median)": statistics.median(replays),
    }


def main() -> None:
    """Print the timings and the speed-up as a short table."""
    with tempfile.TemporaryDirectory(prefix="resweep-bench-") as tmp:
        figures = measure(Path(tmp) / "out")
    cache.close_caches()
    print(f"replay of one config making {CALLS_PER_CONFIG} cached calls of {CALL_S * 1000:.0f} ms")
    for name, seconds in figures.items():
        print(f"{name:20}{seconds * 1000:>10.1f} ms")
    ratio = figures["original run"] / figures["replay (median)"]
    first = figures["original run"] / figures["first replay"]
    print(f"original run / replay (median): {ratio:8.0f}x")
    print(f"original run / first replay:    {first:8.0f}x")
    verdict = "met" if ratio >= GOAL_RATIO else "MISSED"
    print(f"goal: replay >= {GOAL_RATIO:.0f}x faster: {verdict}")


if __name__ == "__main__":
    main()
