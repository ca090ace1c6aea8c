"""summary.csv, load_summary() and open(): the results, for a notebook."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resweep.durable import fault_text, write_atomic
from resweep.errors import ResweepError, StateError, StorageError
from resweep.identity import flatten
from resweep.recovery import read_settled
from resweep.selection import Selection
from resweep.state import State
from resweep.store import Store

if TYPE_CHECKING:
    import pandas as pd

SUMMARY_FILE = "summary.csv"
_LEAD = ("name", "status")
_TAIL = ("duration_s", "attempts", "error", "cache_hits", "cache_misses")
_TEXT_COLUMNS = ("name", "status", "error")
_FIXED = frozenset((*_LEAD, *_TAIL))


def _param_column(key: str) -> str:
    """A param named like a fixed column (name, status, ...) gets the prefix "params."."""
    return f"params.{key}" if key in _FIXED else key


def rows(state: State) -> tuple[list[str], list[dict[str, Any]]]:
    """One flat row per config and the columns in order: lead, params, results, tail."""
    param_cols: dict[str, None] = {}
    result_cols: dict[str, None] = {}
    flat_rows = []
    for name, record in state.configs.items():
        params = flatten(record.get("params") or {})
        raw = record.get("result")
        result: dict[str, Any] = {}
        if isinstance(raw, dict):
            result = flatten(raw)
        elif raw is not None:
            result["result"] = raw
        param_cols.update(dict.fromkeys(params))
        result_cols.update(dict.fromkeys(result))
        flat_rows.append((name, record, params, result))
    taken = set(_LEAD) | set(param_cols) | set(_TAIL)
    # A result key that clashes with a param or a fixed column gets the prefix "result.".
    renamed = {key: (f"result.{key}" if key in taken else key) for key in result_cols}
    columns = [*_LEAD, *map(_param_column, param_cols), *renamed.values(), *_TAIL]
    params_clash = not _FIXED.isdisjoint(param_cols)
    none_renamed = all(key == column for key, column in renamed.items())
    out = []
    for name, record, params, result in flat_rows:
        if params_clash:
            params = {_param_column(key): value for key, value in params.items()}
        row: dict[str, Any] = {"name": name, "status": record["status"], **params}
        if none_renamed:
            row.update(result)
        else:
            for key, value in result.items():
                row[renamed[key]] = value
        get = record.get
        row["duration_s"] = get("duration_s")
        row["attempts"] = get("attempts")
        row["error"] = get("error")
        row["cache_hits"] = get("cache_hits") or 0
        row["cache_misses"] = get("cache_misses") or 0
        out.append(row)
    return columns, out


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return value


def _cells(row: dict[str, Any], columns: list[str]) -> list[Any]:
    """One CSV row; csv itself writes None as an empty cell, so only lists and dicts need work."""
    values = list(map(row.get, columns))
    kinds = set(map(type, values))
    if list in kinds or dict in kinds:
        return [_cell(v) for v in values]
    return values


def save_summary(
    store: Store,
    *,
    force: bool = False,
    state: State | None = None,
    selection: Selection | None = None,
) -> Path:
    """Write summary.csv atomically; without force, only when every config is done.

    With a selection, the summary holds the configs it selects, and only they must be done.
    """
    if state is None:
        state = read_settled(store)[0]
    if selection is not None and not selection.everything:
        chosen = selection.choose({n: r.get("params") for n, r in state.configs.items()})
        state = State(
            name=state.name,
            description=state.description,
            configs={n: state.configs[n] for n in chosen},
        )
    counts = state.counts()
    if not force and counts["done"] != len(state.configs):
        pending = ", ".join(f"{v} {k}" for k, v in counts.items() if v and k != "done")
        raise ResweepError(
            f"not every config is done ({pending}); run the rest, or force the summary"
        )
    columns, table = rows(state)
    path = store.root / SUMMARY_FILE
    try:
        write_atomic(path, _csv_text(columns, table))
    except OSError as error:
        raise StorageError(f"could not write the summary: {fault_text(error)}") from None
    return path


def _csv_text(columns: list[str], table: Iterable[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(_cells(row, columns) for row in table)
    return buffer.getvalue()


def load_summary(output_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """summary.csv of an experiment directory as a DataFrame, numbers as numbers."""
    path = Path(output_dir) / SUMMARY_FILE
    if not path.exists():
        raise StateError(
            f"no {SUMMARY_FILE} in {Path(output_dir).absolute()}; it is written when every config "
            "is done, or by force_summary"
        )
    try:
        columns, table = rows(read_settled(Store(output_dir))[0])
    except ResweepError:
        columns, table = [], []
    return _read_table(path, _string_columns(columns, table))


def _read_table(source: Any, strings: list[str]) -> pd.DataFrame:
    """A summary table as a DataFrame: the one dtype policy of load_summary and open().

    name, error and columns holding only strings: string; status: category; whole numbers:
    int64 (float64 when some are missing); other numbers: float64; true/false: bool (object when
    some are missing); lists and dicts: their JSON text; a missing value: NaN (<NA> in strings).
    """
    import pandas as pd

    dtype = dict.fromkeys([*_TEXT_COLUMNS, *strings], "string")
    # Only an empty cell is missing: a string result "NA" or "null" stays that string.
    frame = pd.read_csv(source, dtype=dtype, keep_default_na=False, na_values=[""])
    for column in frame.columns:
        values = frame[column]
        # A number column with a NaN or an infinity (a diverged loss) is read as text, since
        # "nan" is no missing value here: numbers it is, when every cell reads as one.
        if column not in dtype and (values.dtype == object or pd.api.types.is_string_dtype(values)):
            present = values.dropna()
            if len(present) and all(type(v) is str for v in present):
                numbers = pd.to_numeric(values, errors="coerce")
                if numbers.notna().sum() + present.str.lower().eq("nan").sum() == len(present):
                    frame[column] = numbers.astype("float64")
    if "status" in frame:
        frame["status"] = frame["status"].astype("category")
    return frame


def _string_columns(columns: list[str], table: list[dict[str, Any]]) -> list[str]:
    """Columns that hold only strings, so that '007' or 'true' is not read as 7 or True."""
    return [
        column
        for column in columns
        if any(isinstance(row.get(column), str) for row in table)
        and all(isinstance(row.get(column), str | None) for row in table)
    ]


def _frame(columns: list[str], table: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows of the state as a DataFrame, read back as summary.csv would be: same dtypes."""
    text = _csv_text(columns, table)
    return _read_table(io.StringIO(text), _string_columns(columns, table))


