"""summary.csv, load_summary() and open(): columns, clashes, dtypes, the notebook view."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import resweep
from resweep.errors import ResweepError, StateError


def nested_result(config: dict[str, Any]) -> dict[str, Any]:
    if config["model"] == "bad":
        raise RuntimeError("no luck")
    return {
        "accuracy": config["opt"]["lr"] * 2,
        "lr": "clash with a param",
        "status": "clash with a column",
        "metrics": {"f1": 0.5, "counts": {"tp": 3}},
        "tags": ["x", "y"],
        "passed": config["model"] == "a",
    }


CONFIGS = [
    {"model": "a", "opt": {"lr": 0.1, "momentum": 0.9}, "lr": 1},
    {"model": "b", "opt": {"lr": 0.2, "momentum": 0.9}, "lr": 2},
]


def make(tmp_path: Path, configs: list[dict[str, Any]] = CONFIGS) -> resweep.Experiment:
    return resweep.Experiment(
        function=nested_result, configs=configs, output_dir=tmp_path / "out", name="sum"
    )


def header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle))


def test_summary_columns_in_contract_order_with_prefix_on_clash(tmp_path: Path) -> None:
    """Columns: name, status, flattened params, flattened results (clashes prefixed), tail."""
    experiment = make(tmp_path)
    assert experiment.run(backend="sequential", progress=False).done == 2
    assert header(tmp_path / "out" / "summary.csv") == [
        "name",
        "status",
        "lr",
        "model",
        "opt.lr",
        "opt.momentum",
        "accuracy",
        "result.lr",
        "result.status",
        "metrics.f1",
        "metrics.counts.tp",
        "tags",
        "passed",
        "duration_s",
        "attempts",
        "error",
        "cache_hits",
        "cache_misses",
    ]


def test_summary_rows_hold_the_values(tmp_path: Path) -> None:
    """Each row carries the config's params, results and bookkeeping as written in the state."""
    experiment = make(tmp_path)
    experiment.run(backend="sequential", progress=False)
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    row = rows["a"]
    assert row["status"] == "done"
    assert row["lr"] == "1" and row["result.lr"] == "clash with a param"
    assert row["result.status"] == "clash with a column"
    assert row["opt.lr"] == "0.1" and row["accuracy"] == "0.2"
    assert row["metrics.counts.tp"] == "3"
    assert row["tags"] == '["x", "y"]'
    assert row["attempts"] == "1" and row["error"] == ""
    assert row["cache_hits"] == "0" and row["cache_misses"] == "0"
    assert float(row["duration_s"]) >= 0


def test_summary_waits_for_every_config_or_force(tmp_path: Path) -> None:
    """With a failed config no summary is written and save_summary refuses unless forced."""
    experiment = make(tmp_path, [*CONFIGS, {"model": "bad", "opt": {"lr": 0.0}, "lr": 0}])
    experiment.run(backend="sequential", progress=False)
    path = tmp_path / "out" / "summary.csv"
    assert not path.exists()
    with pytest.raises(ResweepError, match="1 failed"):
        experiment.save_summary()
    assert experiment.save_summary(force=True) == path
    frame = experiment.load_summary()
    bad = frame[frame["model"] == "bad"].iloc[0]
    assert bad["status"] == "failed"
    assert bad["error"] == "RuntimeError: no luck"
    assert pd.isna(bad["accuracy"])


def test_load_summary_gives_proper_dtypes(tmp_path: Path) -> None:
    """Numbers load as numbers, booleans as booleans, names and errors as strings."""
    experiment = make(tmp_path)
    experiment.run(backend="sequential", progress=False)
    frame = experiment.load_summary()
    assert list(frame["name"]) == [
        "lr=1,model=a,opt.lr=0.1,opt.momentum=0.9",
        "lr=2,model=b,opt.lr=0.2,opt.momentum=0.9",
    ]
    assert pd.api.types.is_string_dtype(frame["name"])
    assert pd.api.types.is_string_dtype(frame["error"])
    assert isinstance(frame["status"].dtype, pd.CategoricalDtype)
    assert pd.api.types.is_float_dtype(frame["opt.lr"])
    assert pd.api.types.is_float_dtype(frame["duration_s"])
    assert pd.api.types.is_integer_dtype(frame["lr"])
    assert pd.api.types.is_integer_dtype(frame["attempts"])
    assert pd.api.types.is_integer_dtype(frame["cache_hits"])
    assert pd.api.types.is_bool_dtype(frame["passed"])
    pd.testing.assert_frame_equal(resweep.load_summary(tmp_path / "out"), frame)


