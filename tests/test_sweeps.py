"""grid() and sweep files: expansion order, nesting, and an error naming file, axis and key."""

from __future__ import annotations

import enum
import importlib.util
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import resweep
from resweep import identity, sweeps
from resweep.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Optimizer:
    lr: float = 0.1
    momentum: float = 0.0


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass(frozen=True)
class Config:
    model: str
    optimizer: Optimizer = field(default_factory=Optimizer)
    steps: int = 10
    seed: int = 0
    tag: str = ""
    mode: Mode = Mode.FAST
    layers: list[int] | None = None
    extra: dict[str, int] = field(default_factory=dict)


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_grid_last_axis_varies_fastest() -> None:
    """grid() gives every combination, the first axis slowest and the last fastest."""
    configs = resweep.grid(Config, model=["a", "b"], steps=range(3))
    assert [(c.model, c.steps) for c in configs] == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2),
    ]  # fmt: skip


def test_grid_dotted_keys_set_nested_dataclass_fields() -> None:
    """A dotted axis name sets a field of a nested dataclass and leaves its other defaults."""
    configs = resweep.grid(Config, model=["a"], **{"optimizer.lr": [0.5, 1]})
    assert configs == [
        Config(model="a", optimizer=Optimizer(lr=0.5)),
        Config(model="a", optimizer=Optimizer(lr=1.0)),
    ]
    assert isinstance(configs[1].optimizer.lr, float)


def test_grid_without_class_gives_nested_dicts() -> None:
    """With cls None, dotted keys become nested dicts."""
    assert resweep.grid(None, **{"opt.lr": [1, 2], "name": ["x"]}) == [
        {"opt": {"lr": 1}, "name": "x"},
        {"opt": {"lr": 2}, "name": "x"},
    ]


@pytest.mark.parametrize(
    ("axes", "fragments"),
    [
        ({"model": ["a"], "stpes": [1]}, ["grid, key 'stpes'", "did you mean 'steps'?"]),
        ({"model": ["a"], "steps": ["3"]}, ["grid, key 'steps'", "'3' is a str, expected int"]),
        ({"model": ["a"], "steps": [True]}, ["key 'steps'", "True is a bool, expected int"]),
        ({"model": "abc"}, ["grid, key 'model'", "give a list of values"]),
        ({"model": []}, ["grid, key 'model'", "empty"]),
        ({"model": ["a", "a"]}, ["grid, key 'model'", "#0 and #1 are both 'a'"]),
        ({"model": ["a"], "optimizer.lrr": [1]}, ["'optimizer.lrr'", "did you mean 'lr'?"]),
        (
            {"model": ["a"], "optimizer": [Optimizer()], "optimizer.lr": [1]},
            ["key 'optimizer.lr'", "'optimizer', which overlaps it"],
        ),
        ({"model": ["a"], "steps.x": [1]}, ["'steps' holds int, not a dataclass"]),
    ],
)
def test_grid_errors_name_the_key(axes: dict[str, object], fragments: list[str]) -> None:
    """Every grid() mistake is a ConfigError that names the offending key."""
    with pytest.raises(ConfigError) as info:
        resweep.grid(Config, **axes)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_grid_rejects_a_class_that_is_not_a_dataclass() -> None:
    """grid(cls) needs a dataclass or None."""
    with pytest.raises(ConfigError, match="not a dataclass"):
        resweep.grid(dict, a=[1])


def test_sweep_file_expands_grid_zip_and_seeds_in_order(tmp_path: Path) -> None:
    """Axes multiply, the first axis slowest; a zip pairs values; seeds vary fastest."""
    path = write(
        tmp_path,
        """\
        base: {model: a, optimizer.momentum: 0.9}
        axes:
          - mode: grid
            params: {optimizer.lr: [0.1, 0.01]}
          - mode: zip
            params: {model: [small, large], steps: [100, 400]}
        seeds: [0, 1]
        """,
    )
    configs = resweep.load_configs(path, Config)
    assert [(c.optimizer.lr, c.model, c.steps, c.seed) for c in configs] == [
        (0.1, "small", 100, 0), (0.1, "small", 100, 1),
        (0.1, "large", 400, 0), (0.1, "large", 400, 1),
        (0.01, "small", 100, 0), (0.01, "small", 100, 1),
        (0.01, "large", 400, 0), (0.01, "large", 400, 1),
    ]  # fmt: skip
    assert {c.optimizer.momentum for c in configs} == {0.9}
    assert resweep.load_configs(path, Config) == configs


