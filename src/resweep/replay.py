"""Replay: re-run finished configs here with every cached call answered from the cache."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resweep import cache
from resweep.errors import CacheMiss, ResweepError
from resweep.files import check_layout
from resweep.hooks import ConfigOutcome, Hooks
from resweep.identity import NamedConfig, flatten
from resweep.recovery import read_settled
from resweep.selection import Selection
from resweep.worker import Context, error_line, takes_context, to_plain_result

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
    # What the replay raised, if it did: a CacheMiss, or the config's own exception again.
    error: BaseException | None = None

    @property
    def equal(self) -> bool:
        return self.error is None and not self.differences

    @property
    def kind(self) -> str:
        """equal, differ, cache miss or raised: the count it goes under."""
        if isinstance(self.error, CacheMiss):
            return "cache miss"
        if self.error is not None:
            return "raised"
        return "differ" if self.differences else "equal"

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.name}: {self.kind}: {type(self.error).__name__}: {self.error}"
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
    """During replay, ctx.log and its records go to the terminal of the person debugging,
    each line prefixed with the config's name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        prefixed = "".join(f"[{self.name}] {line}" for line in text.splitlines(keepends=True))
        sys.stderr.write(prefixed)
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def replay_experiment(
    experiment: Declared,
    name: str | None,
    *,
    failed: bool = False,
    pdb: bool = False,
    allow_pickle: bool = True,
    selection: Selection | None = None,
    hooks: Hooks | None = None,
) -> Replay | list[Replay]:
    """Re-run configs in this process; every cached call answered from the cache, none made.

    With a name: that config, done or failed; a failed one replays its last attempt's calls and
    raises its exception again. Without: every done config (and failed one, with failed),
    each reported, none stopping the others. pdb: the post-mortem debugger at an exception.
    A selection narrows either to the configs whose fields match it.
    hooks, when given, hear the replay as a run (context.backend "replay", no session).
    """
    store = experiment.store
    state, _ = read_settled(store)
    check_layout(store.root)  # replay opens the cache: never through a link
    chosen = None
    if selection is not None and not selection.everything:
        params = {n: r.get("params") for n, r in state.configs.items()}
        if name is not None:
            state.lookup(str(name))  # an unknown name says so first
            params = {str(name): params[str(name)]}
        chosen = set(selection.choose(params))
    if name is not None:
        record = state.lookup(str(name))
        if record["status"] not in ("done", "failed"):
            raise ResweepError(
                f"config {name!r} is {record['status']}; only done and failed configs replay"
            )
        names = [str(name)]
    else:
        wanted = ("done", "failed") if failed else ("done",)
        names = [
            n
            for n, r in state.configs.items()
            if r["status"] in wanted and (chosen is None or n in chosen)
        ]
    named = experiment.named_configs() if experiment.configs is not None else {}
    setup = experiment.setup
    value = setup.common() if setup is not None and setup.common else None
    if setup is not None and setup.per_worker is not None:
        setup.per_worker(value)
    if hooks:
        hooks.run_start()
        hooks.check()
    replays = []
    for n in names:
        record = state.configs[n]
        attempt = record.get("attempts", 1)
        if hooks:
            hooks.fire("on_config_start", config=n, attempt=attempt, params=record["params"])
        replay = _replay_one(
            experiment, record, n, named, pdb=pdb, alone=name is not None,
            allow_pickle=allow_pickle,
        )  # fmt: skip
        replays.append(replay)
        if hooks:
            outcome = ConfigOutcome(
                name=n,
                status="done" if replay.error is None else "failed",
                attempt=attempt,
                result=replay.result,
                error=None if replay.error is None else error_line(replay.error),
            )
            hooks.fire("on_config_end", outcome, config=n, attempt=attempt, params=record["params"])
    if hooks:
        from resweep.runner import RunReport

        raised = sum(r.error is not None for r in replays)
        hooks.run_end(
            RunReport(
                done=len(replays) - raised,
                failed=raised,
                todo=0,
                interrupted=0,
                executed=len(replays),
                cache_hits=sum(r.cache_hits for r in replays),
            )
        )
        hooks.check()
    return replays[0] if name is not None else replays


def _replay_one(
    experiment: Declared,
    record: dict[str, Any],
    name: str,
    named: dict[str, NamedConfig],
    *,
    pdb: bool,
    alone: bool,
    allow_pickle: bool,
) -> Replay:
    config = named[name].config if name in named else record["params"]
    attempt = record.get("attempts", 1)
    # A failed attempt's calls were kept apart as its record: the replay reads those.
    calls = name if record["status"] == "done" else cache.attempt_record(name, attempt)
    stats = cache.CallStats()
    stored = record.get("result")
    with tempfile.TemporaryDirectory(prefix=f"resweep-replay-{name[:40]}-") as tmp:
        ctx = Context(
            name=name,
            config=config,
            dir=Path(tmp),
            shared=experiment.context,
            attempt=attempt,
            log_stream=_StderrLog(name),
        )
        output_dir = experiment.store.root if experiment.cache else None
        function = experiment.function
        try:
            with cache.scope(output_dir, calls, "replay", stats, allow_pickle=allow_pickle):
                raw = function(config, ctx) if takes_context(function) else function(config)
            result = to_plain_result(raw)
        except Exception as error:
            if pdb:
                import pdb as debugger

                debugger.post_mortem(error.__traceback__)
            if alone:
                raise  # a CacheMiss, or the config's own exception with its own traceback
            return Replay(name, None, stored, [], stats.hits, error)
    return Replay(name, result, stored, differences(result, stored), stats.hits)
