"""Run sessions and code fingerprints: which code and which machine produced a result."""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import inspect
import linecache
import os
import platform
import re
import site
import socket
import subprocess
import sys
import sysconfig
import types
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from resweep.clock import now_iso

# Distributions whose versions every session records, imported or not.
TRACKED_DISTRIBUTIONS = (
    *("resweep", "pyyaml", "fire", "tqdm", "pandas", "joblib", "cloudpickle", "diskcache"),
    *("filelock", "loky"),
)
GIT_TIMEOUT_S = 5.0
# Hex digits kept of each of the fingerprint's two digests.
DIGEST_HEX_DIGITS = 12
# A fingerprint is "v3:<function digest>.<module digest>.<code digest>": the function's own
# source, its whole file, and the function with what it calls inside the project (code_digests).
# compare() tells which part changed. Bump FINGERPRINT_VERSION whenever what the digests cover
# or how they are made changes, and drop from COMPARABLE_VERSIONS the versions whose digests then
# mean something else: their fingerprints read as "cannot tell", never as "the code changed".
FINGERPRINT_VERSION = 3
# Version 2 is the first two digests alone; version 1 the same without a version
# ("<function>.<module>"). Both still compare with version 3, by those two digests.
COMPARABLE_VERSIONS = frozenset({1, 2, 3})
_SEPARATOR = "."
_HEX = f"[0-9a-f]{{{DIGEST_HEX_DIGITS}}}"
_FINGERPRINT = re.compile(rf"(?:v([0-9]+):)?({_HEX})\.({_HEX})(?:\.({_HEX}))?")
FUNCTION_CHANGED = "the function or code it calls changed"
MODULE_CHANGED = "only code elsewhere in the function's module changed"
# The most functions, classes and constants code_digests follows from the experiment function.
MAX_CODE_OBJECTS = 500
# A module-level constant longer than this, as text, is left out of code_digests.
MAX_CONSTANT_CHARS = 100_000


# -- run sessions ----------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    """Python's version and those of resweep's dependencies and every imported distribution."""
    from importlib import metadata

    imported = {module.partition(".")[0] for module in list(sys.modules)}
    tracked = {_normalize(name) for name in TRACKED_DISTRIBUTIONS}
    found = {}
    with contextlib.suppress(Exception):  # broken metadata must never stop a run
        for dist in metadata.distributions():
            # The name from the dist-info folder's name: parsing METADATA costs a millisecond,
            # so only the distributions kept below pay it (for their version).
            name = getattr(dist, "_normalized_name", None) or dist.metadata["Name"]
            if not name:
                continue
            key = _normalize(name)
            if key not in found and (key in tracked or imported.intersection(_top_level(dist))):
                found[key] = dist.version
    return {"python": platform.python_version(), **dict(sorted(found.items()))}


def _top_level(dist: Any) -> set[str]:
    """The names a distribution can be imported by: top_level.txt, else its RECORD."""
    listed = dist.read_text("top_level.txt")
    if listed is not None:
        return set(listed.split())
    record = dist.read_text("RECORD") or ""
    return {line.split("/", 1)[0].split(",", 1)[0].removesuffix(".py") for line in record.split()}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _git(source: Path) -> dict[str, Any] | None:
    """The commit of the git tree holding source and whether it differs from it; None outside git.

    dirty: a tracked file differs from the commit, or source itself was never committed.
    """
    directory = source.parent if source.is_file() else source

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = status.returncode != 0 or bool(status.stdout.strip())
        if source.is_file() and not dirty:
            tracked = git("ls-files", "--error-unmatch", "--", source.name)
            dirty = tracked.returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def new_session(
    function: Callable[..., Any], *, backend: str, max_workers: int
) -> tuple[str, dict[str, Any]]:
    """A new session id and its provenance record; the runner sets end_time when it stops."""
    source = source_file(function)
    code = code_digests(function)
    record: dict[str, Any] = {
        "start_time": now_iso(),
        "end_time": None,
        "host": socket.gethostname(),
        "user": _user(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "platform": platform.platform(),
        "versions": _versions(),
        "git": _git(source if source is not None else Path.cwd()),
        "source": str(source) if source is not None else None,
        "fingerprint": fingerprint_of(function, code),
        "code": code,
        "backend": backend,
        "max_workers": max_workers,
    }
    return uuid.uuid4().hex[:12], record


def describe_session(session_id: str | None, sessions: Mapping[str, Any]) -> dict[str, Any]:
    """What `show` prints about the session that ran a config: who, where, which versions."""
    if session_id is None:
        return {"session": None, "note": "no run session recorded for this config"}
    record = sessions.get(session_id)
    if not isinstance(record, Mapping):
        return {"session": session_id, "note": "this session is missing from the state file"}
    git = record.get("git")
    shown: dict[str, Any] = {"session": session_id}
    for key in ("start_time", "end_time", "host", "user", "pid"):
        shown[key] = record.get(key)
    if isinstance(git, Mapping):
        shown["git_commit"] = git.get("commit")
        shown["git_dirty"] = git.get("dirty")
    else:
        shown["git_commit"] = None
    for key in ("backend", "max_workers", "source", "versions"):
        shown[key] = record.get(key)
    return shown


# -- code fingerprints -----------------------------------------------------------------------


def _target(function: Callable[..., Any]) -> Any:
    """What holds the code: the function under decorators and partials, or a callable's class."""
    target: Any = function
    for _ in range(10):
        if isinstance(target, functools.partial):
            target = target.func
            continue
        unwrapped = inspect.unwrap(target)
        if unwrapped is target:
            break
        target = unwrapped
    if not (inspect.isroutine(target) or inspect.isclass(target)) and callable(target):
        target = type(target).__call__  # an instance runs its class's __call__
    return target


def source_file(function: Callable[..., Any]) -> Path | None:
    try:
        file = inspect.getsourcefile(_target(function))
    except TypeError:
        file = None
    return Path(file).absolute() if file else None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:DIGEST_HEX_DIGITS]


