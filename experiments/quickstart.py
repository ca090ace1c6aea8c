"""A simulated model evaluation: random latency, a cached "model call", an occasional failure.

Run it with `python experiments/quickstart.py run --max-workers 2`, kill it whenever you like,
and run it again: it continues where it stopped.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass

import resweep


@dataclass(frozen=True)
class Config:
    model: str
    temperature: float
    seed: int = 0


@resweep.cached
def ask_model(model: str, prompt: str, temperature: float) -> str:
    """Stands in for an expensive, non-deterministic LLM request."""
    time.sleep(random.uniform(0.01, 0.05))
    noise = random.random() * temperature
    return f"{model}: {'4' if noise < 0.3 else '5'}"


def evaluate(config: Config, ctx: resweep.Context) -> dict[str, float | int | str]:
    rng = random.Random(f"{config.model}/{config.temperature}/{config.seed}")
    answers = [ask_model(config.model, f"2+2? (q{i})", config.temperature) for i in range(5)]
    correct = sum(a.endswith("4") for a in answers)
    ctx.log.info("answers: %s", answers)
    (ctx.dir / "answers.txt").write_text("\n".join(answers))
    # A flaky first attempt for some configs: `retries=1` below runs them again.
    digest = hashlib.sha256(ctx.name.encode()).digest()[0]
    if ctx.attempt == 1 and digest % 4 == 0:
        raise RuntimeError("model server answered 503, try again")
    return {"accuracy": correct / len(answers), "latency_ms": round(rng.uniform(20, 80), 1)}


experiment = resweep.Experiment(
    function=evaluate,
    configs=resweep.grid(
        Config, model=["tiny", "small", "large"], temperature=[0.0, 0.5, 1.0], seed=range(3)
    ),
    output_dir="results/quickstart",
    name="quickstart",
    description="Accuracy of three simulated models at three temperatures, three seeds each.",
    retries=1,
)

if __name__ == "__main__":
    experiment.run_cli()
