"""A sweep on Dask: a local cluster on a laptop, or any cluster by its scheduler address.

    python experiments/dask_example.py run --backend dask --max-workers 4
    python experiments/dask_example.py run --backend dask --scheduler tcp://10.0.0.5:8786

Kill it whenever you like and run it again: it continues where it stopped, on whatever
cluster you give it then. `replay --config NAME` re-runs a config here, from its recorded
calls, without calling the "model" again.
"""

from __future__ import annotations

import random
import socket
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
    """Stands in for an expensive, non-deterministic request; recorded on the worker."""
    time.sleep(random.uniform(0.05, 0.2))
    return f"{model}: {'4' if random.random() * temperature < 0.3 else '5'}"


def evaluate(config: Config, ctx: resweep.Context) -> dict[str, float | str]:
    answers = [ask_model(config.model, f"2+2? (q{i})", config.temperature) for i in range(4)]
    ctx.log.info("answers on %s: %s", socket.gethostname(), answers)
    # On a worker without the output directory, ctx.dir is scratch that resweep deletes when
    # this returns: copy what you want to keep to durable storage here.
    (ctx.dir / "answers.txt").write_text("\n".join(answers))
    return {"accuracy": sum(a.endswith("4") for a in answers) / len(answers)}


experiment = resweep.Experiment(
    function=evaluate,
    configs=resweep.grid(Config, model=["small", "large"], temperature=[0.2, 1.0], seed=range(3)),
    output_dir="results/dask_example",
    name="dask-example",
    timeout_s=120,
)

if __name__ == "__main__":
    experiment.run_cli()