def fingerprint(function: Callable[..., Any]) -> str:
    """The experiment function's code, as "v3:<function>.<module>.<code>", 12 hex digits each.

    <function> digests the function's own source; <module> its whole file; <code> the function
    with every function, class and constant it uses inside the project (code_digests), so that
    compare() can tell an edit of what the function runs from one elsewhere in its file.

    What it cannot see: installed packages, data files, environment variables and library
    versions (the session record keeps the versions and the git commit).
    """
    return fingerprint_of(function, code_digests(function))


def fingerprint_of(function: Callable[..., Any], code: Mapping[str, str]) -> str:
    """fingerprint(function), given its code_digests already."""
    target = _target(function)
    whole = ""
    with contextlib.suppress(OSError, TypeError):
        # The file the function is in, read as inspect reads it (a notebook cell works too).
        file = inspect.getsourcefile(target)
        if file:
            linecache.checkcache(file)
            whole = "".join(linecache.getlines(file))
    own = _digest(_source(target))
    listing = "\n".join(f"{name}={digest}" for name, digest in sorted(code.items()))
    return f"v{FINGERPRINT_VERSION}:{own}{_SEPARATOR}{_digest(whole)}{_SEPARATOR}{_digest(listing)}"


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}"


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """Where installed code lives: the standard library, site-packages, resweep itself."""
    paths = sysconfig.get_paths()
    dirs = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    with contextlib.suppress(AttributeError):
        dirs.update(site.getsitepackages())
    with contextlib.suppress(AttributeError):
        dirs.add(site.getusersitepackages())
    dirs.add(os.path.dirname(os.path.abspath(__file__)))
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


@functools.cache
def _in_project(file: str) -> bool:
    """Whether a source file is the user's own code: not installed, not the standard library."""
    return not os.path.realpath(file).startswith(_library_dirs())


def _project_file(obj: Any) -> str | None:
    """The source file of a function or class of the project, else None."""
    try:
        file = inspect.getsourcefile(obj)
    except TypeError:
        return None
    return file if file and _in_project(file) else None


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether value is plain data whose text says all of it (a constant a function reads)."""
    if value is None or type(value) in (str, int, float, bool, bytes):
        return True
    if depth > 5:
        return False
    if type(value) in (list, tuple, set, frozenset):
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _constant_text(value: Any) -> str:
    """A plain constant as text that is the same in every process (sets sorted)."""
    if type(value) in (set, frozenset):
        return f"{type(value).__name__}({sorted(map(_constant_text, value))})"
    if type(value) in (list, tuple):
        return f"{type(value).__name__}({[_constant_text(v) for v in value]})"
    if type(value) is dict:
        return repr([(_constant_text(k), _constant_text(v)) for k, v in value.items()])
    return repr(value)


def _names_in(code: types.CodeType) -> Iterator[str]:
    """Every global or attribute name a code object and the code nested in it use."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names_in(const)


def _functions_of(obj: Any) -> list[types.FunctionType]:
    """The plain functions whose code obj runs: itself, or a class's methods."""
    if isinstance(obj, types.FunctionType):
        return [obj]
    if inspect.isclass(obj):
        found = []
        for member in vars(obj).values():
            member = getattr(member, "__func__", member)  # staticmethod, classmethod
            if isinstance(member, property):
                member = member.fget
            if isinstance(member, types.FunctionType):
                found.append(member)
        return found
    return []


