"""A sweep declared as data: the configs come from a YAML file in configs/.

    python experiments/sweep_file.py run --dry-run     # what would run, writes nothing
    python experiments/sweep_file.py run --max-workers 2
    SWEEP=configs/sgd_smoke.yaml python experiments/sweep_file.py run

The sweep file (configs/sgd.yaml by default, or the file in $SWEEP) is checked against
Config before anything runs: a typo in a field name or a string where a number belongs
stops the script with a message naming the file, the axis and the key.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import resweep

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Optimizer:
    lr: float = 0.1
    momentum: float = 0.0


@dataclass(frozen=True)
class Config:
    # "linear" fits y = a x + b, "quadratic" adds a c x^2 term.
    model: str
    optimizer: Optimizer = field(default_factory=Optimizer)
    steps: int = 100
    seed: int = 0


def fit(config: Config) -> dict[str, float]:
    """Fit a noisy parabola by stochastic gradient descent; report the final mean squared error."""
    rng = random.Random(config.seed)
    xs = [rng.uniform(-1, 1) for _ in range(64)]
    ys = [0.5 * x * x - 2 * x + 1 + rng.gauss(0, 0.05) for x in xs]
    degree = 1 if config.model == "linear" else 2
    weights = [0.0] * (degree + 1)
    velocity = [0.0] * (degree + 1)
    for _ in range(config.steps):
        i = rng.randrange(len(xs))
        powers = [xs[i] ** k for k in range(degree + 1)]
        error = sum(w * p for w, p in zip(weights, powers, strict=True)) - ys[i]
        for k in range(degree + 1):
            velocity[k] = (
                config.optimizer.momentum * velocity[k] - config.optimizer.lr * error * powers[k]
            )
            weights[k] += velocity[k]
    mse = sum(
        (sum(w * x**k for k, w in enumerate(weights)) - y) ** 2 for x, y in zip(xs, ys, strict=True)
    ) / len(xs)
    return {"mse": mse, "weights": [round(w, 4) for w in weights]}


SWEEP = Path(os.environ.get("SWEEP", ROOT / "configs" / "sgd.yaml"))

experiment = resweep.Experiment(
    function=fit,
    configs=resweep.load_configs(SWEEP, Config),
    output_dir=ROOT / "results" / "sweep_file" / SWEEP.stem,
    name=f"sweep_file/{SWEEP.stem}",
    description=f"SGD on a noisy parabola, configs from {SWEEP.name}",
)

if __name__ == "__main__":
    experiment.run_cli()
