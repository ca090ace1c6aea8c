"""The command line: a thin fire class whose every method calls the public API."""

from __future__ import annotations

import datetime
import difflib
import inspect
import json as jsonlib
import os
import sys
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from resweep.errors import CacheMiss, HookError, ResweepError, ResweepWarning
from resweep.options import Backend, RunOptions
from resweep.pools.local import pool_released_at_end
from resweep.selection import parse_where

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from resweep.planning import Plan
    from resweep.replay import Replay
    from resweep.runner import RunReport
    from resweep.status import StatusReport
    from resweep.store import Store


class Commands(Protocol):
    """What the command line asks of an experiment: resweep.Experiment's public methods."""

    @property
    def store(self) -> Store: ...

    def run_with(self, options: RunOptions) -> RunReport: ...

    def plan(
        self,
        *,
        retry_failed: bool = False,
        only: str | None = None,
        where: Mapping[str, Any] | None = None,
        rerun_changed: bool = False,
    ) -> Plan: ...

    def status_report(self, *, where: Mapping[str, Any] | None = None) -> StatusReport: ...

    def config_report(self, name: str) -> dict[str, Any]: ...

    def replay(
        self,
        name: str | None = None,
        *,
        pdb: bool = False,
        allow_pickle: bool = True,
        failed: bool = False,
        where: Mapping[str, Any] | None = None,
    ) -> Replay | list[Replay]: ...

    def save_summary(
        self, force: bool = False, *, where: Mapping[str, Any] | None = None
    ) -> Path: ...

    def clean_index(self) -> list[str]: ...


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


