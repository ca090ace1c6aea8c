"""Properties on generated data: one canonical form of a config."""

from __future__ import annotations

import copy
import dataclasses
import enum
import keyword
import math
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resweep import identity
from resweep.errors import ConfigError

SETTINGS = settings(max_examples=200, deadline=None)

# Floats that a careless encoder or comparison gets wrong.
SPECIAL_FLOATS = [math.nan, -0.0, 0.0, 1e300, -1e300, math.inf, -math.inf, 1e-05, 1e16, 5e-324]


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


floats = st.floats() | st.sampled_from(SPECIAL_FLOATS)
ints = st.integers() | st.sampled_from([0, 1, -1, 2**63, -(2**70)])
texts = st.text(max_size=12)
keys = st.text(max_size=6)
scalars = st.none() | st.booleans() | ints | floats | texts


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to itself and keeps int, float, bool and -0.0 apart."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def plain_data(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nested lists and dicts with string keys over the given leaves."""
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=8,
    )


# --- generated config classes --------------------------------------------------------------

KINDS = ["int", "float", "str", "optional_float", "optional_int", "dict", "list", "any", "nested"]
ANNOTATIONS: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "optional_float": float | None,
    "optional_int": int | None,
    "dict": dict[str, Any],
    "list": list[Any],
    "any": Any,
}
_MISSING = dataclasses.MISSING


class FieldSpec(NamedTuple):
    name: str
    kind: str
    nested: ClassSpec | None  # the class of a nested-dataclass field
    default: Any  # _MISSING when the field has none


class ClassSpec(NamedTuple):
    cls: type
    fields: tuple[FieldSpec, ...]


field_names = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s)
)


def values_of(kind: str, nested: ClassSpec | None) -> st.SearchStrategy[Any]:
    """Values a user might give a field of this kind (an int where a float is declared too)."""
    if kind == "int":
        return ints
    if kind == "float":
        return floats | ints
    if kind == "str":
        return texts
    if kind == "optional_float":
        return st.none() | floats | ints
    if kind == "optional_int":
        return st.none() | ints
    if kind == "dict":
        return st.dictionaries(keys, plain_data(scalars), max_size=3)
    if kind == "list":
        lists = st.lists(plain_data(scalars), max_size=3)
        return lists | lists.map(tuple)
    if kind == "nested":
        assert nested is not None
        return instances(nested)
    return plain_data(scalars | st.sampled_from(Color))


@st.composite
def class_specs(draw: st.DrawFn, depth: int = 0) -> ClassSpec:
    """A dataclass with a few typed fields, some with defaults, maybe nesting another one."""
    names = draw(st.lists(field_names, max_size=5, unique=True))
    kinds = KINDS if depth < 2 else KINDS[:-1]
    specs = []
    fields: list[tuple[str, Any, Any]] = []
    for name in names:
        kind = draw(st.sampled_from(kinds))
        nested = draw(class_specs(depth + 1)) if kind == "nested" else None
        annotation = nested.cls if nested else ANNOTATIONS[kind]
        default = draw(st.just(_MISSING) | values_of(kind, nested))
        if default is _MISSING:
            fields.append((name, annotation, dataclasses.field()))
        else:
            factory = lambda d=default: copy.deepcopy(d)  # noqa: E731
            fields.append((name, annotation, dataclasses.field(default_factory=factory)))
        specs.append(FieldSpec(name, kind, nested, default))
    cls = dataclasses.make_dataclass(f"Generated{depth}", fields, kw_only=True)
    return ClassSpec(cls, tuple(specs))


@st.composite
def instances(draw: st.DrawFn, spec: ClassSpec) -> Any:
    """An instance of the class, each defaulted field left out, given its default, or set."""
    kwargs = {}
    for f in spec.fields:
        values = values_of(f.kind, f.nested)
        if f.default is not _MISSING:
            choice = draw(st.sampled_from(["omit", "default", "value"]))
            if choice == "omit":
                continue
            if choice == "default":
                kwargs[f.name] = copy.deepcopy(f.default)
                continue
        kwargs[f.name] = draw(values)
    return spec.cls(**kwargs)


dataclass_configs = class_specs().flatmap(instances)
dict_configs = st.dictionaries(keys, plain_data(scalars) | dataclass_configs, max_size=4)
configs = dataclass_configs | dict_configs


# --- canonical form ------------------------------------------------------------------------


@SETTINGS
@given(configs)
def test_fast_canonical_form_equals_the_reference(config: Any) -> None:
    """The fast path gives exactly the reference canonical form, with and without defaults."""
    try:
        reference = identity.canonical(config)
        reference_full = identity.canonical(config, keep_defaults=True)
    except ConfigError:
        with pytest.raises(ConfigError):
            identity._canonical_pair(config)
        return
    ident, full = identity._canonical_pair(config)
    assert same(ident, reference)
    assert same(full, reference_full)