def test_numeric_looking_names_stay_strings(tmp_path: Path) -> None:
    """Config names such as '007' keep their leading zeros in the loaded summary."""
    experiment = resweep.Experiment(
        function=lambda c: {"v": c["v"]},
        configs=[{"v": 7}, {"v": 8}],
        output_dir=tmp_path / "out",
        config_naming=lambda c: f"{c['v']:03d}",
    )
    experiment.run(backend="sequential", progress=False)
    assert list(experiment.load_summary()["name"]) == ["007", "008"]


def test_load_summary_without_summary_is_a_state_error(tmp_path: Path) -> None:
    """Loading a summary that was never written says how to get one."""
    with pytest.raises(StateError, match="force_summary"):
        resweep.load_summary(tmp_path)


def test_open_gives_a_read_only_view_of_a_directory(tmp_path: Path) -> None:
    """resweep.open reads counts, configs and results without the script."""
    experiment = make(tmp_path, [*CONFIGS, {"model": "bad", "opt": {"lr": 0.0}, "lr": 0}])
    experiment.run(backend="sequential", progress=False)
    before = (tmp_path / "out" / "experiment.yaml").read_bytes()
    view = resweep.open(tmp_path / "out")
    assert isinstance(view, resweep.ExperimentView)
    assert view.name == "sum"
    assert view.status() == {"todo": 0, "running": 0, "done": 2, "failed": 1}
    configs = view.configs
    assert list(configs.columns) == [
        "name",
        "status",
        "attempts",
        "lr",
        "model",
        "opt.lr",
        "opt.momentum",
    ]
    assert len(configs) == 3
    results = view.results
    assert len(results) == 2 and set(results["status"]) == {"done"}
    assert list(results["accuracy"]) == [0.2, 0.4]
    assert pd.api.types.is_float_dtype(results["accuracy"])
    assert pd.api.types.is_integer_dtype(results["attempts"])
    assert len(view.summary()) == 3
    assert "done 2" in repr(view) and "failed 1" in repr(view)
    assert (tmp_path / "out" / "experiment.yaml").read_bytes() == before
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_open_on_a_directory_without_experiment_is_a_state_error(tmp_path: Path) -> None:
    """Opening an empty directory says there is no experiment there yet."""
    with pytest.raises(StateError, match="no experiment"):
        resweep.open(tmp_path)


def test_strings_that_look_like_numbers_stay_strings(tmp_path: Path) -> None:
    """A param or result that is always a string ('007', 'true', '1e3') loads as that string."""
    experiment = resweep.Experiment(
        function=lambda c: {"code": c["tag"], "flag": "true", "n": 1},
        configs=[{"tag": "007"}, {"tag": "1e3"}],
        output_dir=tmp_path / "out",
    )
    experiment.run(backend="sequential", progress=False)
    frame = experiment.load_summary()
    assert list(frame["tag"]) == ["007", "1e3"]
    assert list(frame["code"]) == ["007", "1e3"]
    assert list(frame["flag"]) == ["true", "true"]
    assert pd.api.types.is_integer_dtype(frame["n"])


def test_params_named_like_fixed_columns_keep_those_columns_intact(tmp_path: Path) -> None:
    """A param called name, status or attempts gets the prefix 'params.' and hides nothing."""
    experiment = resweep.Experiment(
        function=lambda c: {"name": "from result"},
        configs=[{"name": "resnet", "status": "new", "attempts": 9}],
        output_dir=tmp_path / "out",
    )
    experiment.run(backend="sequential", progress=False)
    assert header(tmp_path / "out" / "summary.csv") == [
        "name",
        "status",
        "params.attempts",
        "params.name",
        "params.status",
        "result.name",
        "duration_s",
        "attempts",
        "error",
        "cache_hits",
        "cache_misses",
    ]
    row = experiment.load_summary().iloc[0]
    assert row["name"] == "attempts=9,name=resnet,status=new"
    assert (row["status"], row["attempts"]) == ("done", 1)
    assert (row["params.name"], row["params.status"], row["params.attempts"]) == (
        "resnet",
        "new",
        9,
    )
    assert row["result.name"] == "from result"
    view = resweep.open(tmp_path / "out").configs
    assert list(view.columns) == [
        "name",
        "status",
        "attempts",
        "params.attempts",
        "params.name",
        "params.status",
    ]


