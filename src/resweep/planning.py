"""What a run would do: new configs merged into the state, and which configs it takes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from resweep import identity, provenance
from resweep.encoding import encode_flow
from resweep.errors import ConfigError
from resweep.identity import NamedConfig
from resweep.selection import Selection
from resweep.state import State


def merge(
    state: State,
    named: dict[str, NamedConfig],
    *,
    name: str | None,
    description: str | None,
) -> bool:
    """Add configs that are new as todo; an existing name must not change its params.

    Returns whether the state changed.
    """
    changed_state = False
    for key, value in (("name", name), ("description", description)):
        if value is not None and getattr(state, key) != value:
            setattr(state, key, value)
            changed_state = True
    for config, named_config in named.items():
        params = named_config.params
        record = state.configs.get(config)
        if record is None:
            state.configs[config] = {
                "params": params,
                "status": "todo",
                "attempts": 0,
                "start_time": None,
                "end_time": None,
            }
            changed_state = True
            continue
        stored = record["params"]
        if stored == params:
            continue
        # Fields added (with a default) or removed since keep the identity; a changed value does not.
        changed = _changed_params(stored, params)
        if changed:
            key, old, new = changed[0]
            raise ConfigError(
                f"config name {config!r} is stored with {key}={old!r}, but now has {key}={new!r}; "
                "config_naming must give different configs different names"
            )
        regrouped = _regrouped(stored, params)
        if regrouped:
            raise ConfigError(
                f"config name {config!r} is stored for {stored!r}, but now names {params!r}, "
                f"another config whose key {regrouped!r} is nested otherwise; remove the stored "
                "one from the state or give the configs a config_naming"
            )
        if json.dumps(record["params"], sort_keys=True) != json.dumps(params, sort_keys=True):
            record["params"] = params
            changed_state = True
    return changed_state


def _changed_params(
    stored: dict[str, Any], params: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """The (dotted) keys both sides have with different values; nested dicts may grow fields."""
    changed = []
    for key in stored.keys() & params.keys():
        old, new = stored[key], params[key]
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_params(old, new, f"{prefix}{key}.")
        elif not _same_param(old, new):
            changed.append((f"{prefix}{key}", old, new))
    return changed


def _regrouped(stored: dict[str, Any], params: dict[str, Any]) -> str | None:
    """A dotted key both sides have at different depths: {"a.b": 1} is not {"a": {"b": 1}},
    though both flatten to a.b=1 (a name an older resweep gave the first)."""
    old, new = _paths(stored), _paths(params)
    return next((key for key in sorted(old.keys() & new.keys()) if old[key] != new[key]), None)


def _paths(value: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Each flattened key with the keys it is made of."""
    out: dict[str, tuple[str, ...]] = {}
    for key, item in value.items():
        path = (*prefix, key)
        if isinstance(item, dict) and item:
            out.update(_paths(item, path))
        else:
            out[".".join(path)] = path
    return out


def _same_param(old: Any, new: Any) -> bool:
    """Python's equality, except that NaN equals NaN: a NaN param is still the same config."""
    if isinstance(old, float) and isinstance(new, float) and old != old and new != new:
        return True
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(map(_same_param, old, new))
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same_param(old[k], new[k]) for k in old)
    return bool(old == new)


@dataclass
class Plan:
    """What a run would do: the configs it would run, by why, and those it would leave."""

    new: list[str]
    todo: list[str]
    failed: list[str]
    changed: list[str]
    done: int
    skipped_failed: int
    running: list[str]

    @property
    def to_run(self) -> list[str]:
        return [*self.new, *self.todo, *self.failed, *self.changed]

    def describe(self, *, names: bool = True) -> str:
        lines = [
            f"would run {len(self.to_run)} configs: {len(self.new)} new, {len(self.todo)} todo, "
            f"{len(self.failed)} failed, {len(self.changed)} done but changed; "
            f"would leave {self.done} done"
            + (
                f" and {self.skipped_failed} failed (add --retry-failed)"
                if self.skipped_failed
                else ""
            )
        ]
        if self.running:
            lines.append(f"{len(self.running)} are marked running by another or a stopped run")
        if names:
            for label, group in (("new", self.new), ("todo", self.todo), ("failed", self.failed)):
                lines += [f"  {label:7} {n}" for n in group]
            lines += [f"  changed {n}" for n in self.changed]
        return "\n".join(lines)


def plan(
    state: State,
    named: dict[str, NamedConfig],
    *,
    retry_failed: bool,
    selection: Selection,
    rerun_changed: bool,
    fingerprint: str | None,
) -> Plan:
    """Decide which configs a run takes; reads the state, changes nothing.

    A selection that matches no config is a SelectionError.
    """
    result = Plan([], [], [], [], 0, 0, [])
    chosen = (
        named if selection.everything else selection.choose({n: c.params for n, c in named.items()})
    )
    for name in chosen:
        record = state.configs.get(name)
        status = record["status"] if record is not None else None
        if record is None:
            result.new.append(name)
        elif status in ("todo", "running"):
            # A config left running by a dead run is todo again (or done, once settled).
            result.todo.append(name)
            if status == "running":
                result.running.append(name)
        elif status == "failed":
            if retry_failed:
                result.failed.append(name)
            else:
                result.skipped_failed += 1
        elif (
            rerun_changed
            and fingerprint is not None
            and provenance.compare(record.get("fingerprint"), fingerprint)
            == provenance.FUNCTION_CHANGED
        ):
            # The function or code it calls changed. Edits elsewhere in its module are not a
            # change, nor is a fingerprint that cannot be compared (an unknown format).
            result.changed.append(name)
        else:
            result.done += 1
    return result


def finished_key(
    configs: Sequence[Any] | None,
    config_naming: Any,
    name: str | None,
    description: str | None,
) -> str | None:
    """What a finished sweep's marker must match: its configs, default names, name, description.

    None when the configs come from the state file or from config_naming, which no digest
    of the configs can vouch for.
    """
    if not isinstance(configs, Sequence) or config_naming is not None:
        return None
    digest = identity.configs_digest(configs)
    if digest is None:
        return None
    about = encode_flow([name, description])
    return f"{digest}.{hashlib.sha256(about.encode()).hexdigest()[:16]}"
