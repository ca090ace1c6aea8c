"""Properties on generated data: one canonical form of a config, and state and flow text that
read back as what was written."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import same
from resweep import identity
from resweep.encoding import decode_flow, encode_flow, encode_line
from resweep.state import State, dump_state, parse_state

SETTINGS = settings(max_examples=75, deadline=None)

# Floats that a careless encoder or comparison gets wrong.
SPECIAL_FLOATS = [math.nan, -0.0, 0.0, 1e300, -1e300, math.inf, -math.inf, 1e-05, 1e16, 5e-324]


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


floats = st.floats() | st.sampled_from(SPECIAL_FLOATS)
ints = st.integers() | st.sampled_from([0, 1, -1, 2**63, -(2**70)])
# Any unicode but lone surrogates (the state and flow tests below add those).
characters = st.characters(exclude_categories=["Cs"])
texts = st.text(characters, max_size=12)
keys = st.text(characters, max_size=6)
scalars = st.none() | st.booleans() | ints | floats | texts


def plain_data(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nested lists and dicts with string keys over the given leaves."""
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=5,
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


field_names = st.sampled_from(["a", "b", "lr", "seed", "model", "depth", "x_1", "tags", "é"])

_lists = st.lists(plain_data(scalars), max_size=3)
# Values a user might give a field of each kind (an int where a float is declared too).
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "int": ints,
    "float": floats | ints,
    "str": texts,
    "optional_float": st.none() | floats | ints,
    "optional_int": st.none() | ints,
    "dict": st.dictionaries(keys, plain_data(scalars), max_size=3),
    "list": _lists | _lists.map(tuple),
    "any": plain_data(scalars | st.sampled_from(Color)),
}


def values_of(kind: str, nested: ClassSpec | None) -> st.SearchStrategy[Any]:
    if kind == "nested":
        assert nested is not None
        return instances(nested)
    return VALUES[kind]


def make_class(specs: list[FieldSpec] | tuple[FieldSpec, ...], depth: int = 0) -> ClassSpec:
    """The dataclass with these fields, keyword-only so that defaults may come in any order."""
    fields: list[tuple[str, Any, Any]] = []
    for f in specs:
        annotation = f.nested.cls if f.nested else ANNOTATIONS[f.kind]
        if f.default is _MISSING:
            fields.append((f.name, annotation, dataclasses.field()))
        else:
            factory = lambda d=f.default: copy.deepcopy(d)  # noqa: E731
            fields.append((f.name, annotation, dataclasses.field(default_factory=factory)))
    cls = dataclasses.make_dataclass(f"Generated{depth}", fields, kw_only=True, eq=False)
    return ClassSpec(cls, tuple(specs))


@st.composite
def field_specs(draw: st.DrawFn, name: str, depth: int, with_default: bool | None) -> FieldSpec:
    kind = draw(st.sampled_from(KINDS if depth < 1 else KINDS[:-1]))
    nested = draw(class_specs(depth + 1)) if kind == "nested" else None
    values = values_of(kind, nested)
    if with_default is None:
        default = draw(st.just(_MISSING) | values)
    else:
        default = draw(values) if with_default else _MISSING
    return FieldSpec(name, kind, nested, default)


@st.composite
def class_specs(draw: st.DrawFn, depth: int = 0) -> ClassSpec:
    """A dataclass with a few typed fields, some with defaults, maybe nesting another one."""
    names = draw(st.lists(field_names, max_size=4, unique=True))
    return make_class([draw(field_specs(name, depth, None)) for name in names], depth)


def look_alikes(value: Any) -> st.SearchStrategy[Any]:
    """Values equal to value under Python's ==, which the canonical form may still tell apart."""
    if isinstance(value, bool):
        return st.sampled_from([value, int(value), float(value)])
    if isinstance(value, int) and abs(value) <= 2**53:
        return st.sampled_from([value, float(value)])
    if isinstance(value, float):
        twins: list[Any] = [-value] if value == 0 or math.isnan(value) else [value]
        if math.isfinite(value) and value.is_integer():
            twins.append(int(value))
        return st.sampled_from([float(repr(v)) if isinstance(v, float) else v for v in twins])
    return st.just(copy.deepcopy(value))


class Arguments(NamedTuple):
    given: dict[str, Any]  # keyword arguments for the class
    defaults: frozenset[str]  # those of them that are the field's default, given explicitly


