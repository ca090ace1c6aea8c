"""The MLflow bridge, hook id `mlflow`: each finished config an MLflow run under one parent.

Installed with `pip install 'resweep[mlflow]'` (mlflow-skinny). The tracking store is MLflow's
own choice (MLFLOW_TRACKING_URI), unless extensions: {mlflow: {tracking_uri: ...}} says one.
A config is one MLflow run, found again by its tags: killing and resuming a sweep, or running
it again, updates that run and never logs the config twice.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping
from typing import Any

from resweep.errors import PluginError
from resweep.hooks import ConfigOutcome, HookContext
from resweep.identity import flatten

# Tags that tie MLflow runs to a resweep experiment directory and a config.
TAG_DIR = "resweep.output_dir"
# A digest of the output directory, which runs are searched by: a path may hold quotes or
# backslashes that MLflow's filter strings do not read back as written.
TAG_DIR_ID = "resweep.output_dir_id"
TAG_ROLE = "resweep.role"
TAG_CONFIG = "resweep.config"
TAG_STATUS = "resweep.status"
TAG_ATTEMPTS = "resweep.attempts"
TAG_SESSION = "resweep.session"
TAG_FINGERPRINT = "resweep.fingerprint"
TAG_ERROR = "resweep.error"
# MLflow's limits on a param's and a tag's value.
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000
BATCH = 100


def _millis(timestamp: str | None) -> int | None:
    if not timestamp:
        return None
    try:
        return int(datetime.datetime.fromisoformat(timestamp).timestamp() * 1000)
    except ValueError:
        return None


def _directory_id(output_dir: str) -> str:
    """16 hex digits of the output directory's path: safe inside any filter string."""
    import hashlib

    return hashlib.sha256(output_dir.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Stores MLflow keeps in a database through SQLAlchemy, which mlflow-skinny does not install.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SET_A_STORE = (
    "set MLFLOW_TRACKING_URI to a tracking server (http://host:5000), or to a directory "
    "(file:///path/mlruns, with MLFLOW_ALLOW_FILE_STORE=true), or give extensions: "
    "{mlflow: {tracking_uri: ...}}"
)


def _open_client(client_class: Any, tracking_uri: str | None) -> Any:
    """An MlflowClient on the store the settings or MLflow choose; one that cannot be opened
    refuses the run at its start (exit 2) with what to set, not MLflow's traceback."""
    import importlib.util

    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    where = (
        f"MLflow's tracking URI is {uri!r}"
        if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        else f"MLFLOW_TRACKING_URI is not set, so MLflow chose {uri!r}"
    )
    scheme = str(uri).partition(":")[0].partition("+")[0].lower()
    if scheme in DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        raise PluginError(
            f"the mlflow hook: {where}, a database store that needs SQLAlchemy, which "
            f"mlflow-skinny lacks; {SET_A_STORE}"
        )
    try:
        return client_class(tracking_uri=tracking_uri)
    except Exception as error:
        lines = str(error).strip().splitlines()
        raise PluginError(
            f"the mlflow hook cannot open its tracking store: {where} "
            f"({type(error).__name__}{': ' + lines[0] if lines else ''}); {SET_A_STORE}"
        ) from None


def metrics_of(result: Any) -> dict[str, float]:
    """The result's numeric keys (nested keys joined with '.'), booleans left out."""
    if not isinstance(result, Mapping):
        return {}
    return {
        key: float(value)
        for key, value in flatten(result).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and not math.isinf(value)
    }


def params_of(params: Any) -> dict[str, str]:
    if not isinstance(params, Mapping):
        return {}
    return {key: str(value)[:MAX_PARAM_CHARS] for key, value in flatten(params).items()}


class MlflowHook:
    """Logs every finished config as a nested MLflow run of the experiment's parent run."""

    def __init__(self) -> None:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            # Refused before the run starts: a bad setup, not a hook failing mid-sweep.
            raise PluginError("the mlflow hook needs MLflow: pip install 'resweep[mlflow]'")
        self.client: Any = None
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self.output_dir = ""
        # Config name -> (run id, its resweep.attempts and resweep.status tags, MLflow status).
        self.runs: dict[str, tuple[str, str, str, str]] = {}
        # Configs whose run holds a resweep.error tag: a later success deletes it.
        self.errors: set[str] = set()

    # -- hook events -----------------------------------------------------------------------

    def on_run_start(self, context: HookContext) -> None:
        if context.backend == "replay":
            return  # a replay changes no outcome: nothing to log
        from mlflow.tracking import MlflowClient

        settings = context.settings
        self.output_dir = str(context.output_dir)
        self.client = _open_client(MlflowClient, settings.get("tracking_uri"))
        name = str(settings.get("experiment_name") or context.experiment or context.output_dir.name)
        found = self.client.get_experiment_by_name(name)
        self.experiment_id = (
            found.experiment_id if found is not None else self.client.create_experiment(name)
        )
        self.parent_id = self._parent(context, name)
        self.runs = self._children()
        context.artifacts.write_json(
            "mlflow.json",
            {
                "tracking_uri": self.client.tracking_uri,
                "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_id,
            },
        )
        self._catch_up(context)

    def on_config_end(self, context: HookContext, outcome: ConfigOutcome) -> None:
        if not outcome.final or self.client is None:
            return  # a retry follows within this run (its outcome is the one to log), a replay
        self.log_config(
            outcome.name,
            {
                "params": context.params,
                "status": outcome.status,
                "attempts": outcome.attempt,
                "result": outcome.result,
                "error": outcome.error,
                "start_time": outcome.start_time,
                "end_time": outcome.end_time,
                "session": context.session,
                "fingerprint": context.fingerprint if outcome.status == "done" else None,
            },
        )

    def on_run_end(self, context: HookContext, report: Any) -> None:
        if self.client is None or self.parent_id is None:
            return
        self.client.log_batch(
            self.parent_id,
            metrics=self._metrics(
                {"done": report.done, "failed": report.failed, "todo": report.todo}, None
            ),
        )
        finished = report.todo == 0
        self.client.set_terminated(
            self.parent_id, status="FINISHED" if finished and not report.failed else "FAILED"
        )

    # -- MLflow runs -------------------------------------------------------------------------

    def _search(self, filter_string: str) -> list[Any]:
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=filter_string, max_results=1000,
                page_token=token,
            )  # fmt: skip
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def _parent(self, context: HookContext, name: str) -> str:
        where = self.output_dir
        found = self._search(
            f"tags.`{TAG_DIR_ID}` = '{_directory_id(where)}' and tags.`{TAG_ROLE}` = 'experiment'"
        )
        if found:
            run_id: str = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={
                TAG_DIR_ID: _directory_id(where),
                TAG_DIR: where,
                TAG_ROLE: "experiment",
                "mlflow.runName": name,
            },
        )
        return str(run.info.run_id)

    def _children(self) -> dict[str, tuple[str, str, str, str]]:
        """Each config's one run; runs a killed bridge left half-made, or twice, are deleted.

        A store may write a new run's tags one at a time (the file store does): a kill while the
        bridge creates a run leaves it RUNNING with only its first tags. Those go first, the
        output directory's and the parent's, so such a run is still known as this directory's;
        it is deleted here and its config logged again.
        """
        found: dict[str, Any] = {}
        for run in self._search(f"tags.`{TAG_DIR_ID}` = '{_directory_id(self.output_dir)}'"):
            found[run.info.run_id] = run
        for run in self._search(f"tags.`mlflow.parentRunId` = {_quoted(str(self.parent_id))}"):
            found[run.info.run_id] = run
        runs: dict[str, tuple[str, str, str, str]] = {}
        for run in sorted(found.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id)):
            tags = run.data.tags
            if run.info.run_id == self.parent_id or tags.get(TAG_ROLE) == "experiment":
                continue
            name = tags.get(TAG_CONFIG)
            whole = (
                name is not None
                and tags.get("mlflow.parentRunId") == self.parent_id
                and TAG_ATTEMPTS in tags
                and run.info.status in ("FINISHED", "FAILED")
            )
            if not whole or name in runs:
                self.client.delete_run(run.info.run_id)
                continue
            assert name is not None
            if TAG_ERROR in tags:
                self.errors.add(name)
            runs[name] = (
                run.info.run_id,
                tags.get(TAG_ATTEMPTS, ""),
                tags.get(TAG_STATUS, ""),
                run.info.status,
            )
        return runs

    def _catch_up(self, context: HookContext) -> None:
        """Log the finished configs MLflow lacks: a run killed before its hooks heard of them."""
        from resweep.recovery import read_settled
        from resweep.store import Store

        store = Store(context.output_dir)
        if not store.exists():
            return
        state = read_settled(store)[0]
        for name, record in state.configs.items():
            if record.get("status") in ("done", "failed"):
                self.log_config(name, record)

    def log_config(self, name: str, record: Mapping[str, Any]) -> None:
        """One config's MLflow run, created or brought up to date; nothing when it is already."""
        status = str(record.get("status"))
        attempts = str(record.get("attempts"))
        mlflow_status = "FINISHED" if status == "done" else "FAILED"
        known = self.runs.get(name)
        if known is not None and known[1:] == (attempts, status, mlflow_status):
            return  # logged already, this very attempt
        # In this order: a store that writes tags one at a time writes the ones that tie the
        # run to this directory first, then its config; a run cut short is found and redone.
        tags = {
            TAG_DIR_ID: _directory_id(self.output_dir),
            TAG_DIR: self.output_dir,
            "mlflow.parentRunId": str(self.parent_id),
            TAG_CONFIG: name,
            TAG_STATUS: status,
            TAG_ATTEMPTS: attempts,
            "mlflow.runName": name,
        }
        if record.get("session"):
            tags[TAG_SESSION] = str(record["session"])
        if record.get("fingerprint"):
            tags[TAG_FINGERPRINT] = str(record["fingerprint"])
        if status == "failed" and record.get("error"):
            tags[TAG_ERROR] = str(record["error"])[:MAX_TAG_CHARS]
        if known is None:
            # Tagged as it is made: a kill during or right after leaves it findable (_children).
            run = self.client.create_run(
                self.experiment_id, start_time=_millis(record.get("start_time")), tags=tags
            )
            run_id = str(run.info.run_id)
            params = params_of(record.get("params"))
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), BATCH):
                self.client.log_batch(run_id, params=items[i : i + BATCH])
        else:
            run_id = known[0]
            from mlflow.entities import RunTag

            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        metrics = self._metrics(metrics_of(record.get("result")), record.get("end_time"))
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + BATCH])
        if TAG_ERROR in tags:
            self.errors.add(name)
        elif name in self.errors:
            # The error of an attempt before this one: a retried config that now succeeds.
            self.client.delete_tag(run_id, TAG_ERROR)
            self.errors.discard(name)
        self.client.set_terminated(
            run_id, status=mlflow_status, end_time=_millis(record.get("end_time"))
        )
        self.runs[name] = (run_id, attempts, status, mlflow_status)

    def _metrics(self, values: Mapping[str, float], end_time: str | None) -> list[Any]:
        from mlflow.entities import Metric

        stamp = _millis(end_time) or int(datetime.datetime.now().timestamp() * 1000)
        return [Metric(key, value, stamp, 0) for key, value in values.items()]
