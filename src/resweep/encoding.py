"""One-line text that both JSON and YAML readers read back: the state's and the journal's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from resweep.errors import StateError

# Numbers such as 1e-05 that YAML 1.1 would read as strings; they get a ".0".
_BARE_EXPONENT = re.compile(r'("(?:[^"\\]|\\.)*")|(?<![\w.])(-?\d+)([eE][-+]?\d+)')
# A float's repr always signs its exponent (1e-05), so text without "e-" or "e+" needs no fix;
# a string that merely looks so costs the full pass, which leaves strings alone.
_EXPONENT = re.compile(r"e[-+]\d")
_SURROGATE_ESCAPE = re.compile(r"\\ud[89a-f]", re.IGNORECASE)
# In JSON text: an escaped backslash, a surrogate pair's escape, or a lone surrogate's.
_JSON_SURROGATES = re.compile(
    r"(\\\\)|\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|(\\ud[89a-f][0-9a-f]{2})"
)


def yaml_module() -> Any:
    """PyYAML, imported at first use: a run writes and reads its own files as JSON lines, and
    the import would add about 25 ms to the start of the coordinator and of every worker."""
    import yaml

    return yaml


_loaders: dict[bool, Any] = {}


def _text_times_loader(*, pure: bool = False) -> Any:
    """PyYAML's safe loader (libyaml's unless pure) that reads an unquoted date or time as the
    string it is: a hand-edited start_time: 2024-05-01 10:00 is valid YAML, and resweep keeps
    times as text."""
    loader = _loaders.get(pure)
    if loader is None:
        yaml = yaml_module()
        base = yaml.SafeLoader if pure else getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        timestamp = "tag:yaml.org,2002:timestamp"
        resolvers = {
            first: [(tag, regexp) for tag, regexp in entries if tag != timestamp]
            for first, entries in base.yaml_implicit_resolvers.items()
        }
        loader = type("TextTimesLoader", (base,), {"yaml_implicit_resolvers": resolvers})
        _loaders[pure] = loader
    return loader


def yaml_load(text: str) -> Any:
    """YAML as resweep reads it: the safe loader, dates and times kept as text, no aliases."""
    yaml = yaml_module()
    if "*" in text and "&" in text and _has_alias(yaml, text):
        # A few aliases can stand for more data than memory holds ("billion laughs").
        raise StateError(
            "the file uses YAML anchors and aliases (& and *), which resweep does not read; "
            "write the values out"
        )
    try:
        return yaml.load(text, Loader=_text_times_loader())
    except yaml.YAMLError:
        if not _SURROGATE_ESCAPE.search(text):
            raise
        # libyaml refuses an escaped lone surrogate, which PyYAML's own reader takes.
        return yaml.load(text, Loader=_text_times_loader(pure=True))


def _has_alias(yaml: Any, text: str) -> bool:
    try:
        return any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text))
    except yaml.YAMLError:
        return False  # the loader says what is wrong


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
        # YAML reads JSON's escape of a character beyond U+FFFF as two lone surrogates.
        joined = _join_surrogate_pairs(text)
        if joined is None:
            return _yaml_flow(value)  # a lone surrogate, which only YAML keeps apart
        text = joined
    return text


def _join_surrogate_pairs(text: str) -> str | None:
    """JSON text with each escaped surrogate pair written as its character; None when an
    escaped lone surrogate remains."""
    lone = False

    def join(match: re.Match[str]) -> str:
        nonlocal lone
        if match.group(2):
            high, low = int(match.group(2), 16), int(match.group(3), 16)
            return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))
        lone = lone or match.group(4) is not None
        return match.group(0)

    joined = _JSON_SURROGATES.sub(join, text)
    return None if lone else joined


def _yaml_flow(value: Any) -> str:
    yaml = yaml_module()

    def dump(dumper: Any) -> str:
        text: str = yaml.dump(
            value,
            Dumper=_quoting_dumper(dumper),
            default_flow_style=True,
            width=2**31 - 1,
            allow_unicode=False,
        )
        return text.removesuffix("\n").removesuffix("\n...")

    try:
        return dump(getattr(yaml, "CSafeDumper", yaml.SafeDumper))
    except UnicodeEncodeError:  # a lone surrogate, which only PyYAML's own writer escapes
        return dump(yaml.SafeDumper)


_QUOTING_DUMPERS: dict[type, type] = {}


def _quoting_dumper(dumper: type) -> type:
    """dumper, writing every string double-quoted: the one style that keeps a line break (which
    it escapes) from breaking the line, as a single-quoted string would."""
    quoting = _QUOTING_DUMPERS.get(dumper)
    if quoting is None:
        quoting = _QUOTING_DUMPERS[dumper] = type(f"Quoting{dumper.__name__}", (dumper,), {})

        def represent(representer: Any, text: str) -> Any:
            return representer.represent_scalar("tag:yaml.org,2002:str", text, style='"')

        quoting.add_representer(str, represent)  # type: ignore[attr-defined]
    return quoting


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
