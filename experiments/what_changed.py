"""Which results came from code that has changed since? Run, edit, and ask resweep.

    python experiments/what_changed.py run
    # edit estimate() below, e.g. change `4 * inside` to `4.0 * inside`
    python experiments/what_changed.py status                    # warns: 6 done configs changed
    python experiments/what_changed.py show n=1000               # who, where, which code
    python experiments/what_changed.py run --dry-run --rerun-changed
    python experiments/what_changed.py run --rerun-changed       # re-runs exactly those

Each done config records a fingerprint of estimate()'s source and of this whole file; every
run records a session: host, user, pid, Python and library versions, git commit, backend.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import resweep

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    n: int
    seed: int = 0


def estimate(config: Config) -> dict[str, float]:
    """Estimate pi from n random points in the unit square."""
    rng = random.Random(config.seed)
    inside = sum(rng.random() ** 2 + rng.random() ** 2 <= 1 for _ in range(config.n))
    return {"pi": 4 * inside / config.n}


experiment = resweep.Experiment(
    function=estimate,
    configs=resweep.grid(Config, n=[1000, 10000, 100000], seed=[0, 1]),
    output_dir=ROOT / "results" / "what_changed",
    name="what_changed",
    description="Monte Carlo estimates of pi; edit estimate() and watch `status`.",
)

if __name__ == "__main__":
    experiment.run_cli()