def test_sweep_file_without_class_gives_nested_dicts(tmp_path: Path) -> None:
    """With no class, dotted keys nest and an axis mapping merges into the base mapping."""
    path = write(
        tmp_path,
        """\
        base: {model: a, opt: {lr: 0.1, momentum: 0.9}}
        axes:
          - params: {opt.lr: [0.5]}
          - params: {data: [{path: x.csv}]}
        """,
    )
    assert resweep.load_configs(path) == [
        {"model": "a", "opt": {"lr": 0.5, "momentum": 0.9}, "data": {"path": "x.csv"}}
    ]


def test_sweep_file_nested_mapping_on_an_axis_fills_a_nested_dataclass(tmp_path: Path) -> None:
    """A mapping value for a dataclass field builds that dataclass, keeping unset defaults."""
    path = write(
        tmp_path,
        """\
        base: {model: a, optimizer.momentum: 0.5}
        axes:
          - params: {optimizer: [{lr: 1.0}, {lr: 2.0}]}
        """,
    )
    assert [c.optimizer for c in resweep.load_configs(path, Config)] == [
        Optimizer(lr=1.0, momentum=0.5),
        Optimizer(lr=2.0, momentum=0.5),
    ]


def test_sweep_file_values_convert_to_enums_and_floats(tmp_path: Path) -> None:
    """An enum field takes its member's value; an int for a float field becomes a float."""
    path = write(tmp_path, "base: {model: a, mode: slow, optimizer.lr: 1, layers: [8, 8]}\n")
    (config,) = resweep.load_configs(path, Config)
    assert config.mode is Mode.SLOW
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.layers == [8, 8]


def test_sweep_file_values_are_not_shared_between_configs(tmp_path: Path) -> None:
    """Each config gets its own copy of a list or dict from the file."""
    path = write(tmp_path, "base: {layers: [1]}\nseeds: [0, 1]\n")
    first, second = resweep.load_configs(path)
    first["layers"].append(2)
    assert second["layers"] == [1]