def _gather_where(argv: list[str]) -> list[str]:
    """Every --where KEY=GLOB as one option holding their list: fire would keep only the last."""
    out: list[str] = []
    found: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        if arg.startswith("--where="):
            found.append(arg[len("--where=") :])
        elif arg == "--where":
            if i + 1 >= len(argv):
                raise ResweepError("--where takes KEY=GLOB, like --where model='gpt-*'")
            found.append(argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    if found:
        out.insert(1 if out else 0, f"--where={found!r}")
    return out


def _where(where: Any) -> dict[str, list[str]] | None:
    """--where as fire hands it over (after _gather_where, a list of KEY=GLOB), as a mapping."""
    if where is None:
        return None
    return parse_where(where if isinstance(where, list | tuple) else [where])


def _elapsed(start_time: str | None) -> str:
    if not start_time:
        return "?"
    try:
        started = datetime.datetime.fromisoformat(start_time)
    except ValueError:
        return "?"
    seconds = (datetime.datetime.now().astimezone() - started).total_seconds()
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


# How often `status --watch` reads the experiment again.
WATCH_EVERY_S = 1.0


def _exit(code: int) -> NoReturn:
    sys.stdout.flush()
    raise SystemExit(code)


class CLI:
    """Run and inspect the experiment: run, status, replay, force_summary, clean_index, show,
    plugins."""

    def __init__(self, experiment: Commands) -> None:
        self._experiment = experiment

    def run(
        self,
        max_workers: int = 1,
        retry_failed: bool = False,
        reuse_calls: bool = False,
        backend: Backend = "loky",
        scheduler: str | None = None,
        only: str | None = None,
        where: Any = None,
        fresh: bool = False,
        dry_run: bool = False,
        rerun_changed: bool = False,
        break_lock: bool = False,
        progress: bool = True,
        fail_fast: bool = False,
    ) -> None:
        """Run every config that is not done; Ctrl-C saves and stops (exit 130).

        --only GLOB takes the configs whose names match; --where KEY=GLOB (repeatable) those whose
        field KEY (dotted for nested) matches GLOB."""
        options = RunOptions(
            max_workers=max_workers,
            retry_failed=retry_failed,
            reuse_calls=reuse_calls,
            backend=backend,
            scheduler=scheduler,
            only=only,
            where=_where(where),
            fresh=fresh,
            rerun_changed=rerun_changed,
            break_lock=break_lock,
            progress=progress,
            fail_fast=fail_fast,
        )
        if dry_run:
            print(
                self._experiment.plan(
                    retry_failed=retry_failed,
                    only=options.only,
                    where=options.where,
                    rerun_changed=rerun_changed,
                ).describe()
            )
            return
        with pool_released_at_end():  # this process ends with the run
            report = self._experiment.run_with(options)
        print(
            f"done {report.done}, failed {report.failed}, todo {report.todo}"
            + (f", interrupted {report.interrupted} ({report.signal})" if report.signal else "")
        )
        if report.cache_hits or report.cache_misses:
            print(
                f"cache: {report.cache_hits} calls answered from earlier attempts, "
                f"{report.cache_misses} made"
            )
        if report.failed:
            print("failed configs: `status --failed` lists them; `run --retry-failed` retries them")
        if report.absent:
            shown = ", ".join(report.absent[:5]) + (", ..." if len(report.absent) > 5 else "")
            print(
                f"{len(report.absent)} configs in the state are no longer in the script and will "
                f"never run: {shown}; `clean_index` drops them"
            )
        if report.summary is not None:
            print(f"summary written to {report.summary}")
        _exit(report.exit_code)

    def status(
        self, failed: bool = False, json: bool = False, where: Any = None, watch: bool = False
    ) -> None:
        """Counts by status, the configs running now, and with --failed each failure's error;
        --where KEY=GLOB counts only the configs whose fields match; --watch refreshes it every
        second until the run ends (Ctrl-C stops watching, exit 0)."""
        selected = _where(where)
        if watch:
            if json:
                raise ResweepError("status --watch is for a person; use --json without --watch")
            self._watch(selected)
            return
        report = self._experiment.status_report(where=selected)
        if json:
            print(jsonlib.dumps(report.as_json(failed=failed), indent=2))
            return
        title = report.name or self._experiment.store.root.name
        summary = ", ".join(f"{k} {v}" for k, v in report.counts.items())
        print(f"{title}: {report.total} configs: {summary}")
        left = report.left_running
        if left:
            settled = Counter(left.values())
            print(
                f"{len(left)} left running by a run that stopped, now "
                + ", ".join(f"{v} {k}" for k, v in settled.items())
                + "; the next run runs the todo ones again"
            )
            for name, status in left.items():
                print(f"  {name}  {status}")
        if report.running or report.queued:
            if report.active_run is None:
                print(
                    f"{len(report.running)} left running by a run that stopped; "
                    "the next run settles them"
                )
            else:
                print(f"running now ({report.active_run.describe()}):")
                for name, start_time in report.running.items():
                    print(f"  {name}  {_elapsed(start_time)}")
                if report.queued:
                    print(f"{len(report.queued)} more handed to busy workers, not started yet")
        if failed:
            from resweep.status import printable

            for name, error in report.failures.items():
                print(f"  {name}: {printable(str(error))}")
        warning = report.changed_warning
        if warning:
            print(warning)
        note = report.changed_note
        if note:
            print(note)

    def _watch(self, where: Mapping[str, Any] | None) -> None:
        """Draw the snapshot again every WATCH_EVERY_S until no run is active.

        On a terminal it is redrawn in place; into a pipe or a file each snapshot follows the
        last one, without cursor codes, separated by a blank line.
        """
        import shutil
        import time

        from resweep.status import snapshot_lines

        terminal = sys.stdout.isatty()
        drawn = 0
        watched = False
        try:
            while True:
                report = self._experiment.status_report(where=where)
                active = report.active_run is not None
                watched = watched or active
                if terminal:
                    size = shutil.get_terminal_size()
                    # One column spare: a line that fills the last one wraps on some terminals.
                    lines = snapshot_lines(
                        report, width=size.columns - 1, height=max(3, size.lines - 2)
                    )
                    # Back to the first line of the last snapshot, and clear down from there.
                    up = f"\x1b[{drawn}A" if drawn else ""
                    sys.stdout.write(f"{up}\r\x1b[J" + "\n".join(lines) + "\n")
                    drawn = len(lines)
                else:
                    lines = snapshot_lines(report, width=10_000)
                    sys.stdout.write(("\n" if drawn else "") + "\n".join(lines) + "\n")
                    drawn = len(lines)
                sys.stdout.flush()
                if not active:
                    break
                time.sleep(WATCH_EVERY_S - time.time() % WATCH_EVERY_S)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            _exit(0)  # watching stopped, as asked: nothing failed
        print("the run ended" if watched else "nothing to watch")

    def replay(
        self,
        config: str | None = None,
        failed: bool = False,
        pdb: bool = False,
        no_pickle: bool = False,
        where: Any = None,
    ) -> None:
        """Re-run configs here with every cached call answered from the cache: one config, done
        or failed, or every done one (and failed one, with --failed); --pdb debugs an exception;
        --where KEY=GLOB replays only the configs whose fields match."""
        selected = _where(where)
        if config is not None:
            try:
                outcome = self._experiment.replay(
                    str(config), pdb=pdb, allow_pickle=not no_pickle, where=selected
                )
            except CacheMiss as miss:
                print(f"CacheMiss: {miss}", file=sys.stderr)
                _exit(2)
            except ResweepError:
                raise  # bad input: one line, exit 2
            except Exception as error:  # the config's own exception, raised again
                _print_user_traceback(error)
                _exit(1)
            replays = outcome if isinstance(outcome, list) else [outcome]
        else:
            found = self._experiment.replay(
                None, pdb=pdb, failed=failed, allow_pickle=not no_pickle, where=selected
            )
            replays = found if isinstance(found, list) else [found]
        kinds = Counter(replay.kind for replay in replays)
        for replay in replays:
            if replay.kind != "equal" or config is not None:
                print(replay.describe())
        print(
            f"replayed {len(replays)}: {kinds['equal']} equal, {kinds['differ']} differ, "
            f"{kinds['cache miss']} cache miss, {kinds['raised']} raised"
        )
        _exit(2 if kinds["cache miss"] else 1 if kinds["differ"] or kinds["raised"] else 0)

    def force_summary(self, where: Any = None) -> None:
        """Write summary.csv now, whatever the configs' statuses; with --where KEY=GLOB, of the
        configs whose fields match."""
        print(self._experiment.save_summary(force=True, where=_where(where)))

    def clean_index(self) -> None:
        """Drop from the state the configs the script no longer declares."""
        dropped = self._experiment.clean_index()
        print(f"dropped {len(dropped)} configs" + "".join(f"\n  {n}" for n in dropped))

    def show(self, name: str) -> None:
        """Everything recorded about one config."""
        shown = self._experiment.config_report(str(name))
        import yaml

        print(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True, width=100).rstrip())

    def plugins(self) -> None:
        """The hooks and backends installed, by id, with the distribution each comes from."""
        from resweep import plugins

        for kind, title in (("hook", "hooks"), ("backend", "backends")):
            found = plugins.installed(kind)  # type: ignore[arg-type]
            print(f"{title} ({plugins.GROUPS[kind]}):")  # type: ignore[index]
            if kind == "backend":
                print(f"  {', '.join(plugins.BUILTIN_BACKENDS)}  (resweep's own)")
            if not found and kind == "hook":
                print("  none installed")
            for plugin in found:
                shadowed = (
                    f"  shadowed: resweep's own {plugin.id} is used" if plugin.shadowed else ""
                )
                print(f"  {plugin.id}  {plugin.target}  ({plugin.source}){shadowed}")


