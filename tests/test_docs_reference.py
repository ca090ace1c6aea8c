"""The Python API reference (docs/reference/api.md) documents exactly the names resweep exports."""

from __future__ import annotations

import re
from pathlib import Path

import resweep

API_REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "api.md"
# The heading of the section whose table lists the errors, one class per row.
ERRORS_SECTION = "Errors"
# Written as `resweep.__all__` in the reference, but the list of names, not a name in it.
NOT_A_NAME = {"__all__"}
# A string, not an object of the API: the reference gives it a heading of its own, checked
# apart from the other names.
VERSION = "__version__"

_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
# A heading that is one name in backticks: "### `grid`", "## `__version__`".
_NAME_HEADING = re.compile(r"^#{2,4} `([A-Za-z_]\w*)`\s*$", re.MULTILINE)
# A table row whose first cell is one name in backticks: "| `StateError` | ... |".
_NAME_ROW = re.compile(r"^\| `([A-Za-z_]\w*)` \|", re.MULTILINE)
# resweep.X anywhere, code examples included: resweep.grid(...), resweep.WorkerSetup(...).
_QUALIFIED = re.compile(r"\bresweep\.([A-Za-z_]\w*)")


def _sections(text: str) -> dict[str, str]:
    """The text under each level-2 heading, by the heading's text."""
    sections: dict[str, str] = {}
    title = ""
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
        sections[title] = sections.get(title, "") + line
    return sections


def documented_names() -> set[str]:
    """Every module-level name the reference documents.

    A name counts as documented when a heading is that name alone, when it heads a row of the
    errors table, or when the text or an example writes it as resweep.X. Headings and tables
    are read outside code blocks only, where a comment could look like a heading.
    """
    text = API_REFERENCE.read_text(encoding="utf-8")
    prose = _FENCE.sub("", text)
    names = set(_NAME_HEADING.findall(prose))
    names.update(_NAME_ROW.findall(_sections(prose).get(ERRORS_SECTION, "")))
    names.update(_QUALIFIED.findall(text))
    return names - NOT_A_NAME


def test_the_api_reference_documents_exactly_the_exported_names() -> None:
    """Every name in resweep.__all__ is in the API reference, and the reference names no other.

    A name added to __all__ needs its section (or errors table row) in docs/reference/api.md;
    a name the reference documents must be exported. __version__ is checked on its own.
    """
    documented = documented_names()
    exported = set(resweep.__all__)
    undocumented = sorted(exported - {VERSION} - documented)
    unexported = sorted(documented - {VERSION} - exported)
    assert not undocumented, f"exported by resweep but missing from {API_REFERENCE}: {undocumented}"
    assert not unexported, f"documented in {API_REFERENCE} but not in resweep.__all__: {unexported}"
    assert documented - {VERSION} == exported - {VERSION}
    assert VERSION in documented


def test_every_documented_name_imports_from_resweep() -> None:
    """`from resweep import X` works for every name the API reference documents."""
    for name in sorted(documented_names()):
        module = __import__("resweep", fromlist=[name])  # what `from resweep import name` does
        assert hasattr(module, name), f"from resweep import {name} fails"


def test_the_reference_is_read_as_expected() -> None:
    """The extraction sees the headings, the errors table and resweep.X, and nothing in code."""
    names = documented_names()
    assert {"Experiment", "grid", "open", "ExperimentView"} <= names  # headings
    assert {"ResweepError", "StorageError", "CacheKeyError"} <= names  # errors table
    assert "WorkerSetup" in names  # also written as resweep.WorkerSetup
    # Rows of other tables name attributes and methods, not module-level names.
    assert not {"configs", "results", "name", "description"} & names