class ExperimentView:
    """A read-only view of an experiment directory, without the script that made it."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.store = Store(output_dir)
        # The state as read last (refresh() reads it again).
        self.state: State = read_settled(self.store)[0]

    @property
    def name(self) -> str | None:
        return self.state.name

    @property
    def description(self) -> str | None:
        return self.state.description

    def refresh(self) -> ExperimentView:
        """Read the state again (a run may still be going)."""
        self.state = read_settled(self.store)[0]
        return self

    def status(self) -> dict[str, int]:
        return self.state.counts()

    @property
    def configs(self) -> pd.DataFrame:
        """Every config: name, status, attempts and params, one row each (summary()'s dtypes)."""
        frame = self.summary()
        params = self._param_columns()
        return frame[["name", "status", "attempts", *[c for c in frame.columns if c in params]]]

    @property
    def results(self) -> pd.DataFrame:
        """The done configs with their params and results: summary()'s rows that are done, with
        its dtypes (a column that a failed config leaves empty stays float64)."""
        frame = self.summary()
        return frame[frame["status"] == "done"].reset_index(drop=True)

    def summary(self) -> pd.DataFrame:
        """Every config, in the summary's columns, whether or not summary.csv exists yet.

        The same DataFrame, dtypes included, as load_summary() of a summary written now.
        """
        columns, table = rows(self.state)
        return _frame(columns, table)

    def _param_columns(self) -> set[str]:
        out: dict[str, Any] = {}
        for record in self.state.configs.values():
            out.update(flatten(record.get("params") or {}))
        return set(map(_param_column, out))

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.status().items())
        return f"<resweep experiment {self.name!r} at {self.store.root}: {counts}>"


def open_experiment(output_dir: str | os.PathLike[str]) -> ExperimentView:
    """Open an experiment directory for reading, in a notebook."""
    return ExperimentView(output_dir)
