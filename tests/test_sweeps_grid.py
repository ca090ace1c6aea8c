"""grid(): the Cartesian product of axes, as dataclasses or dicts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

import resweep
from conftest import Config
from resweep.errors import ConfigError


@dataclass(frozen=True)
class Opt:
    lr: float = 0.1
    decay: float = 0.0


@dataclass(frozen=True)
class Nested:
    model: str
    opt: Opt = field(default_factory=Opt)


def test_grid_is_the_product_with_the_last_axis_fastest() -> None:
    """grid(Config, ...) yields every combination, the last axis varying fastest."""
    configs = resweep.grid(Config, model=["a", "b"], lr=[0.1, 0.01], seed=range(2))
    assert len(configs) == 8
    assert configs[:3] == [Config("a", 0.1, 0), Config("a", 0.1, 1), Config("a", 0.01, 0)]
    assert configs[-1] == Config("b", 0.01, 1)


def test_grid_without_a_class_gives_dicts() -> None:
    """grid(None, ...) gives plain dicts, nested for dotted keys."""
    assert resweep.grid(None, x=[1, 2], **{"opt.lr": [0.5]}) == [
        {"x": 1, "opt": {"lr": 0.5}},
        {"x": 2, "opt": {"lr": 0.5}},
    ]


def test_grid_dotted_keys_set_nested_dataclass_fields() -> None:
    """A dotted axis sets a field of a nested dataclass, leaving its other fields default."""
    configs = resweep.grid(Nested, model=["m"], **{"opt.lr": [0.1, 0.2]})
    assert configs == [Nested("m", Opt(0.1)), Nested("m", Opt(0.2))]


def test_grid_leaves_defaults_to_the_class() -> None:
    """Fields not given as axes keep their defaults."""
    assert resweep.grid(Config, model=["a"], lr=[1.0]) == [Config("a", 1.0, 0)]


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"model": ["a"], "lr": [0.1], "sed": [1]}, "no field 'sed'; did you mean 'seed'"),
        ({"model": ["a"], "lr": []}, "empty"),
        ({"model": "ab", "lr": [0.1]}, "list of values"),
        ({"model": ["a"], "lr": ["fast"]}, "expected float"),
        ({"model": ["a"], "lr": [True]}, "expected float"),
        ({"model": ["a"]}, "no value for Config field"),
    ],
    ids=["unknown-field", "empty", "string-axis", "wrong-type", "bool-number", "missing"],
)
def test_grid_errors_are_clear(axes: dict[str, object], message: str) -> None:
    """A typo, an empty axis, a string axis or a wrong type is a ConfigError saying which."""
    with pytest.raises(ConfigError, match=message):
        resweep.grid(Config, **axes)


def test_grid_int_for_a_float_field_is_the_same_config() -> None:
    """lr=1 and lr=1.0 from a grid give the same config name."""
    from resweep import identity

    one, one_float = resweep.grid(Config, model=["a"], lr=[1, 1.0])
    assert identity.default_name(identity.canonical(one)) == identity.default_name(
        identity.canonical(one_float)
    )