def na_words(config: Any) -> dict[str, Any]:
    return {"answer": "NA", "other": "null", "score": 0.5}


def test_strings_that_look_missing_stay_strings(tmp_path: Path) -> None:
    """A result "NA" or "null" reads back as that text; only an empty cell is missing."""
    experiment = resweep.Experiment(
        function=na_words, configs=[{"i": 1}], output_dir=tmp_path / "out", cache=False
    )
    experiment.run(backend="sequential", progress=False)
    frame = resweep.load_summary(tmp_path / "out")
    assert frame.loc[0, "answer"] == "NA"
    assert frame.loc[0, "other"] == "null"
    assert frame.loc[0, "score"] == 0.5
    assert frame["error"].isna().all()


def mixed(config: dict[str, Any]) -> dict[str, Any]:
    if config["i"] == 3:
        raise RuntimeError("three")
    return {
        "count": config["i"],
        "maybe": None if config["i"] == 1 else config["i"] * 2,
        "ratio": config["i"] / 4,
        "ok": config["i"] % 2 == 0,
        "text": f"t{config['i']}",
        "code": "007",
        "items": [config["i"], "x"],
        "nested": {"depth": config["i"]},
    }


def diverging(config: dict[str, int]) -> dict[str, Any]:
    losses = [float("nan"), float("inf"), 0.5, -float("inf")]
    return {"loss": losses[config["i"]], "tag": ["nan", "inf", "y", "z"][config["i"]]}


def test_a_diverged_loss_keeps_its_column_numeric(tmp_path: Path) -> None:
    """NaN and infinities are numbers in a number column (a string column keeps "nan" as text),
    in load_summary and in open() alike."""
    experiment = resweep.Experiment(
        function=diverging, configs=[{"i": i} for i in range(4)], output_dir=tmp_path / "out"
    )
    experiment.run(backend="sequential", progress=False)
    frame = resweep.load_summary(tmp_path / "out")
    assert frame["loss"].dtype == "float64"
    assert math.isnan(frame["loss"][0]) and list(frame["loss"][1:]) == [math.inf, 0.5, -math.inf]
    assert list(frame["tag"]) == ["nan", "inf", "y", "z"]
    view = resweep.open(tmp_path / "out").summary()
    assert view.dtypes.to_dict() == frame.dtypes.to_dict()


def test_open_and_load_summary_give_the_same_dtypes_and_values(tmp_path: Path) -> None:
    """The notebook view and load_summary follow one dtype policy: plain int64, float64, bool,
    string and category, the same frame for the same state."""
    configs = [{"i": i, "tag": f"x{i}", "lr": i / 10, "flag": i > 1} for i in range(5)]
    experiment = resweep.Experiment(
        function=mixed, configs=configs, output_dir=tmp_path / "out", cache=False
    )
    experiment.run(backend="sequential", progress=False)
    experiment.save_summary(force=True)
    loaded = resweep.load_summary(tmp_path / "out")
    view = resweep.open(tmp_path / "out")
    pd.testing.assert_frame_equal(view.summary(), loaded)
    done = loaded[loaded["status"] == "done"].reset_index(drop=True)
    pd.testing.assert_frame_equal(view.results, done)
    configs_frame = view.configs
    for column in configs_frame.columns:
        assert configs_frame[column].dtype == loaded[column].dtype, column
    dtypes = {column: str(dtype) for column, dtype in loaded.dtypes.items()}
    assert dtypes["i"] == dtypes["attempts"] == dtypes["cache_hits"] == "int64"
    assert dtypes["lr"] == dtypes["ratio"] == dtypes["duration_s"] == "float64"
    # Whole numbers that the failed config (and a None) leave missing: float64 with NaN.
    assert dtypes["count"] == dtypes["maybe"] == "float64"
    assert dtypes["flag"] == "bool"
    assert dtypes["tag"] == dtypes["name"] == dtypes["code"] == dtypes["error"] == "string"
    assert dtypes["status"] == "category"
    assert dtypes["ok"] == "object"  # true/false, and missing for the failed config
    assert loaded.loc[0, "items"] == '[0, "x"]'
