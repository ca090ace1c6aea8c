"""Identity and names: canonical form, default names, unsafe and duplicate names."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import resweep
from conftest import Config, square
from resweep import identity
from resweep.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    width: int = 8


@dataclass(frozen=True)
class Outer:
    lr: float
    inner: Inner = field(default_factory=Inner)


@dataclass(frozen=True)
class Loose:
    value: Any


@dataclass(frozen=True)
class Counted:
    n: int


class Color(enum.Enum):
    RED = "red"


def test_canonical_sorts_keys_and_leaves_defaults_out() -> None:
    """The identity is plain sorted data without fields at their default."""
    assert identity.canonical(Config(model="a", lr=0.1)) == {"lr": 0.1, "model": "a"}
    assert list(identity.canonical(Config(model="a", lr=0.1, seed=3))) == ["lr", "model", "seed"]
    assert identity.canonical({"b": {"z": 1, "a": 2}, "a": 1}) == {"a": 1, "b": {"a": 2, "z": 1}}


def test_canonical_keep_defaults_lists_every_field() -> None:
    """The params a person reads keep every field, nested dataclasses included."""
    full = identity.canonical(Outer(lr=1, inner=Inner(depth=5)), keep_defaults=True)
    assert full == {"inner": {"depth": 5, "width": 8}, "lr": 1.0}
    assert identity.canonical(Outer(lr=1, inner=Inner(depth=5))) == {
        "inner": {"depth": 5},
        "lr": 1.0,
    }


def test_adding_a_field_with_a_default_keeps_identity() -> None:
    """A config class that grows a defaulted field gives old configs the same name."""

    @dataclass(frozen=True)
    class Before:
        model: str
        lr: float

    @dataclass(frozen=True)
    class After:
        model: str
        lr: float
        dropout: float = 0.0
        tags: tuple[str, ...] = ()

    old, new = Before("a", 0.1), After("a", 0.1)
    assert identity.canonical(old) == identity.canonical(new)
    assert identity.default_name(identity.canonical(old)) == identity.default_name(
        identity.canonical(new)
    )
    assert identity.canonical(After("a", 0.1, dropout=0.5)) != identity.canonical(old)


def test_nan_and_signed_zero_defaults_compare_as_canonical_data() -> None:
    """A field at a NaN default is left out like any other; -0.0 is not the default 0.0."""

    @dataclass(frozen=True)
    class Before:
        lr: float

    @dataclass(frozen=True)
    class After:
        lr: float
        threshold: float = math.nan
        shift: float = 0.0

    assert identity.canonical(After(0.1)) == identity.canonical(Before(0.1)) == {"lr": 0.1}
    assert identity.canonical(After(0.1, threshold=float("nan"))) == {"lr": 0.1}
    assert identity.canonical(After(0.1, shift=-0.0)) == {"lr": 0.1, "shift": -0.0}
    assert len(identity.name_configs([After(0.1), After(0.1, shift=-0.0)])) == 2


def test_int_and_float_same_where_the_field_is_float() -> None:
    """1 and 1.0 are one config for a float field, two for an int field or an untyped value."""
    assert identity.canonical(Config("a", 1)) == identity.canonical(Config("a", 1.0))
    assert type(identity.canonical(Config("a", 1))["lr"]) is float
    digest = identity.config_hash
    assert digest(identity.canonical(Loose(1))) != digest(identity.canonical(Loose(1.0)))
    assert digest(identity.canonical({"x": 1})) != digest(identity.canonical({"x": 1.0}))
    assert digest(identity.canonical(Loose(True))) != digest(identity.canonical(Loose(1)))
    assert identity.canonical(Counted(3)) == {"n": 3}


def test_names_of_one_and_one_point_zero_differ() -> None:
    """Untyped 1 and 1.0 and "1" get three different names."""
    names = {identity.default_name(identity.canonical({"x": v})) for v in (1, 1.0, "1")}
    assert len(names) == 3


def test_default_name_is_readable_when_short() -> None:
    """A short config is named by its sorted key=value pairs."""
    assert identity.default_name(identity.canonical(Config("a", 0.1))) == "lr=0.1,model=a"
    assert identity.default_name(identity.canonical(Config("a", 1e-05, 2))) == (
        "lr=1e-05,model=a,seed=2"
    )
    assert identity.default_name({"opt": {"lr": 0.1}}) == "opt.lr=0.1"


@pytest.mark.parametrize(
    "params",
    [
        {"model": "x" * 70},
        {"prompt": "a b"},
        {"flag": "true"},
        {"n": "1e5"},
        {"path": "a/b"},
        {"items": [1, 2]},
    ],
    ids=["long", "space", "keyword", "numeric-string", "slash", "list"],
)
def test_default_name_is_a_hash_when_not_readable(params: dict[str, Any]) -> None:
    """Long or ambiguous values give a 12-hex-digit hash of the canonical form."""
    name = identity.default_name(params)
    assert len(name) == 12
    assert all(c in "0123456789abcdef" for c in name)
    assert name == identity.config_hash(params)


def test_hash_is_the_same_on_every_machine() -> None:
    """The hash is fixed by the canonical form, not by this process (no hash() salt)."""
    params = {"prompt": "2+2 ?", "seed": 1}
    assert identity.config_hash(params) == "83ebe3032670"
    code = (
        "from resweep import identity; print(identity.config_hash({'seed': 1, 'prompt': '2+2 ?'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == "83ebe3032670"


def test_enum_and_nested_dataclass_values_are_plain_data() -> None:
    """Enums become their value and nested dataclasses become dicts."""
    assert identity.canonical({"c": Color.RED}) == {"c": "red"}
    assert identity.canonical({"o": Outer(0.5)}) == {"o": {"lr": 0.5}}


def test_an_int_too_large_for_a_float_field_is_a_config_error() -> None:
    """An int beyond any float, given to a float field, is a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=r"config #0: lr: .* too large for a float field"):
        identity.name_configs([Config("a", 10**400)])


