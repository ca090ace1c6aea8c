"""Processes on this host: whether one lives, and stopping one with everything it started."""

from __future__ import annotations

import contextlib
import os
import signal


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc (empty where /proc is not there)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                parent = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def kill_tree(pid: int) -> None:
    """SIGKILL pid and every process it started, so that none of a config's work outlives it.

    The descendants are listed before anything is killed (once their parent is dead they are
    re-parented and could no longer be told apart), and killed before it: pid may be this very
    process, ending itself and what it started.
    """
    children = _children()
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    for member in reversed(tree):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)
