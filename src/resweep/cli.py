"""The command line: a thin fire class whose every method calls the public API."""

from __future__ import annotations

import datetime
import difflib
import inspect
import json as jsonlib
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from resweep import provenance
from resweep.errors import CacheMiss, ResweepError
from resweep.experiment import lookup
from resweep.store import WORKERS_DIR, read_markers

if TYPE_CHECKING:
    from resweep.experiment import Experiment
    from resweep.store import State

# Options whose values are names or patterns: always strings, never numbers.
_STRING_OPTIONS = ("--config", "--name", "--only", "--scheduler")
_NAME_COMMANDS = ("show",)


def _quote_names(argv: list[str]) -> list[str]:
    """Make fire take config names as strings: `show 007` means the config named '007'."""
    out = list(argv)
    for i, arg in enumerate(out):
        for option in _STRING_OPTIONS:
            if arg.startswith(option + "="):
                out[i] = f"{option}={out[i][len(option) + 1 :]!r}"
            elif arg == option and i + 1 < len(out):
                out[i + 1] = repr(argv[i + 1])
    if out and out[0] in _NAME_COMMANDS and len(out) > 1 and not out[1].startswith("--"):
        out[1] = repr(argv[1])
    return out


def _elapsed(start_time: str | None) -> str:
    if not start_time:
        return "?"
    try:
        started = datetime.datetime.fromisoformat(start_time)
    except ValueError:
        return "?"
    seconds = (datetime.datetime.now().astimezone() - started).total_seconds()
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def _changed_warning(changed: dict[str, str]) -> str | None:
    """The status line about done configs that older code produced, or None."""
    if not changed:
        return None
    function = sum(why == provenance.FUNCTION_CHANGED for why in changed.values())
    parts = [f"{function} by a different function"] if function else []
    if len(changed) > function:
        parts.append(f"{len(changed) - function} by other changes to its module")
    return (
        f"warning: {len(changed)} done configs were produced by code that differs from the "
        f"current code ({', '.join(parts)}); `run --rerun-changed` re-runs them, "
        "`run --dry-run --rerun-changed` lists them"
    )