@pytest.mark.parametrize("bad", [{1: "a"}, {"x": {2: "b"}}, {"x": object()}, {"x": {1, 2}}])
def test_unusable_config_values_are_rejected(bad: dict[Any, Any]) -> None:
    """Non-string keys and values that are not YAML-safe are a ConfigError."""
    with pytest.raises(ConfigError):
        identity.canonical(bad)


def test_config_that_is_neither_dataclass_nor_dict_is_rejected() -> None:
    """A list or a class as a config is a ConfigError."""
    with pytest.raises(ConfigError, match="dataclass instances or dicts"):
        identity.name_configs([[1, 2]])
    with pytest.raises(ConfigError):
        identity.name_configs([Config])


def test_unsafe_names_are_rejected_before_anything_runs(tmp_path: Path, unsafe_name: str) -> None:
    """A config_naming that returns an unsafe name fails the run and writes nothing."""
    out = tmp_path / "out"
    experiment = resweep.Experiment(
        function=square,
        configs=[Config("a", 0.1), Config("b", 0.2)],
        output_dir=out,
        config_naming=lambda c: unsafe_name if c.model == "b" else "fine",
    )
    with pytest.raises(ConfigError, match="config #1"):
        experiment.run(backend="sequential", progress=False)
    assert not out.exists()


def keeps_an_artifact(config: Config, ctx: resweep.Context) -> dict[str, float]:
    (ctx.dir / "artifact.txt").write_text(ctx.name, encoding="utf-8")
    return square(config)


