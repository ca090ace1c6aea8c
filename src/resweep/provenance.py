"""Run sessions and code fingerprints: which code and which machine produced a result."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import inspect
import os
import platform
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resweep.store import now_iso

# Distributions whose versions are recorded with every session.
TRACKED_DISTRIBUTIONS = ("resweep", "joblib", "pyyaml", "pandas", "diskcache", "fire", "tqdm")
GIT_TIMEOUT_S = 5.0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in TRACKED_DISTRIBUTIONS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def _git(directory: Path) -> dict[str, Any] | None:
    """The commit and dirtiness of the git tree holding directory, or None outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def new_session(
    function: Callable[..., Any], *, backend: str, max_workers: int
) -> tuple[str, dict[str, Any]]:
    """A new session id and its provenance record."""
    source = Path(inspect.getsourcefile(function) or sys.argv[0] or ".").absolute()
    record: dict[str, Any] = {
        "start_time": now_iso(),
        "end_time": None,
        "host": socket.gethostname(),
        "user": _user(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "versions": _versions(),
        "git": _git(source.parent if source.is_file() else Path.cwd()),
        "backend": backend,
        "max_workers": max_workers,
    }
    return uuid.uuid4().hex[:12], record


def fingerprint(function: Callable[..., Any]) -> str:
    """A digest of the experiment function's source and its module's source."""
    digest = hashlib.sha256()
    for text in _sources(function):
        digest.update(text.encode("utf-8", "replace"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _sources(function: Callable[..., Any]) -> list[str]:
    target = inspect.unwrap(function)
    texts = []
    try:
        texts.append(inspect.getsource(target))
    except (OSError, TypeError):
        texts.append(getattr(target, "__qualname__", repr(target)))
    module = inspect.getmodule(target)
    if module is not None:
        with contextlib.suppress(OSError, TypeError):
            texts.append(inspect.getsource(module))
    return texts