@st.composite
def arguments(draw: st.DrawFn, spec: ClassSpec) -> Arguments:
    """Arguments for the class: a defaulted field left out, given its default or a look-alike of
    it, or set."""
    given: dict[str, Any] = {}
    defaults = set()
    for f in spec.fields:
        if f.default is not _MISSING:
            choice = draw(st.sampled_from(["omit", "default", "look-alike", "value"]))
            if choice == "omit":
                continue
            if choice == "default":
                given[f.name] = copy.deepcopy(f.default)
                defaults.add(f.name)
                continue
            if choice == "look-alike":
                given[f.name] = draw(look_alikes(f.default))
                continue
        given[f.name] = draw(values_of(f.kind, f.nested))
    return Arguments(given, frozenset(defaults))


def instances(spec: ClassSpec) -> st.SearchStrategy[Any]:
    return arguments(spec).map(lambda args: spec.cls(**args.given))


dataclass_configs = class_specs().flatmap(instances)
dict_configs = st.dictionaries(keys, plain_data(scalars) | dataclass_configs, max_size=4)
configs = dataclass_configs | dict_configs


def text_of(params: Any) -> str:
    """The canonical JSON the hash of a name is taken of."""
    return identity.canonical_json(params)


_ALONE: dict[tuple[str, type | None], type] = {}


def text_alone(kind: str, nested: ClassSpec | None, value: Any) -> str:
    """The canonical text of value as the only field of a class, declared of this kind."""
    key = (kind, nested.cls if nested else None)
    if key not in _ALONE:
        _ALONE[key] = make_class([FieldSpec("v", kind, nested, _MISSING)]).cls
    return text_of(identity.canonical(_ALONE[key](v=value)))


def names_of(*configs: Any) -> list[str]:
    return list(identity.name_configs(configs))


# --- canonical form ------------------------------------------------------------------------


def is_plain_sorted(value: Any) -> bool:
    """Whether value is made of str, int, float, bool, None, lists and key-sorted dicts."""
    if isinstance(value, dict):
        return list(value) == sorted(value) and all(map(is_plain_sorted, value.values()))
    if isinstance(value, list):
        return all(map(is_plain_sorted, value))
    return value is None or type(value) in (str, int, float, bool)


@SETTINGS
@given(configs)
def test_the_canonical_form_is_sorted_plain_data_that_is_its_own_canonical_form(
    config: Any,
) -> None:
    """The canonical form, with or without defaults, is sorted plain data and maps to itself."""
    for keep_defaults in (False, True):
        form = identity.canonical(config, keep_defaults=keep_defaults)
        assert is_plain_sorted(form)
        assert same(identity.canonical(form, keep_defaults=keep_defaults), form)
        assert same(identity.canonical(copy.deepcopy(config), keep_defaults=keep_defaults), form)
    [(name, named)] = identity.name_configs([config]).items()
    assert named.config is config
    assert same(named.params, identity.canonical(config, keep_defaults=True))
    assert name == identity.default_name(identity.canonical(config))


@SETTINGS
@given(st.data(), class_specs())
def test_a_field_given_its_default_is_the_same_config_as_one_left_out(
    data: st.DataObject, spec: ClassSpec
) -> None:
    """Giving a field its default explicitly changes neither the identity nor the full params."""
    args = data.draw(arguments(spec))
    implicit = {k: v for k, v in args.given.items() if k not in args.defaults}
    explicit_config, implicit_config = spec.cls(**args.given), spec.cls(**implicit)
    for keep_defaults in (False, True):
        assert same(
            identity.canonical(explicit_config, keep_defaults=keep_defaults),
            identity.canonical(implicit_config, keep_defaults=keep_defaults),
        )
    assert names_of(explicit_config) == names_of(implicit_config)


@SETTINGS
@given(class_specs())
def test_a_config_with_every_field_at_its_default_has_an_empty_identity(spec: ClassSpec) -> None:
    """A class whose fields all have defaults, built with none given, is identified by {}."""
    spec = make_class([f for f in spec.fields if f.default is not _MISSING])
    config = spec.cls()
    assert identity.canonical(config) == {}
    assert set(identity.canonical(config, keep_defaults=True)) == {f.name for f in spec.fields}


@SETTINGS
@given(st.data(), class_specs())
def test_the_identity_is_the_full_params_without_fields_at_their_default(
    data: st.DataObject, spec: ClassSpec
) -> None:
    """The identity keeps exactly the fields whose canonical value differs from the default's."""
    config = data.draw(instances(spec))
    ident = identity.canonical(config)
    full = identity.canonical(config, keep_defaults=True)
    assert list(full) == sorted(f.name for f in spec.fields)
    assert list(ident) == sorted(ident)
    for f in spec.fields:
        value = getattr(config, f.name)
        if f.default is _MISSING:
            assert f.name in ident
            continue
        value_text = text_alone(f.kind, f.nested, value)
        assert (f.name in ident) == (value_text != text_alone(f.kind, f.nested, f.default))
        if f.name in ident and f.nested is None:
            assert same(ident[f.name], full[f.name])