def _count(state: State, names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        status = state.configs[name]["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


def _exit(code: int) -> NoReturn:
    sys.stdout.flush()
    raise SystemExit(code)


class CLI:
    """Run and inspect the experiment: run, status, replay, force_summary, clean_index, show."""

    def __init__(self, experiment: Experiment) -> None:
        self._experiment = experiment

    def run(
        self,
        max_workers: int = 1,
        retry_failed: bool = False,
        backend: str = "loky",
        scheduler: str | None = None,
        only: str | None = None,
        fresh: bool = False,
        dry_run: bool = False,
        rerun_changed: bool = False,
        break_lock: bool = False,
        progress: bool = True,
    ) -> None:
        """Run every config that is not done; Ctrl-C saves and stops (exit 130)."""
        if dry_run:
            print(
                self._experiment.plan(
                    retry_failed=retry_failed, only=only, rerun_changed=rerun_changed
                ).describe()
            )
            return
        from resweep.runner import pool_released_at_end

        with pool_released_at_end():  # this process ends with the run
            report = self._experiment.run(
                max_workers,
                retry_failed=retry_failed,
                backend=backend,
                only=only,
                fresh=fresh,
                progress=progress,
                break_lock=break_lock,
                scheduler=scheduler,
                rerun_changed=rerun_changed,
            )
        print(
            f"done {report.done}, failed {report.failed}, todo {report.todo}"
            + (f", interrupted {report.interrupted} ({report.signal})" if report.signal else "")
        )
        if report.failed:
            print("failed configs: `status --failed` lists them; `run --retry-failed` retries them")
        _exit(report.exit_code)

    def status(self, failed: bool = False, json: bool = False) -> None:
        """Counts by status, the configs running now, and with --failed each failure's error."""
        store = self._experiment.store
        state = store.read()
        counts = state.counts()
        running = {n: r for n, r in state.configs.items() if r["status"] == "running"}
        active = store.active_run()
        # With worker processes, a config handed to a busy worker is queued, not running yet.
        markers = store.root / WORKERS_DIR
        queued: set[str] = set()
        if running and active is not None and markers.is_dir():
            executing = read_markers(markers)
            queued = {n for n in running if n not in executing}
            for name in running.keys() - queued:
                started = datetime.datetime.fromtimestamp(executing[name][1]).astimezone()
                running[name] = {**running[name], "start_time": started.isoformat()}
        # Configs a dead run left running, read as the next run will settle them.
        left = store.left_running
        failures = {n: r.get("error") for n, r in state.configs.items() if r["status"] == "failed"}
        changed = provenance.changed_configs(
            state.configs, provenance.fingerprint(self._experiment.function)
        )
        warning = _changed_warning(changed)
        if json:
            hits = sum(r.get("cache_hits") or 0 for r in state.configs.values())
            misses = sum(r.get("cache_misses") or 0 for r in state.configs.values())
            payload: dict[str, Any] = {
                "name": state.name,
                "counts": counts,
                "total": len(state.configs),
                "running": {n: r.get("start_time") for n, r in running.items() if n not in queued},
                "queued": sorted(queued),
                "active_run": active.__dict__ if active else None,
                "left_running": {n: state.configs[n]["status"] for n in left},
                "cache": {"hits": hits, "misses": misses},
                "changed": len(changed),
                "warnings": [warning] if warning else [],
            }
            if failed:
                payload["failed"] = failures
            print(jsonlib.dumps(payload, indent=2))
            return
        title = state.name or self._experiment.store.root.name
        summary = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(f"{title}: {len(state.configs)} configs: {summary}")
        if left:
            print(
                f"{len(left)} left running by a run that stopped, now "
                + ", ".join(f"{v} {k}" for k, v in _count(state, left).items())
                + "; the next run runs the todo ones again"
            )
            for name in left:
                print(f"  {name}  {state.configs[name]['status']}")
        if running:
            if active is None:
                print(
                    f"{len(running)} left running by a run that stopped; the next run settles them"
                )
            else:
                print(f"running now ({active.describe()}):")
                for name, record in running.items():
                    if name not in queued:
                        print(f"  {name}  {_elapsed(record.get('start_time'))}")
                if queued:
                    print(f"{len(queued)} more handed to busy workers, not started yet")
        if failed:
            for name, error in failures.items():
                print(f"  {name}: {error}")
        if warning:
            print(warning)

    def replay(self, config: str | None = None) -> None:
        """Re-run done configs here with every cached call answered from the cache."""
        try:
            outcome = self._experiment.replay(config)
        except CacheMiss as miss:
            print(f"CacheMiss: {miss}", file=sys.stderr)
            _exit(2)
        replays = outcome if isinstance(outcome, list) else [outcome]
        for replay in replays:
            print(replay.describe())
        differ = sum(not r.equal for r in replays)
        print(f"replayed {len(replays)}: {len(replays) - differ} equal, {differ} differ")
        _exit(1 if differ else 0)

    def force_summary(self) -> None:
        """Write summary.csv now, whatever the configs' statuses."""
        print(self._experiment.save_summary(force=True))

    def clean_index(self) -> None:
        """Drop from the state the configs the script no longer declares."""
        dropped = self._experiment.clean_index()
        print(f"dropped {len(dropped)} configs" + "".join(f"\n  {n}" for n in dropped))

    def show(self, name: str) -> None:
        """Everything recorded about one config."""
        state = self._experiment.store.read_one(str(name))
        record = lookup(state, str(name))
        shown = {"name": str(name), **record}
        shown["provenance"] = provenance.describe_session(record.get("session"), state.sessions)
        if record.get("fingerprint") is not None:
            if not provenance.comparable(record["fingerprint"]):
                shown["code"] = "cannot tell, its fingerprint is in an older or unknown format"
            else:
                why = provenance.compare(
                    record["fingerprint"], provenance.fingerprint(self._experiment.function)
                )
                shown["code"] = "matches the current code" if why is None else f"differs, {why}"
        import yaml

        print(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True, width=100).rstrip())


def _check_options(args: list[str]) -> None:
    """Reject an unknown --option before the command runs (fire would only notice after)."""
    if not args or not hasattr(CLI, args[0]) or args[0].startswith("_"):
        return
    params = set(inspect.signature(getattr(CLI, args[0])).parameters) - {"self"}
    for arg in args[1:]:
        if arg == "--":
            return
        if not arg.startswith("--") or arg == "--help":
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        if key in params or (key.startswith("no") and key[2:] in params):
            continue
        close = difflib.get_close_matches(key, sorted(params), n=1)
        hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
        raise ResweepError(f"{args[0]} has no option --{key.replace('_', '-')}{hint}")


def main(experiment: Experiment, argv: list[str] | None = None) -> None:
    """Run the CLI; ResweepError becomes one line on stderr and exit status 2."""
    import fire

    raw = sys.argv[1:] if argv is None else argv
    try:
        _check_options(raw)
        fire.Fire(CLI(experiment), command=_quote_names(raw), name=sys.argv[0].rsplit("/", 1)[-1])
    except ResweepError as error:
        print(f"error: {error}", file=sys.stderr)
        _exit(2)
    except BrokenPipeError:
        # `exp.py show NAME | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _exit(0)
