"""Replay: re-run finished configs here with every cached call answered from the cache."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resweep import cache
from resweep.errors import ResweepError
from resweep.files import check_layout
from resweep.identity import flatten
from resweep.recovery import read_settled
from resweep.worker import Context, takes_context, to_plain_result

if TYPE_CHECKING:
    from resweep.runner import Declared

_MISSING = object()


@dataclass
class Replay:
    """One replayed config: its new result, the stored one, and how they differ."""

    name: str
    result: Any
    stored: Any
    differences: list[str]
    cache_hits: int

    @property
    def equal(self) -> bool:
        return not self.differences

    def describe(self) -> str:
        if self.equal:
            return f"{self.name}: replayed result equals the stored one ({self.cache_hits} cached calls)"
        lines = [f"{self.name}: replayed result differs from the stored one:"]
        lines += [f"  {d}" for d in self.differences]
        return "\n".join(lines)


def _flat(value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return flatten(value)
    return {"(result)": value}


def differences(new: Any, old: Any) -> list[str]:
    """Key-by-key differences between two results ('key: stored -> replayed')."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if json.dumps(va, sort_keys=True, default=repr) != json.dumps(
            vb, sort_keys=True, default=repr
        ):
            show_a = "(missing)" if va is _MISSING else repr(va)
            show_b = "(missing)" if vb is _MISSING else repr(vb)
            out.append(f"{key}: stored {show_a}, replayed {show_b}")
    return out


class _StderrLog:
    """During replay, ctx.log and its records go to the terminal of the person debugging."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def replay_experiment(experiment: Declared, name: str | None) -> Replay | list[Replay]:
    """Re-run done configs in this process; any call missing from the cache raises CacheMiss."""
    store = experiment.store
    state, _ = read_settled(store)
    check_layout(store.root)  # replay opens the cache: never through a link
    if name is not None:
        record = state.lookup(str(name))
        if record["status"] != "done":
            raise ResweepError(
                f"config {name!r} is {record['status']}; only done configs can be replayed"
            )
        names = [str(name)]
    else:
        names = [n for n, r in state.configs.items() if r["status"] == "done"]
    named = experiment.named_configs() if experiment.configs is not None else {}
    setup = experiment.setup
    value = setup.common() if setup is not None and setup.common else None
    if setup is not None and setup.per_worker is not None:
        setup.per_worker(value)
    takes_ctx = takes_context(experiment.function)
    replays = []
    for config_name in names:
        record = state.configs[config_name]
        config = named[config_name].config if config_name in named else record["params"]
        stats = cache.CallStats()
        with tempfile.TemporaryDirectory(prefix=f"resweep-replay-{config_name[:40]}-") as tmp:
            ctx = Context(
                name=config_name,
                config=config,
                dir=Path(tmp),
                shared=experiment.context,
                attempt=record.get("attempts", 1),
                log_stream=_StderrLog(),
            )
            output_dir = store.root if experiment.cache else None
            with cache.scope(output_dir, config_name, "replay", stats):
                raw = experiment.function(config, ctx) if takes_ctx else experiment.function(config)
        result = to_plain_result(raw)
        stored = record.get("result")
        replays.append(Replay(config_name, result, stored, differences(result, stored), stats.hits))
    return replays[0] if name is not None else replays