BAD_SWEEPS = {
    "str-for-int": (
        "base: {model: a}\naxes:\n  - params: {steps: [10, '20']}\n",
        ["axes[0] (grid)", "key 'steps'", "'20' is a str, expected int"],
    ),
    "yaml-exponent": (
        "base: {model: a}\naxes:\n  - params: {optimizer.lr: [1e-3]}\n",
        ["axes[0] (grid)", "key 'optimizer.lr'", "YAML reads 1e-3 as a string"],
    ),
    "yaml-bool": (
        "base: {model: no}\n",
        ["base", "key 'model'", "False is a bool, expected str", "quote the word"],
    ),
    "unknown-field": (
        "base: {model: a}\naxes:\n  - mode: zip\n    params: {lr: [1], seed: [0]}\n",
        ["axes[0] (zip)", "key 'lr'", "Config has no field 'lr'"],
    ),
    "unknown-field-suggestion": (
        "base: {model: a, stepz: 3}\n",
        ["base", "key 'stepz'", "did you mean 'steps'?"],
    ),
    "unknown-nested-field": (
        "base: {model: a}\naxes:\n  - params: {optimizer.momentun: [0.9]}\n",
        ["key 'optimizer.momentun'", "Optimizer", "did you mean 'momentum'?"],
    ),
    "unknown-field-in-nested-mapping": (
        "base: {model: a}\naxes:\n  - params: {optimizer: [{lrr: 1}]}\n",
        ["axes[0] (grid)", "key 'optimizer.lrr'", "did you mean 'lr'?"],
    ),
    "same-key-two-axes": (
        "base: {model: a}\naxes:\n  - params: {steps: [1]}\n  - mode: zip\n    params: {steps: [2]}\n",
        ["axes[1] (zip)", "key 'steps'", "already set by axes[0]"],
    ),
    "overlapping-keys": (
        "base: {model: a}\naxes:\n  - params: {optimizer: [{lr: 1}]}\n  - params: {optimizer.lr: [2]}\n",
        ["axes[1] (grid)", "key 'optimizer.lr'", "'optimizer', which overlaps it"],
    ),
    "seed-on-axis-and-seeds": (
        "base: {model: a}\naxes:\n  - params: {seed: [1, 2]}\nseeds: [0, 1]\n",
        ["seeds", "key 'seed'", "already set by axes[0]"],
    ),
    "zip-unequal": (
        "base: {model: a}\naxes:\n  - mode: zip\n    params: {steps: [1, 2, 3], tag: [x, y]}\n",
        ["axes[0] (zip)", "equal length", "'steps' has 3", "'tag' has 2"],
    ),
    "empty-axis": (
        "base: {model: a}\naxes:\n  - params: {steps: []}\n",
        ["axes[0] (grid)", "key 'steps'", "empty"],
    ),
    "empty-seeds": ("base: {model: a}\nseeds: []\n", ["seeds", "empty"]),
    "empty-params": ("base: {model: a}\naxes:\n  - mode: grid\n", ["axes[0] (grid)", "params"]),
    "empty-file": ("", ["the sweep file is empty"]),
    "scalar-axis": (
        "base: {model: a}\naxes:\n  - params: {steps: 3}\n",
        ["axes[0] (grid)", "key 'steps'", "give a list of values, not 3"],
    ),
    "duplicate-values": (
        "base: {model: a}\naxes:\n  - params: {steps: [1, 2, 1]}\n",
        ["key 'steps'", "#0 and #2 are both 1"],
    ),
    "duplicate-zip-rows": (
        "base: {model: a}\naxes:\n  - mode: zip\n    params: {steps: [1, 1], tag: [x, x]}\n",
        ["axes[0] (zip)", "rows #0 and #1"],
    ),
    "bad-mode": (
        "base: {model: a}\naxes:\n  - mode: product\n    params: {steps: [1]}\n",
        ["axes[0]", "mode 'product' is neither grid nor zip"],
    ),
    "misspelt-top-key": ("base: {model: a}\nseed: [1, 2]\n", ["unknown key 'seed'", "'seeds'"]),
    "misspelt-axis-key": (
        "base: {model: a}\naxes:\n  - mode: grid\n    param: {steps: [1]}\n",
        ["axes[0]", "unknown key 'param'", "did you mean 'params'?"],
    ),
    "key-twice-in-a-mapping": (
        "base: {model: a}\naxes:\n  - params: {steps: [1], steps: [2]}\n",
        ["line 3", "key 'steps' is given twice"],
    ),
    "missing-required-field": (
        "axes:\n  - params: {steps: [1]}\n",
        ["config #0", "no value for Config field(s) 'model'"],
    ),
    "wrong-enum-value": ("base: {model: a, mode: medium}\n", ["key 'mode'", "expected Mode"]),
    "wrong-list-item": ("base: {model: a, layers: [1, x]}\n", ["key 'layers'", "list[int]"]),
    "not-a-mapping": ("- a\n- b\n", ["a mapping with base, axes and seeds"]),
    "invalid-yaml": ("base: {model: [\n", ["is not valid YAML at line 2"]),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_sweep_file_errors_name_file_axis_and_key(tmp_path: Path, case: str) -> None:
    """Each mistake in a sweep file is a ConfigError naming the file, the axis and the key."""
    text, fragments = BAD_SWEEPS[case]
    path = write(tmp_path, text, name=f"{case}.yaml")
    with pytest.raises(ConfigError) as info:
        resweep.load_configs(path, Config)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


def test_sweep_file_missing_is_a_clear_error(tmp_path: Path) -> None:
    """A path that does not exist is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist"):
        resweep.load_configs(tmp_path / "nope.yaml")


def test_sweep_file_unchecked_without_class(tmp_path: Path) -> None:
    """With no class any key and value is accepted; structural errors are still caught."""
    path = write(tmp_path, "axes:\n  - params: {anything: ['1e-3', 2]}\n")
    assert resweep.load_configs(path) == [{"anything": "1e-3"}, {"anything": 2}]
    bad = write(tmp_path, "axes:\n  - params: {a: [1]}\n  - params: {a.b: [2]}\n", "bad.yaml")
    with pytest.raises(ConfigError, match="overlaps"):
        resweep.load_configs(bad)


def test_sweep_file_base_only_gives_one_config(tmp_path: Path) -> None:
    """A file with just a base is one config; seeds alone replicate it."""
    assert resweep.load_configs(write(tmp_path, "base: {model: a}\n"), Config) == [
        Config(model="a")
    ]
    path = write(tmp_path, "base: {model: a}\nseeds: [3, 4]\n", "seeds.yaml")
    assert [c.seed for c in resweep.load_configs(path, Config)] == [3, 4]


def test_expand_takes_parsed_specs() -> None:
    """expand() works on an already-parsed mapping, naming the given source in errors."""
    assert sweeps.expand({"seeds": [1]}, None, "inline") == [{"seed": 1}]
    with pytest.raises(ConfigError, match=r"^inline: axes\[0\] \(zip\)"):
        sweeps.expand({"axes": [{"mode": "zip", "params": {"a": [1], "b": []}}]}, None, "inline")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_sweep_files_expand(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sweep file shipped in configs/ expands for the example, to uniquely named configs."""
    spec = importlib.util.spec_from_file_location("sweep_file", REPO / "experiments/sweep_file.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sweep_file", module)
    monkeypatch.setenv("SWEEP", str(path))
    spec.loader.exec_module(module)
    configs = resweep.load_configs(path, module.Config)
    assert configs == module.experiment.configs
    if path.name == "sgd.yaml":
        assert len(configs) == 3 * 2 * 2 * 3
    assert len(identity.name_configs(configs)) == len(configs)