def test_odd_but_safe_names_are_kept_exactly(tmp_path: Path, odd_safe_name: str) -> None:
    """Quotes, shell syntax and unicode in a name end up as that exact directory name."""
    experiment = resweep.Experiment(
        function=keeps_an_artifact,
        configs=[Config("a", 0.1)],
        output_dir=tmp_path / "out",
        config_naming=lambda c: odd_safe_name,
    )
    report = experiment.run(backend="sequential", progress=False)
    assert report.done == 1
    assert [p.name for p in (tmp_path / "out" / "configs").iterdir()] == [odd_safe_name]
    assert list(experiment.read_state().configs) == [odd_safe_name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("names", "message"),
    [(["same", "same"], "two different configs"), (["Case", "case"], "clashes with 'Case'")],
    ids=["duplicate", "case-only"],
)
def test_duplicate_names_are_rejected_before_anything_runs(
    tmp_path: Path, names: list[str], message: str
) -> None:
    """Two configs with one name (or names equal but for case) fail before any file is written."""
    it = iter(names)
    out = tmp_path / "out"
    experiment = resweep.Experiment(
        function=square,
        configs=[Config("a", 0.1), Config("b", 0.2)],
        output_dir=out,
        config_naming=lambda c: next(it),
    )
    with pytest.raises(ConfigError, match=message):
        experiment.run(backend="sequential", progress=False)
    assert not out.exists()


def test_the_same_config_twice_is_rejected(tmp_path: Path) -> None:
    """Listing one config twice is a ConfigError that says so."""
    experiment = resweep.Experiment(
        function=square, configs=[Config("a", 0.1), Config("a", 0.1)], output_dir=tmp_path / "o"
    )
    with pytest.raises(ConfigError, match="the same config twice"):
        experiment.run(backend="sequential", progress=False)
    assert not (tmp_path / "o").exists()


def test_config_naming_must_return_a_string() -> None:
    """A config_naming that returns a number is a ConfigError, not a silent str()."""
    with pytest.raises(ConfigError, match="not a str"):
        identity.name_configs([Config("a", 0.1)], lambda c: 123)  # type: ignore[arg-type,return-value]


def test_name_configs_keeps_order_and_full_params() -> None:
    """name_configs maps each name to the config and its params with defaults kept."""
    configs = [Config("b", 0.2), Config("a", 0.1, seed=1)]
    named = identity.name_configs(configs)
    assert list(named) == ["lr=0.2,model=b", "lr=0.1,model=a,seed=1"]
    first = named["lr=0.2,model=b"]
    assert first.config is configs[0]
    assert first.params == {"lr": 0.2, "model": "b", "seed": 0}
    assert dataclasses.is_dataclass(named["lr=0.1,model=a,seed=1"].config)


