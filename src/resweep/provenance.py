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
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
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
# A fingerprint is "v2:<function digest>.<module digest>"; compare() tells which part changed.
# Bump FINGERPRINT_VERSION whenever what the digests cover or how they are made changes, and
# drop from COMPARABLE_VERSIONS the versions whose digests then mean something else: their
# fingerprints read as "cannot tell", never as "the code changed".
FINGERPRINT_VERSION = 2
# Version 1 is the same two digests written without a version ("<function>.<module>"), as
# resweep did before fingerprints had one: they still compare with version 2.
COMPARABLE_VERSIONS = frozenset({1, 2})
_SEPARATOR = "."
_FINGERPRINT = re.compile(
    rf"(?:v([0-9]+):)?([0-9a-f]{{{DIGEST_HEX_DIGITS}}})\.([0-9a-f]{{{DIGEST_HEX_DIGITS}}})"
)
FUNCTION_CHANGED = "the function's source changed"
MODULE_CHANGED = "code elsewhere in the function's module changed"


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
        "fingerprint": fingerprint(function),
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
    """A digest of the experiment function's source, then one of its whole module's source.

    Written "v2:<function digest>.<module digest>", 12 hex digits each.

    What it cannot see: code in other modules or packages, data files, environment variables
    and library versions (the session record keeps the versions and the git commit).
    """
    target = _target(function)
    try:
        own = inspect.getsource(target)
    except (OSError, TypeError):
        own = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"
    whole = ""
    with contextlib.suppress(OSError, TypeError):
        # The file the function is in, read as inspect reads it (a notebook cell works too).
        file = inspect.getsourcefile(target)
        if file:
            linecache.checkcache(file)
            whole = "".join(linecache.getlines(file))
    return f"v{FINGERPRINT_VERSION}:{_digest(own)}{_SEPARATOR}{_digest(whole)}"


def _digests(fingerprint: Any) -> tuple[str, str] | None:
    """The (function, module) digests of a fingerprint in a comparable format, else None."""
    if not isinstance(fingerprint, str):
        return None
    match = _FINGERPRINT.fullmatch(fingerprint)
    if match is None:
        return None
    version = int(match[1]) if match[1] is not None else 1
    if version not in COMPARABLE_VERSIONS:
        return None
    return match[2], match[3]


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


def _differs(before: tuple[str, str] | None, now: tuple[str, str] | None) -> str | None:
    """What changed between two fingerprints' digests; None when they agree or one is unknown."""
    if before is None or now is None or before == now:
        return None
    return FUNCTION_CHANGED if before[0] != now[0] else MODULE_CHANGED


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