def _print_user_traceback(error: BaseException) -> None:
    """The traceback of a config's own exception, from its own code down: resweep's frames and
    python-fire's above it say nothing about the config."""
    import traceback

    tb = error.__traceback__
    package = os.path.dirname(os.path.abspath(__file__))
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package):
        tb = tb.tb_next
    print("Traceback (most recent call last):", file=sys.stderr)
    print("".join(traceback.format_tb(tb)), end="", file=sys.stderr)
    print("".join(traceback.format_exception_only(error)), end="", file=sys.stderr)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_options(args: list[str]) -> None:
    """Reject an unknown --option before the command runs (fire would only notice after)."""
    if not args or not hasattr(CLI, args[0]) or args[0].startswith("_"):
        return
    params = set(inspect.signature(getattr(CLI, args[0])).parameters) - {"self"}
    for arg in args[1:]:
        if arg == "--":
            return
        if arg.startswith("-") and not arg.startswith("--") and arg not in ("-", "-h"):
            if _is_number(arg):
                continue
            # fire would take -d for --dry-run and -f for --fresh, and ignore -dryrun: refuse.
            raise ResweepError(
                f"{args[0]} takes options with two dashes: {arg!r} is not one; "
                f"did you mean --{arg.lstrip('-')}?"
            )
        if not arg.startswith("--") or arg == "--help":
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        if key in params or (key.startswith("no") and key[2:] in params):
            continue
        close = difflib.get_close_matches(key, sorted(params), n=1)
        hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
        raise ResweepError(f"{args[0]} has no option --{key.replace('_', '-')}{hint}")


_format_warning = warnings.formatwarning


def _one_line_warning(
    message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
) -> str:
    """resweep's own warnings as one line, like its errors; any other warning as Python says it."""
    if issubclass(category, ResweepWarning):
        return f"warning: {message}\n"
    return _format_warning(message, category, *args, **kwargs)


def main(experiment: Commands, argv: list[str] | None = None) -> None:
    """Run the CLI; ResweepError becomes one line on stderr and exit status 2."""
    import fire

    raw = sys.argv[1:] if argv is None else argv
    # resweep's own warnings are one line on a terminal, like its errors.
    warnings.formatwarning = _one_line_warning
    try:
        _check_options(raw)
        command = _quote_names(_gather_where(raw))
        fire.Fire(CLI(experiment), command=command, name=sys.argv[0].rsplit("/", 1)[-1])
    except HookError as error:
        # Not bad input: the run went and a hook stopped it, its state saved.
        print(f"error: {error}", file=sys.stderr)
        _exit(1)
    except ResweepError as error:
        print(f"error: {error}", file=sys.stderr)
        _exit(2)
    except KeyboardInterrupt:
        # Ctrl-C outside a run's own handling (setup.common, starting a cluster): nothing ran.
        print("interrupted", file=sys.stderr)
        _exit(130)
    except BrokenPipeError:
        # `exp.py show NAME | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _exit(0)