def test_bad_names_leave_an_existing_experiment_untouched(tmp_path: Path) -> None:
    """A later run whose names clash changes no byte of the experiment already on disk."""
    out = tmp_path / "out"
    good = resweep.Experiment(function=square, configs=[Config("a", 0.1)], output_dir=out)
    good.run(backend="sequential", progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = resweep.Experiment(
        function=square,
        configs=[Config("a", 0.1), Config("A", 0.1)],
        output_dir=out,
        config_naming=lambda c: c.model,
    )
    with pytest.raises(ConfigError, match="clashes"):
        bad.run(backend="sequential", progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- long names -----------------------------------------------------------------------------

LONG_PROMPT = "answer-step-by-step-and-check-every-intermediate-result"


def _within_limits(name: str) -> None:
    assert len(name) <= identity.MAX_READABLE_NAME_CHARS
    assert len(name.encode()) <= identity.MAX_NAME_BYTES
    assert identity.check_name(name, "test") == name


def test_a_long_name_keeps_a_readable_prefix_and_a_hash() -> None:
    """A name too long for 64 characters is cut at a key=value boundary and ends in a hash."""
    params = {
        "model": "claude-3",
        "prompt": "cot",
        "system": "you-are-a-careful-and-helpful-assistant",
        "temperature": 0.7,
    }
    name = identity.default_name(params)
    digest = identity.config_hash(params)
    assert name == f"model=claude-3,prompt=cot,\u2026-{digest}"
    _within_limits(name)
    # Another value past the prefix gives the same prefix and another hash.
    other = identity.default_name({**params, "temperature": 0.8})
    assert other.startswith("model=claude-3,prompt=cot,\u2026-")
    assert other != name


def test_a_name_whose_first_pair_does_not_fit_is_the_hash_alone() -> None:
    """No readable prefix (the first pair too long, or unreadable) leaves the 12-hex hash."""
    for params in ({"model": "x" * 70, "seed": 1}, {"a": "two words", "b": 1}):
        assert identity.default_name(params) == identity.config_hash(params)
    # An unreadable pair later on keeps the pairs before it.
    params = {"a": 1, "b": "two words"}
    assert identity.default_name(params) == f"a=1,\u2026-{identity.config_hash(params)}"


@pytest.mark.parametrize("letter", ["é", "日", "\U00020000"], ids=["2 bytes", "3 bytes", "4 bytes"])
def test_names_with_multi_byte_letters_stay_within_chars_and_bytes(letter: str) -> None:
    """Letters of any script are readable; a name never passes 64 characters or 255 bytes."""
    short = {"model": letter * 3, "seed": 1}
    assert identity.default_name(short) == f"model={letter * 3},seed=1"
    for width in range(1, 80, 7):
        params = {f"k{i}": letter * width for i in range(6)}
        name = identity.default_name(params)
        _within_limits(name)
        readable = ",".join(f"k{i}={letter * width}" for i in range(6))
        assert name == readable or name.endswith(identity.config_hash(params))


def test_decomposed_letters_and_marks_are_not_readable() -> None:
    """A string not in composed form, or with a combining mark or emoji, is not spelled out."""
    for value in ("nai\u0308ve", "a\u200db", "party\U0001f389"):
        assert identity.default_name({"m": value}) == identity.config_hash({"m": value})


def test_long_names_are_the_same_in_every_process() -> None:
    """The abbreviated name depends on the config only, not on the process's hash seed."""
    params = {"model": "claude-3", "prompt": LONG_PROMPT, "temperature": 0.7}
    code = f"from resweep import identity; print(identity.default_name({params!r}))"
    names = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONIOENCODING": "utf-8"},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert names == {identity.default_name(params)}


@dataclass(frozen=True)
class Prompted:
    model: str
    prompt: str
    temperature: float = 0.0
    seed: int = 0


GOLDEN_HASHED = Path(__file__).parent / "data" / "state_v1_hashed_names.yaml"
# The configs of the golden state, in order: resweep 0.1.0 named all but the first by a hash.
HASHED_CONFIGS = [
    Prompted("claude-3", "cot", 0.7),
    Prompted("claude-3", LONG_PROMPT, 0.7),
    Prompted("claude-3", LONG_PROMPT, 0.7, seed=1),
    Prompted("naïve", "cot"),
    Prompted("gpt-4", "two words"),
]
STORED_NAMES = [
    "model=claude-3,prompt=cot,temperature=0.7",
    "398e6105e77f",
    "79ef585a8a1b",
    "adde97baccae",
    "fd05824cc1ee",
]


def prompt_length(config: Prompted) -> dict[str, int]:
    return {"length": len(config.prompt) + config.seed}


def test_an_old_state_keeps_its_hashed_names(tmp_path: Path) -> None:
    """Configs an older resweep named by a hash keep those names: nothing new, nothing renamed."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(GOLDEN_HASHED, out / "experiment.yaml")
    experiment = resweep.Experiment(
        function=prompt_length, configs=HASHED_CONFIGS, output_dir=out, name="hashed-names"
    )
    assert list(experiment.named_configs()) == STORED_NAMES
    plan = experiment.plan()
    assert (plan.new, plan.todo, plan.done) == ([], [STORED_NAMES[0], STORED_NAMES[2]], 3)
    report = experiment.run(backend="sequential", progress=False)
    assert (report.done, report.executed) == (5, 2)
    state = experiment.read_state()
    assert list(state.configs) == STORED_NAMES
    assert state.configs["79ef585a8a1b"]["result"] == {"length": len(LONG_PROMPT) + 1}
    # A config added now gets a name of today's kind, next to the old ones.
    grown = resweep.Experiment(
        function=prompt_length,
        configs=[*HASHED_CONFIGS, Prompted("claude-3", LONG_PROMPT, 0.7, seed=2)],
        output_dir=out,
        name="hashed-names",
    )
    assert grown.run(backend="sequential", progress=False).executed == 1
    names = list(grown.read_state().configs)
    assert names[:5] == STORED_NAMES
    assert names[5].startswith("model=claude-3,\u2026-")
    assert grown.clean_index() == []
    # In a fresh directory the same configs get today's names.
    fresh = resweep.Experiment(
        function=prompt_length, configs=HASHED_CONFIGS, output_dir=tmp_path / "new"
    )
    assert list(fresh.named_configs())[3] == "model=naïve,prompt=cot"


# --- default names never clash -------------------------------------------------------------


def _value(config: dict[str, Any]) -> dict[str, Any]:
    return {"keys": sorted(config)}


CLASHING_SWEEPS = {
    "sharp s": [{"x": "ß"}, {"x": "ss"}],
    "sigma": [{"x": "Σ"}, {"x": "\u03c3"}, {"x": "ς"}],
    "ligature": [{"x": "ﬁ"}, {"x": "fi"}],
    "roman numeral": [{"x": "Ⅻ"}, {"x": "ⅻ"}],
    "ascii case": [{"x": "A"}, {"x": "a"}],
    "keys in case": [{"LR": 1}, {"lr": 1}],
    "no canonical member": [{"x": "ß"}, {"x": "SS"}],
    "nested and dotted": [{"a": {"b": 1}}, {"a.b": 1}],
    "one config, two values": [{"a": {"b": 1}, "a.b": 2}],
    "leading dash": [{"-x": 1}],
    "leading dash, more keys": [{"-x": 1, "b": 2}, {"-x": 2}],
}


@pytest.mark.parametrize("configs", list(CLASHING_SWEEPS.values()), ids=list(CLASHING_SWEEPS))
def test_default_names_never_clash_and_are_safe(tmp_path: Path, configs: list[Any]) -> None:
    """Distinct configs always run under the default naming: names that differ in more than
    case, safe and short, whatever order the configs come in."""
    experiment = resweep.Experiment(function=_value, configs=configs, output_dir=tmp_path / "o")
    report = experiment.run(backend="sequential", progress=False)
    assert (report.done, report.failed) == (len(configs), 0)
    names = list(experiment.read_state().configs)
    assert len({identity.fold(n) for n in names}) == len(configs)
    for name in names:
        _within_limits(name)
    assert list(identity.name_configs(configs)) == names
    assert set(identity.name_configs(list(reversed(configs)))) == set(names)
    # Each config's own directory holds its own result.
    for name, config in zip(names, configs, strict=True):
        assert experiment.result(name) == _value(config)


def test_clashing_default_names_are_golden() -> None:
    """Of names that differ only in case, one already in folded form stays readable; the others
    keep a readable prefix and a hash. A dotted key or a leading '-' leaves the hash alone."""
    named = [list(identity.name_configs(configs)) for configs in CLASHING_SWEEPS.values()]
    assert named == [
        ["x=ß,\u2026-7acca5d07284", "x=ss"],
        ["x=Σ,\u2026-d5387b78aa42", "x=\u03c3", "x=ς,\u2026-0b9f5eca2bf4"],
        ["x=ﬁ,\u2026-1cf0e834f4fa", "x=fi"],
        ["x=Ⅻ,\u2026-1b0d1446d078", "x=ⅻ"],
        ["x=A,\u2026-e659309e3f8b", "x=a"],
        [f"LR=1,\u2026-{identity.config_hash({'LR': 1})}", "lr=1"],
        ["x=ß,\u2026-7acca5d07284", "x=SS,\u2026-eb3bb7ebbd67"],
        ["a.b=1", "6e28a28bd896"],
        ["e6150677b44c"],
        ["7618eab2b429"],
        ["a9e8f5a731f3", identity.config_hash({"-x": 2})],
    ]


ORDINARY_NAMES = [
    (Config("GPT-4", 0.1), "lr=0.1,model=GPT-4"),
    (Config("a", 0.01, seed=2), "lr=0.01,model=a,seed=2"),
    ({"Optimizer": "Adam", "batch": 32}, "Optimizer=Adam,batch=32"),
    ({"model": "naïve", "prompt": "cot"}, "model=naïve,prompt=cot"),
    ({"x": "Straße"}, "x=Straße"),
    (Outer(lr=0.5, inner=Inner(depth=3)), "inner.depth=3,lr=0.5"),
    ({"opt": {"lr": 0.1, "name": "SGD"}}, "opt.lr=0.1,opt.name=SGD"),
    ({"a-b": 1, "+c": True}, "+c=True,a-b=1"),
]


def test_ordinary_names_are_unchanged() -> None:
    """Configs that never clashed keep the names they always had, capitals included."""
    configs = [config for config, _ in ORDINARY_NAMES]
    assert list(identity.name_configs(configs)) == [name for _, name in ORDINARY_NAMES]
    for config, name in ORDINARY_NAMES:
        assert identity.default_name(identity.canonical(config)) == name


def test_a_case_only_clash_in_custom_names_is_refused_in_plain_words() -> None:
    """A config_naming that gives names equal but for case is still refused, grammatically."""
    names = iter(["x=Straße", "X=STRASSE"])
    with pytest.raises(ConfigError) as caught:
        identity.name_configs([{"a": 1}, {"a": 2}], lambda c: next(names))
    message = str(caught.value)
    assert "name 'X=STRASSE' clashes with 'x=Straße'; names must be unique in more than case" in (
        message
    )
    assert "is clashes" not in message


def _run_names(out: Path, configs: list[Any]) -> tuple[list[str], int]:
    experiment = resweep.Experiment(function=_value, configs=configs, output_dir=out)
    report = experiment.run(backend="sequential", progress=False)
    return list(experiment.read_state().configs), report.executed


def test_names_in_a_state_stay_as_configs_that_differ_in_case_come_and_go(tmp_path: Path) -> None:
    """A config keeps the name the state holds it under when another that differs from it only
    in case is added or removed; nothing done runs again and no two names clash on disk."""
    out = tmp_path / "out"
    assert _run_names(out, [{"x": "A"}]) == (["x=A"], 1)
    # Added: the new config's name is made to differ from the stored one in more than case.
    names, executed = _run_names(out, [{"x": "A"}, {"x": "a"}])
    assert executed == 1 and names[0] == "x=A"
    assert names[1] == f"x=a,\u2026-{identity.config_hash({'x': 'a'})}"
    # Removed and added again: every config keeps its stored name.
    assert _run_names(out, [{"x": "a"}]) == (names, 0)
    assert _run_names(out, [{"x": "a"}, {"x": "A"}]) == (names, 0)
    # A fresh sweep of both names them by the rule; removing one keeps the other's name.
    fresh = tmp_path / "fresh"
    both, _ = _run_names(fresh, [{"x": "A"}, {"x": "a"}])
    assert both == ["x=A,\u2026-e659309e3f8b", "x=a"]
    assert _run_names(fresh, [{"x": "A"}]) == (both, 0)
    assert _run_names(fresh, [{"x": "A"}, {"x": "a"}]) == (both, 0)
    assert len({identity.fold(n) for n in both}) == 2
    # A config replaced by its case twin: the newcomer must not share the stored one's directory.
    swapped = tmp_path / "swapped"
    assert _run_names(swapped, [{"x": "A"}]) == (["x=A"], 1)
    assert _run_names(swapped, [{"x": "a"}]) == (["x=A", names[1]], 1)


def test_a_config_with_a_dotted_key_keeps_its_readable_name_in_an_older_state(
    tmp_path: Path,
) -> None:
    """A state from naming version 3 holds {"a.b": 1} as a.b=1: the config keeps that name,
    matched by its params, and the nested config that flattens alike is not taken for it."""
    out = tmp_path / "out"
    assert _run_names(out, [{"a.b": 1}]) == (["6e28a28bd896"], 1)
    state = out / "experiment.yaml"
    state.write_text(state.read_text(encoding="utf-8").replace("6e28a28bd896", "a.b=1"))
    assert _run_names(out, [{"a.b": 1}]) == (["a.b=1"], 0)
    # The nested config named a.b=1 by today's rule is not the stored one: refused, not merged.
    with pytest.raises(ConfigError, match=r"'a\.b=1' is stored for \{'a\.b': 1\}"):
        _run_names(out, [{"a": {"b": 1}}])
