"""One-line text that both JSON and YAML readers read back: the state's and the journal's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

# Numbers such as 1e-05 that YAML 1.1 would read as strings; they get a ".0".
_BARE_EXPONENT = re.compile(r'("(?:[^"\\]|\\.)*")|(?<![\w.])(-?\d+)([eE][-+]?\d+)')
# A float's repr always signs its exponent (1e-05), so text without "e-" or "e+" needs no fix;
# a string that merely looks so costs the full pass, which leaves strings alone.
_EXPONENT = re.compile(r"e[-+]\d")
_SURROGATE_ESCAPE = re.compile(r"\\ud[89a-f]", re.IGNORECASE)


def yaml_module() -> Any:
    """PyYAML, imported at first use: a run writes and reads its own files as JSON lines, and
    the import would add about 25 ms to the start of the coordinator and of every worker."""
    import yaml

    return yaml


_loader: Any = None


def _text_times_loader() -> Any:
    """PyYAML's safe loader that reads an unquoted date or time as the string it is.

    A hand-edited start_time: 2024-05-01 10:00:00 is valid YAML, and resweep keeps times as text.
    """
    global _loader
    if _loader is None:
        yaml = yaml_module()
        base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        timestamp = "tag:yaml.org,2002:timestamp"
        resolvers = {
            first: [(tag, regexp) for tag, regexp in entries if tag != timestamp]
            for first, entries in base.yaml_implicit_resolvers.items()
        }
        _loader = type("TextTimesLoader", (base,), {"yaml_implicit_resolvers": resolvers})
    return _loader


def yaml_load(text: str) -> Any:
    """YAML as resweep reads it: the safe loader, dates and times kept as text."""
    return yaml_module().load(text, Loader=_text_times_loader())


def yaml_error() -> type[Exception]:
    """PyYAML's error class, for except clauses: evaluated only once something was raised."""
    error: type[Exception] = yaml_module().YAMLError
    return error


def _fix_exponent(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return match.group(1)
    return f"{match.group(2)}.0{match.group(3)}"


def _json_encoder() -> Callable[[Any], str]:
    """json.dumps(value, ensure_ascii=True, allow_nan=False), built once instead of per call."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    slow = json.JSONEncoder(ensure_ascii=True, allow_nan=False)
    if c_make_encoder is None:
        return slow.encode
    chunks = c_make_encoder(
        None, slow.default, json.encoder.encode_basestring_ascii, None, ": ", ", ",
        False, False, False,
    )  # fmt: skip

    def encode(value: Any) -> str:
        try:
            return "".join(chunks(value, 0))
        except RecursionError:  # a cycle: let the checking encoder say so
            return slow.encode(value)

    return encode


_encode_json = _json_encoder()
_encode_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _fix_exponents(text: str) -> str:
    """Give every bare-exponent number (1e-05) a ".0", leaving strings as they are."""
    if '\\"' in text:  # an escaped quote: only the full pattern tells strings apart
        return _BARE_EXPONENT.sub(_fix_exponent, text)
    pieces = []
    last = 0
    for match in _EXPONENT.finditer(text):
        at = match.start()
        # Without escaped quotes, an odd number of quotes before means inside a string.
        if at == 0 or not text[at - 1].isdigit() or text.count('"', 0, at) % 2:
            continue
        start = at - 1
        while start > 0 and text[start - 1].isdigit():
            start -= 1
        if start > 0 and text[start - 1] == ".":
            continue  # 1.5e-05 already reads as a float
        pieces.append(text[last:at])
        pieces.append(".0")
        last = at
    pieces.append(text[last:])
    return "".join(pieces)


def encode_flow(value: Any) -> str:
    """One-line text that json.loads and yaml.safe_load both read back as value."""
    if type(value) is str:  # names and most values: no number inside to fix
        text = _encode_string(value)
    else:
        try:
            text = _encode_json(value)
        except ValueError:  # NaN or infinity: only YAML spells them
            return _yaml_flow(value)
        if "e-" in text or "e+" in text:
            text = _fix_exponents(text)
    if "\\ud" in text and _SURROGATE_ESCAPE.search(text):
        return _yaml_flow(value)  # YAML does not join JSON's surrogate pairs
    return text


def _yaml_flow(value: Any) -> str:
    yaml = yaml_module()
    text: str = yaml.dump(
        value,
        Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
        default_flow_style=True,
        width=2**31 - 1,
        allow_unicode=False,
    )
    return text.removesuffix("\n").removesuffix("\n...")


def encode_line(value: Any) -> str:
    """One line that decode_flow reads back as value, for files only resweep reads (the journal,
    result.yaml's meta line): plain JSON, without encode_flow's care for YAML readers."""
    try:
        return _encode_json(value)
    except ValueError:  # NaN or infinity: only YAML spells them
        return encode_flow(value)


def decode_flow(text: str) -> Any:
    """Read back what encode_flow wrote, or a hand edit of it."""
    try:
        return json.loads(text)
    except ValueError:
        return yaml_load(text)