@pytest.mark.parametrize("kind", ["int", "float", "optional_float", "str", "any"])
@SETTINGS
@given(data=st.data())
def test_a_value_is_left_out_exactly_when_its_canonical_form_is_the_default(
    data: st.DataObject, kind: str
) -> None:
    """A field leaves the identity exactly when its value has the canonical text of its default."""
    values = values_of(kind, None)
    default = data.draw(st.sampled_from(SPECIAL_FLOATS) | values if "float" in kind else values)
    spec = make_class([FieldSpec("x", kind, None, default)])
    value = data.draw(look_alikes(default) if data.draw(st.booleans()) else values)
    ident = identity.canonical(spec.cls(x=value))
    assert ("x" in ident) == (text_alone(kind, None, value) != text_alone(kind, None, default))
    if "x" not in ident:
        assert names_of(spec.cls(x=value)) == names_of(spec.cls())


@SETTINGS
@given(st.data(), class_specs())
def test_configs_that_differ_in_a_value_differ_in_identity(
    data: st.DataObject, spec: ClassSpec
) -> None:
    """Two configs of one class have the same identity exactly when their full params agree."""
    args = data.draw(arguments(spec))
    first = spec.cls(**args.given)
    # The second config: a field set to a look-alike of its value or default, or another value.
    changed = dict(args.given)
    if spec.fields:
        f = data.draw(st.sampled_from(spec.fields))
        start = (
            getattr(first, f.name)
            if f.default is _MISSING
            else data.draw(st.sampled_from([getattr(first, f.name), f.default]))
        )
        changed[f.name] = data.draw(look_alikes(start) | values_of(f.kind, f.nested))
    second = spec.cls(**changed)
    same_full = text_of(identity.canonical(first, keep_defaults=True)) == text_of(
        identity.canonical(second, keep_defaults=True)
    )
    assert same_full == (text_of(identity.canonical(first)) == text_of(identity.canonical(second)))
    assert same_full == (names_of(first) == names_of(second))


@SETTINGS
@given(st.data(), class_specs(), field_names, st.booleans())
def test_adding_a_field_with_a_default_keeps_every_identity(
    data: st.DataObject, spec: ClassSpec, new_name: str, nested: bool
) -> None:
    """A class that grows a defaulted field gives every old config the same identity and name."""
    if new_name in {f.name for f in spec.fields}:
        return
    added = data.draw(field_specs(new_name, 0 if nested else 2, True))
    grown = make_class([*spec.fields, added])
    args = data.draw(arguments(spec))
    old, new = spec.cls(**args.given), grown.cls(**args.given)
    assert same(identity.canonical(old), identity.canonical(new))
    assert names_of(old) == names_of(new)
    explicit = grown.cls(**args.given, **{new_name: copy.deepcopy(added.default)})
    assert same(identity.canonical(old), identity.canonical(explicit))


@SETTINGS
@given(
    st.integers(-(2**53), 2**53),
    st.sampled_from(["float", "optional_float"]),
    st.sampled_from(["int", "optional_int", "any", "dict"]),
)
def test_int_and_float_are_one_value_only_in_a_field_declared_float(
    number: int, float_kind: str, other_kind: str
) -> None:
    """n and float(n) are one config in a float field, two anywhere else; bools stay bools."""
    floaty = make_class([FieldSpec("x", float_kind, None, _MISSING)]).cls
    as_int, as_float = (
        identity.canonical(floaty(x=number)),
        identity.canonical(floaty(x=float(number))),
    )
    assert same(as_int, as_float)
    assert type(as_int["x"]) is float
    assert names_of(floaty(x=number)) == names_of(floaty(x=float(number)))
    assert same(identity.canonical(floaty(x=True)), {"x": True})

    other = make_class([FieldSpec("x", other_kind, None, _MISSING)]).cls
    if other_kind == "dict":
        int_config, float_config = other(x={"n": number}), other(x={"n": float(number)})
    else:
        int_config, float_config = other(x=number), other(x=float(number))
    assert text_of(identity.canonical(int_config)) != text_of(identity.canonical(float_config))
    assert names_of(int_config) != names_of(float_config)
    assert names_of({"x": number}) != names_of({"x": float(number)})


