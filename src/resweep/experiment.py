"""Experiment: what a user declares, and the methods that run and inspect it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resweep import identity, provenance
from resweep.errors import ConfigError, ResweepError
from resweep.hooks import HookSpecs, merge_hooks
from resweep.identity import NamedConfig
from resweep.options import Backend, RunOptions
from resweep.selection import Selection
from resweep.state import ConfigRecord, State
from resweep.store import Store
from resweep.worker import WorkerSetup

if TYPE_CHECKING:
    import pandas as pd

    from resweep.planning import Plan
    from resweep.replay import Replay
    from resweep.runner import RunReport
    from resweep.status import StatusReport


@dataclass(kw_only=True)
class Experiment:
    """A function, the configs to run it on, and the directory that keeps every outcome."""

    function: Callable[..., Any]
    configs: Sequence[Any] | None
    output_dir: str | os.PathLike[str]
    name: str | None = None
    description: str | None = None
    config_naming: Callable[[Any], str] | None = None
    # Handed to every run as ctx.shared.
    context: Any = None
    setup: WorkerSetup | None = None
    cache: bool = True
    timeout_s: float | None = None
    retries: int = 0
    # Lifecycle hooks: objects, classes, functions (event, context, payload=None), dotted
    # paths, or plugin ids; a sweep file's `hooks:` come after these.
    hooks: Sequence[Any] = ()
    # Whether a hook that raises stops the run; None: the sweep file's setting, else True.
    hooks_fail_fast: bool | None = None
    # Settings by namespace handed to every hook (context.extensions); over the sweep file's.
    extensions: Mapping[str, Any] | None = None
    _named: dict[str, NamedConfig] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise ConfigError("Experiment.function must be callable")
        if isinstance(self.configs, str | bytes) or (
            self.configs is not None and not isinstance(self.configs, Sequence)
        ):
            # Not iterable at all (configs=42): named_configs refuses it, inside the CLI's care.
            with contextlib.suppress(TypeError):
                self.configs = list(self.configs) if self.configs is not None else None
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be a whole number >= 0, not {self.retries!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(
                f"timeout_s must be a positive number of seconds or None, not {self.timeout_s!r}"
            )
        if self.setup is not None and not isinstance(self.setup, WorkerSetup):
            raise ConfigError("setup must be a resweep.WorkerSetup(common, per_worker)")
        if isinstance(self.hooks, str | bytes) or not isinstance(self.hooks, Sequence):
            self.hooks = [self.hooks]  # one hook given alone
        if self.extensions is not None and not isinstance(self.extensions, Mapping):
            raise ConfigError(f"extensions must be a mapping, not {type(self.extensions).__name__}")

    def hook_specs(self) -> HookSpecs:
        """The hooks a run loads: this experiment's, then its sweep file's (load_configs)."""
        from resweep.sweeps import SweepConfigs

        sweep = self.configs if isinstance(self.configs, SweepConfigs) else SweepConfigs()
        fail_fast = self.hooks_fail_fast
        if fail_fast is None:
            fail_fast = sweep.hooks_fail_fast if sweep.hooks_fail_fast is not None else True
        return HookSpecs(
            hooks=merge_hooks(self.hooks, sweep.hooks),
            fail_fast=fail_fast,
            extensions={**sweep.extensions, **(self.extensions or {})},
        )

    @property
    def store(self) -> Store:
        return Store(self.output_dir)

    def named_configs(self) -> dict[str, NamedConfig]:
        """Every config by name with its canonical params; bad names fail here, before any run."""
        if self._named is None:
            if self.configs is None:
                state = self.read_state()
                fix = "rename it in experiment.yaml, or give the experiment its configs"
                for name in state.configs:
                    identity.check_name(name, "experiment.yaml", fix)
                self._named = {
                    n: NamedConfig(r["params"], r["params"]) for n, r in state.configs.items()
                }
            else:
                if not isinstance(self.configs, Sequence):
                    raise ConfigError(
                        f"configs is a {type(self.configs).__name__}; give a list of dataclass "
                        "instances or dicts"
                    )
                try:
                    named = identity.name_configs(self.configs, self.config_naming)
                except ConfigError as error:
                    if ";" in str(error):
                        raise
                    raise ConfigError(f"{error}; fix configs or config_naming") from None
                if any(c.former is not None for c in named.values()) and self.store.exists():
                    # A state from an older resweep may hold some of them under former names.
                    named = identity.keep_stored_names(named, self.read_state().configs)
                self._named = named
        return self._named

    def read_state(self) -> State:
        """The state as a reader should believe it (configs a dead run left running, settled)."""
        from resweep.recovery import read_settled

        return read_settled(self.store)[0]

    # -- running --------------------------------------------------------------------------

    def run(
        self,
        max_workers: int = 1,
        *,
        retry_failed: bool = False,
        reuse_calls: bool = False,
        backend: Backend | str = "loky",
        only: str | None = None,
        where: Mapping[str, Any] | None = None,
        fresh: bool = False,
        progress: bool = True,
        break_lock: bool = False,
        scheduler: str | None = None,
        rerun_changed: bool = False,
        fail_fast: bool = False,
    ) -> RunReport:
        """Run every todo config (and failed ones with retry_failed); resumable at any point.

        A failed attempt's cached calls are kept as its record; the next attempt asks afresh,
        unless reuse_calls answers a retried failed config from that record. only is a glob on
        names, where a mapping of field (dotted for nested) to glob, or list of globs:
        where={"model": "gpt-*", "temperature": 0.7}. A selection that matches no config is a
        SelectionError.

        Beyond the contract: break_lock takes over a lock whose holder cannot be proven dead,
        scheduler is a Dask scheduler address, rerun_changed also runs done configs whose code
        fingerprint differs from the current code.
        """
        options = RunOptions(
            max_workers=max_workers,
            retry_failed=retry_failed,
            reuse_calls=reuse_calls,
            backend=backend,
            only=only,
            where=where,
            fresh=fresh,
            progress=progress,
            break_lock=break_lock,
            scheduler=scheduler,
            rerun_changed=rerun_changed,
            fail_fast=fail_fast,
        )
        return self.run_with(options)

    def run_with(self, options: RunOptions) -> RunReport:
        """run(), with its options already checked in a RunOptions (the command line's way)."""
        from resweep import runner

        return runner.run_experiment(self, options)

    def plan(
        self,
        *,
        retry_failed: bool = False,
        only: str | None = None,
        where: Mapping[str, Any] | None = None,
        rerun_changed: bool = False,
    ) -> Plan:
        """What run() would do now, by category; reads the state and writes nothing.

        Refuses what run() would refuse before it starts: a bad config, an unknown hook.
        """
        from resweep import planning
        from resweep.hooks import prepare

        selection = Selection.of(only, where)
        named = self.named_configs()
        prepare(
            self.hook_specs(),
            output_dir=self.store.root,
            experiment=self.name,
            backend="dry-run",
            max_workers=1,
        )
        # Read as the run would find it: configs a dead run left running, settled.
        state = self.read_state() if self.store.exists() else State()
        return planning.plan(
            state,
            named,
            retry_failed=retry_failed,
            selection=selection,
            rerun_changed=rerun_changed,
            fingerprint=provenance.fingerprint(self.function),
        )

    def status(self, *, where: Mapping[str, Any] | None = None) -> dict[str, int]:
        """Counts of configs by status: todo, running, done, failed (of those where selects)."""
        state = self.read_state()
        selection = Selection.of(None, where)
        if selection.everything:
            return state.counts()
        chosen = selection.choose({n: r.get("params") for n, r in state.configs.items()})
        return State(configs={n: state.configs[n] for n in chosen}).counts()

    def status_report(self, *, where: Mapping[str, Any] | None = None) -> StatusReport:
        """What `status` prints: counts, configs running now, failures, code changes."""
        from resweep.status import status_report

        code = provenance.code_digests(self.function)
        return status_report(
            self.store,
            provenance.fingerprint_of(self.function, code),
            Selection.of(None, where),
            code=code,
        )

    def config_report(self, name: str) -> dict[str, Any]:
        """What `show` prints: one config's record with its provenance and code comparison."""
        from resweep.status import config_report

        code = provenance.code_digests(self.function)
        fingerprint = provenance.fingerprint_of(self.function, code)
        return config_report(self.store, str(name), fingerprint, code=code)

    def replay(
        self,
        name: str | None = None,
        *,
        pdb: bool = False,
        allow_pickle: bool = True,
        failed: bool = False,
        where: Mapping[str, Any] | None = None,
        hooks: bool = False,
    ) -> Replay | list[Replay]:
        """Re-run one config (or every done one) here, every cached call answered from the cache.

        A failed config replays its last attempt's calls and raises its exception again; pdb
        stops in the post-mortem debugger at an exception. Without a name every done config
        (and, with failed, every failed one) replays, each reported in its Replay.
        allow_pickle=False loads no pickled answer (a result directory from someone else):
        answers stored as JSON replay, one stored as a pickle is refused. where replays only the
        configs whose fields match it, as in run(). Replays fire no hooks unless hooks=True: then
        the hooks hear the replay as a run whose backend is "replay", with no session;
        on_run_end's report counts the replayed configs (failed: those that raised).
        """
        from resweep.hooks import prepare
        from resweep.replay import replay_experiment

        dispatcher = None
        if hooks:
            dispatcher = prepare(
                self.hook_specs(),
                output_dir=self.store.root,
                experiment=self.name,
                backend="replay",
                max_workers=1,
            )
        try:
            return replay_experiment(
                self,
                name,
                pdb=pdb,
                failed=failed,
                allow_pickle=allow_pickle,
                selection=Selection.of(None, where),
                hooks=dispatcher,
            )
        except (Exception, KeyboardInterrupt) as error:
            if dispatcher is not None:
                dispatcher.error(error)
            raise

    # -- summaries and maintenance -------------------------------------------------------

    def save_summary(self, force: bool = False, *, where: Mapping[str, Any] | None = None) -> Path:
        """Write summary.csv; without force it refuses while any config is not done.

        With where, the summary holds only the configs whose fields match it, as in run().
        """
        from resweep import summary

        return summary.save_summary(self.store, force=force, selection=Selection.of(None, where))

    def load_summary(self) -> pd.DataFrame:
        """summary.csv as a DataFrame with proper dtypes."""
        from resweep import summary

        return summary.load_summary(self.output_dir)

    def clean_index(self) -> list[str]:
        """Drop from the state the configs that are no longer in configs; return their names."""
        if self.configs is None:
            raise ResweepError("clean_index needs the experiment's configs; configs is None")
        named = self.named_configs()
        store = self.store
        from resweep.files import check_layout

        check_layout(store.root)
        with store.lock():
            state = store.read()
            dropped = [n for n in state.configs if n not in named]
            for n in dropped:
                del state.configs[n]
            if dropped:
                store.compact(state)
                from resweep import summary

                if (store.root / summary.SUMMARY_FILE).exists():
                    # A summary describes the state's configs: the dropped ones leave it too.
                    summary.save_summary(store, force=True, state=state)
        return dropped

    def config_record(self, name: str) -> ConfigRecord:
        """The state's record of one config; an unknown name is an error that lists close ones."""
        from resweep.recovery import read_one_settled

        record: Any = read_one_settled(self.store, str(name)).lookup(str(name))
        return record  # type: ignore[no-any-return]

    def result(self, name: str) -> Any:
        """A done config's result, from the state (no file of the config's own is needed).

        A config that is not done has no result: an error saying its status.
        """
        record = self.config_record(name)
        if record["status"] != "done":
            raise ConfigError(f"config {name!r} is {record['status']}, not done: it has no result")
        return record.get("result")

    def run_cli(self) -> None:
        """The command line: run, status, replay, force_summary, clean_index, show, plugins."""
        from resweep import cli

        cli.main(self)
