"""What a cache hit costs: a plain call, a resweep hit and a joblib.Memory hit on one function.

Goal: a resweep hit under 100 µs median. Every figure is measured in the same run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import resweep
from resweep import cache

CALLS = 2000
GOAL_HIT_US = 100.0
PROMPT = "Summarise the following paragraph in one sentence. " * 4


def ask_model(prompt: str, temperature: float = 0.0, max_tokens: int = 256) -> dict[str, Any]:
    """The function under test: cheap, so only the caching around it is measured."""
    return {"text": prompt[:40], "temperature": temperature, "tokens": [1, 2, 3]}


def timed_us(call: Callable[[], Any], repeat: int) -> list[float]:
    """Microseconds taken by each of `repeat` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - started) / 1000)
    return times


def measure(repeat: int = CALLS) -> dict[str, list[float]]:
    """Per-call times of a plain call, a resweep miss (record), a resweep hit, a joblib hit."""
    import joblib

    cached_ask = resweep.cached(ask_model)
    figures: dict[str, list[float]] = {}
    figures["plain call"] = timed_us(lambda: ask_model(PROMPT, temperature=0.5), repeat)
    with tempfile.TemporaryDirectory(prefix="resweep-bench-") as tmp:
        # Recording: the n-th identical call is the n-th entry, so `repeat` calls record `repeat`.
        with cache.scope(tmp, "bench", "record", cache.CallStats()):
            figures["resweep miss (record)"] = timed_us(
                lambda: cached_ask(PROMPT, temperature=0.5), repeat
            )
        # The same config again, as a resumed attempt or a replay sees it: every call is a hit.
        stats = cache.CallStats()
        with cache.scope(tmp, "bench", "replay", stats):
            figures["resweep hit"] = timed_us(lambda: cached_ask(PROMPT, temperature=0.5), repeat)
        assert stats.hits == repeat and stats.misses == 0
        cache.close_caches()

        memory = joblib.Memory(f"{tmp}/joblib", verbose=0)
        joblib_ask = memory.cache(ask_model)
        joblib_ask(PROMPT, temperature=0.5)
        figures["joblib.Memory hit"] = timed_us(lambda: joblib_ask(PROMPT, temperature=0.5), repeat)
    return figures


def main() -> None:
    """Print the medians and ratios as a short table."""
    figures = measure()
    medians = {name: statistics.median(times) for name, times in figures.items()}
    plain, hit = medians["plain call"], medians["resweep hit"]
    print(f"cache hit overhead, {CALLS} calls each (µs per call)")
    print(f"{'':24}{'median':>10}{'p90':>10}")
    for name, times in figures.items():
        p90 = statistics.quantiles(times, n=10)[-1]
        print(f"{name:24}{medians[name]:>10.1f}{p90:>10.1f}")
    print(f"resweep hit overhead over a plain call: {hit - plain:7.1f} µs ({hit / plain:.0f}x)")
    print(f"joblib.Memory hit / resweep hit:        {medians['joblib.Memory hit'] / hit:7.1f}x")
    verdict = "met" if hit < GOAL_HIT_US else "MISSED"
    print(f"goal: resweep hit < {GOAL_HIT_US:.0f} µs median: {verdict} ({hit:.1f} µs)")


if __name__ == "__main__":
    main()