# Keys and values that keep default names readable, where a collision could hide. No '.' in
# keys: {"a.b": 1} and {"a": {"b": 1}} are both named a.b=1, a known ambiguity of readable names.
name_keys = st.text("ab_", min_size=1, max_size=2)
name_values = st.sampled_from(
    [0, 1, -1, 0.0, -0.0, 1.0, 0.5, 1e-05, 1e300, math.nan, math.inf, -math.inf, True, False,
     None, "a", "b", "1", "1.0", "nan", "inf", "true", "None", "a b", "", "a=b", "x" * 70]
)  # fmt: skip
readable_configs = st.recursive(
    st.dictionaries(name_keys, name_values, max_size=3),
    lambda inner: st.dictionaries(
        name_keys, name_values | inner | st.lists(name_values), max_size=3
    ),
    max_leaves=6,
)


@SETTINGS
@given(readable_configs, readable_configs)
def test_default_names_are_equal_exactly_when_identities_are(first: Any, second: Any) -> None:
    """Two configs get one default name exactly when their canonical forms are the same."""
    reordered = dict(reversed(first.items()))
    assert names_of(first) == names_of(reordered) == names_of(copy.deepcopy(first))
    first_name, second_name = names_of(first)[0], names_of(second)[0]
    assert first_name == identity.default_name(identity.canonical(first))
    same_form = text_of(identity.canonical(first)) == text_of(identity.canonical(second))
    assert same_form == (first_name == second_name)


# --- the state file ------------------------------------------------------------------------

# Characters that YAML, JSON or a line-based reader treat specially, lone surrogates included.
TRICKY_CHARACTERS = [
    *'"\':#-{}[],&*!|>%@`?~= \t\n\r', "\x00", "\x7f", "\x85", "\xa0", "\u2028", "\ufeff",
    "é", "日", "🎉", "\U0001d518", "\ud800", "\udbff", "\udc00", "\udce9",
]  # fmt: skip
# A high surrogate right before a low one is one character to every UTF-16 reader, JSON's too.
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
any_texts = st.text(
    st.characters(exclude_categories=()) | st.sampled_from(TRICKY_CHARACTERS), max_size=10
).filter(lambda s: not _SURROGATE_PAIR.search(s))
# Strings that YAML 1.1 reads as something else when they are not quoted, or over lines.
look_alike_texts = st.sampled_from(
    ["1", "1.0", "1e-05", "1e5", "0E0", ".nan", "NaN", "-Infinity", "-.inf", "0x10", "0o17",
     "1_000", "true", "no", "on", "null", "~", "", " lead", "trail ", "- x", "a: b", "# c",
     "2001-12-14", "12:30:00", "configs:", "# end of state: 3 configs", '"', "'", "\\", '\\"',
     "e-5", "line\nbreak", "\n", "\r\n", "tab\there"]
)  # fmt: skip
flow_texts = any_texts | look_alike_texts
flow_floats = st.floats() | st.sampled_from(
    [*SPECIAL_FLOATS, 1.5e-07, 1e20, -2.5e-300, 0.1, 2.0**70, 1e22, 1e-7]
)
flow_leaves = st.none() | st.booleans() | ints | flow_floats | flow_texts
flow_values = st.recursive(
    flow_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(flow_texts, inner, max_size=3),
    max_leaves=8,
)
records = st.fixed_dictionaries(
    {
        "params": st.dictionaries(flow_texts, flow_values, max_size=3),
        "status": st.sampled_from(["todo", "running", "done", "failed"]),
        "attempts": st.integers(0, 10**6),
    },
    optional={
        "result": flow_values,
        "error": st.none() | flow_texts,
        "start_time": st.just("2024-01-01T00:00:00.000+00:00"),
        "duration_s": flow_floats,
        "interruptions": st.integers(0, 5),
    },
)
states = st.builds(
    State,
    name=st.none() | flow_texts,
    description=st.none() | flow_texts,
    configs=st.dictionaries(flow_texts, records, max_size=4),
    journal_seq=st.integers(0, 2**63),
    sessions=st.dictionaries(
        flow_texts, st.dictionaries(flow_texts, flow_values, max_size=3), max_size=2
    ),
)
PATH = Path("experiment.yaml")


def state_data(state: State) -> dict[str, object]:
    """What a state file holds, as yaml.safe_load gives it."""
    return {
        "format_version": state.format_version,
        "name": state.name,
        "description": state.description,
        "journal_seq": state.journal_seq,
        "sessions": state.sessions,
        "configs": state.configs,
    }


