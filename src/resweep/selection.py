"""Choosing configs: a glob on their names (--only) and globs on their fields (--where)."""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from resweep.errors import SelectionError
from resweep.identity import flatten

# A field and the globs its value's text must match (any of them).
Where = Mapping[str, Any]
_GLOB_CHARS = frozenset("*?[")


def value_texts(value: Any) -> tuple[str, ...]:
    """The text forms a --where glob is matched against: how the value reads in YAML and Python.

    A bool reads as true/false (and True/False), None as null (and None), a number as Python
    writes it (0.7, 1e-05, 1.0), a list or an empty dict as compact JSON ([1,2]).
    """
    if value is True:
        return ("true", "True")
    if value is False:
        return ("false", "False")
    if value is None:
        return ("null", "None")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, int | float):
        return (repr(value),)
    return (json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False),)


def _number(text: str) -> float | None:
    """The number a glob without wildcards spells (1, 0.7, 1e-5), or None."""
    if _GLOB_CHARS.intersection(text):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def matches(value: Any, glob: str) -> bool:
    """Whether a field's value matches one --where glob.

    The glob matches the value's text form (value_texts), or equals it; a glob that is a plain number also
    matches a number equal to it, so seed=1 matches 1 and 1.0, and lr=1e-5 matches 0.00001.
    """
    # Equal text first: a list's text [1,2] would read as a glob's character class.
    if any(text == glob or fnmatch.fnmatchcase(text, glob) for text in value_texts(value)):
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = _number(glob)
        if number is not None:
            return bool(number == value or (math.isnan(number) and value != value))
    return False


def parse_where(items: Iterable[Any]) -> dict[str, list[str]]:
    """--where KEY=GLOB options as a mapping; the same key given twice matches either glob."""
    where: dict[str, list[str]] = {}
    for item in items:
        text = str(item)
        key, sep, glob = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SelectionError(
                f"--where takes KEY=GLOB (a field, dotted for nested, and a glob), not {text!r}"
            )
        where.setdefault(key, []).append(glob)
    return where


@dataclass(frozen=True)
class Selection:
    """Which configs a command takes: names matching only, fields matching every where key."""

    only: str | None = None
    # Field (dotted for nested) -> globs; a config's value must match one glob of each field.
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def of(cls, only: Any = None, where: Where | None = None) -> Selection:
        """A selection from run()'s only= and where=; a malformed where fails here."""
        if where is not None and not isinstance(where, Mapping):
            raise SelectionError(
                f"where is a mapping of field (dotted for nested) to glob, like "
                f"{{'model': 'gpt-*'}}, not a {type(where).__name__}"
            )
        pairs = []
        for key, globs in (where or {}).items():
            if not isinstance(key, str) or not key:
                raise SelectionError(f"where's keys are field names, not {key!r}")
            listed = globs if isinstance(globs, list | tuple | set | frozenset) else [globs]
            if not listed:
                raise SelectionError(f"where[{key!r}] gives no glob")
            texts = tuple(g if isinstance(g, str) else value_texts(g)[0] for g in listed)
            pairs.append((key, texts))
        return cls(None if only is None else str(only), tuple(pairs))

    @property
    def everything(self) -> bool:
        """Whether it selects every config."""
        return self.only is None and not self.where

    def describe(self) -> str:
        """The selection as its options read: --only 'x*' --where model=a*."""
        parts = [f"--only {self.only!r}"] if self.only is not None else []
        for key, globs in self.where:
            parts += [f"--where {key}={glob}" for glob in globs]
        return " ".join(parts)

    def choose(self, params: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
        """The names of the selected configs, in order; params: each config's params by name.

        A where key that is no field of any config is an error naming close ones, and so is a
        selection that matches no config at all.
        """
        if self.everything:
            return list(params)
        names = list(params)
        if self.only is not None:
            names = [n for n in names if fnmatch.fnmatchcase(n, self.only)]
        if self.where:
            flat = {n: flatten(params[n] or {}) for n in params}
            self._check_keys(flat.values())
            names = [n for n in names if self._fields_match(flat[n])]
        if not names:
            raise SelectionError(f"{self.describe()} matches none of {_count(len(params))}")
        return names

    def _fields_match(self, fields: Mapping[str, Any]) -> bool:
        for key, globs in self.where:
            if key not in fields:
                return False
            value = fields[key]
            if not any(matches(value, glob) for glob in globs):
                return False
        return True

    def _check_keys(self, flat: Iterable[Mapping[str, Any]]) -> None:
        known: set[str] = set()
        for fields in flat:
            known.update(fields)
        for key, _ in self.where:
            if key in known:
                continue
            nested = sorted(k for k in known if k.startswith(key + "."))
            if nested:
                hint = f"; it holds fields, choose one: {', '.join(nested[:5])}"
            else:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                hint = (
                    f"; did you mean {', '.join(close)}?"
                    if close
                    else f"; the fields are {', '.join(sorted(known)[:10]) or 'none'}"
                )
            raise SelectionError(f"--where {key}: no config has a field {key!r}{hint}")


def _count(n: int) -> str:
    return "the 1 config" if n == 1 else f"{n} configs"