def code_digests(function: Callable[..., Any]) -> dict[str, str]:
    """The experiment function and what it uses inside the project, by name: a digest of each.

    Followed from the function's code: functions and classes it names (directly, or as an
    attribute of a module it names), in its own module or any module of the project (not the
    standard library, not installed packages, not resweep), then what those name in turn, and
    module-level constants of plain data (str, numbers, lists, dicts) they read. Names are
    qualified by module outside the function's own module. Decorators are seen through.
    """
    target = _target(function)
    home = getattr(target, "__module__", None)

    def label(obj: Any, module: str | None, name: str) -> str:
        return name if module == home else f"{module}.{name}"

    found: dict[str, str] = {}
    seen: set[int] = set()
    queue: list[tuple[str, Any]] = [(label(target, home, _qualname(target)), target)]
    while queue and len(found) < MAX_CODE_OBJECTS:
        name, obj = queue.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found[name] = _digest(_source(obj))
        for func in _functions_of(obj):
            names = set(_names_in(func.__code__))
            scope = func.__globals__
            module = scope.get("__name__")
            cells = [c.cell_contents for c in func.__closure__ or () if _has_contents(c)]
            for ref in sorted(names):
                if ref not in scope:
                    continue
                value = scope[ref]
                if isinstance(value, types.ModuleType):
                    file = getattr(value, "__file__", None)
                    if not (isinstance(file, str) and _in_project(file)):
                        continue  # an installed package: never touched (its lazy attributes)
                    # helpers.build: the module's members that the code names as attributes.
                    for attr in sorted(names):
                        member = getattr(value, attr, None)
                        if member is not None:
                            _follow(member, queue, label, value.__name__, attr)
                elif _plain(value):
                    text = _constant_text(value)
                    constant = label(None, module, ref)
                    if len(text) <= MAX_CONSTANT_CHARS and constant not in found:
                        found[constant] = _digest(text)
                else:
                    _follow(value, queue, label, module, ref)
            for cell in cells:
                _follow(cell, queue, label, None, "")
    return found


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def _qualname(obj: Any) -> str:
    return str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", repr(obj)))


def _follow(
    value: Any,
    queue: list[tuple[str, Any]],
    label: Callable[[Any, str | None, str], str],
    module: str | None,
    name: str,
) -> None:
    """Queue a function or class of the project that the code refers to; ignore the rest."""
    with contextlib.suppress(Exception):  # odd objects (proxies, C types) are simply not code
        target = inspect.unwrap(value) if callable(value) else value
        if not (isinstance(target, types.FunctionType) or inspect.isclass(target)):
            return
        if _project_file(target) is None:
            return
        owner = getattr(target, "__module__", module)
        queue.append((label(target, owner, _qualname(target)), target))


def _digests(fingerprint: Any) -> tuple[str, str, str | None] | None:
    """The (function, module, code) digests of a comparable fingerprint, else None; code is
    None for versions 1 and 2, which had no such digest."""
    if not isinstance(fingerprint, str):
        return None
    match = _FINGERPRINT.fullmatch(fingerprint)
    if match is None:
        return None
    version = int(match[1]) if match[1] is not None else 1
    if version not in COMPARABLE_VERSIONS or (version >= 3) != (match[4] is not None):
        return None
    return match[2], match[3], match[4]


def comparable(recorded: Any) -> bool:
    """Whether a recorded fingerprint is in a format this resweep can compare with its own.

    False for no fingerprint, for one from an older resweep whose digests meant something
    else, and for one from a newer resweep: compare() cannot tell whether such code changed.
    """
    return _digests(recorded) is not None


def compare(recorded: Any, current: str) -> str | None:
    """What changed between the code that recorded a fingerprint and the current code.

    FUNCTION_CHANGED or MODULE_CHANGED; None when the code is the same, or when there is no
    telling: no fingerprint, or one in a format that comparable() refuses.
    """
    if recorded == current:
        return None
    return _differs(_digests(recorded), _digests(current))


def _differs(
    before: tuple[str, str, str | None] | None, now: tuple[str, str, str | None] | None
) -> str | None:
    """What changed between two fingerprints' digests; None when they agree or one is unknown.

    With both code digests (version 3), the function changed when what it runs changed; with an
    older fingerprint, only its own source tells.
    """
    if before is None or now is None:
        return None
    if before[0] != now[0]:
        return FUNCTION_CHANGED
    if before[2] is not None and now[2] is not None and before[2] != now[2]:
        return FUNCTION_CHANGED
    return MODULE_CHANGED if before[1] != now[1] else None


def changed_configs(configs: Mapping[str, Mapping[str, Any]], current: str) -> dict[str, str]:
    """The done configs whose recorded fingerprint differs from current, with what changed.

    A config whose fingerprint cannot be compared (none, or an unknown format) is not counted.
    """
    changed: dict[str, str] = {}
    now = _digests(current)
    if now is None:
        return changed
    for name, record in configs.items():
        if record.get("status") != "done":
            continue
        recorded = record.get("fingerprint")
        why = None if recorded == current else _differs(_digests(recorded), now)
        if why is not None:
            changed[name] = why
    return changed


def changed_code(recorded: Any, current: Mapping[str, str]) -> list[str] | None:
    """The functions, classes and constants whose code differs between a session's record of
    code_digests and the current ones (added and removed ones too); None when not recorded."""
    if not isinstance(recorded, Mapping):
        return None
    names = set(recorded) | set(current)
    return sorted(n for n in names if recorded.get(n) != current.get(n))