@settings(max_examples=150, deadline=None)
@given(states)
def test_a_dumped_state_reads_back_the_same_and_as_yaml_reads_it(state: State) -> None:
    """dump_state's text reads back as the state through parse_state and through yaml.safe_load."""
    text = dump_state(state)
    assert text.count("\n") == 9 + len(state.configs)  # one line a config
    assert same(state_data(parse_state(text, PATH)), state_data(state))
    assert same(yaml.safe_load(text), state_data(state))


@settings(max_examples=60, deadline=None)
@given(
    states,
    st.sampled_from([False, None, True]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([20, 80, 2**31 - 1]),
)
def test_a_state_rewritten_by_a_yaml_tool_reads_as_yaml_reads_it(
    state: State, flow_style: bool | None, unicode: bool, sort_keys: bool, width: int
) -> None:
    """The state rewritten in any layout yaml.safe_dump makes reads as yaml.safe_load reads it."""
    edited = yaml.safe_dump(
        yaml.safe_load(dump_state(state)),
        default_flow_style=flow_style,
        allow_unicode=unicode,
        sort_keys=sort_keys,
        width=width,
    )
    # Not always the state itself: PyYAML's writer garbles a few strings, such as "\x85".
    assert same(state_data(parse_state(edited, PATH)), yaml.safe_load(edited))


LINE_EDITS = ["keep", "unquote status", "comment after", "comment before", "blank", "delete"]


@settings(max_examples=60, deadline=None)
@given(states, st.data())
def test_a_state_edited_line_by_line_reads_as_yaml_reads_it(
    state: State, data: st.DataObject
) -> None:
    """Config lines edited by hand (status unquoted, comments, gaps) read as YAML reads them."""
    lines = []
    for line in dump_state(state).split("\n"):
        edit = data.draw(st.sampled_from(LINE_EDITS)) if line.startswith("  ") else "keep"
        if edit == "unquote status":
            line = re.sub(r'"status": "(\w+)"', r'"status": \1', line)
        elif edit == "comment after":
            line += "  # checked by hand"
        elif edit == "comment before":
            lines.append("  # the next line was checked by hand")
        elif edit == "blank":
            lines.append("")
        if edit != "delete":
            lines.append(line)
    edited = "\n".join(lines)
    loaded = yaml.safe_load(edited)
    loaded["configs"] = loaded["configs"] or {}
    assert same(state_data(parse_state(edited, PATH)), loaded)


@settings(max_examples=100, deadline=None)
@given(st.none() | flow_texts, flow_texts, st.sampled_from([False, None]), st.booleans())
def test_a_name_and_description_rewritten_by_a_yaml_tool_read_as_yaml_reads_them(
    name: str | None, description: str, flow_style: bool | None, unicode: bool
) -> None:
    """A name and description rewritten in block YAML read back as yaml.safe_load reads them."""
    text = dump_state(State(name=name, description=description))
    edited = yaml.safe_dump(
        yaml.safe_load(text), default_flow_style=flow_style, allow_unicode=unicode, sort_keys=False
    )
    parsed, loaded = parse_state(edited, PATH), yaml.safe_load(edited)
    assert same([parsed.name, parsed.description], [loaded["name"], loaded["description"]])


# --- the flow encoder ----------------------------------------------------------------------


def json_representable(value: object) -> bool:
    """Whether value has no NaN, infinity or lone surrogate, which JSON cannot spell."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not re.search("[\ud800-\udfff]", value)
    if isinstance(value, dict):
        return all(map(json_representable, [*value, *value.values()]))
    if isinstance(value, list):
        return all(map(json_representable, value))
    return True


@settings(max_examples=300, deadline=None)
@given(flow_values)
def test_encode_flow_writes_one_line_that_json_and_yaml_read_back(value: object) -> None:
    """encode_flow's line reads back via yaml.safe_load, decode_flow, and json.loads if JSON can."""
    text = encode_flow(value)
    assert text.splitlines() == [text]
    assert same(yaml.safe_load(text), value)
    assert same(decode_flow(text), value)
    if json_representable(value):
        assert same(json.loads(text), value)


@settings(max_examples=300, deadline=None)
@given(flow_values)
def test_encode_line_reads_back_through_decode_flow(value: object) -> None:
    """encode_line's one line reads back as the value through decode_flow."""
    text = encode_line(value)
    assert text.splitlines() == [text]
    assert same(decode_flow(text), value)
