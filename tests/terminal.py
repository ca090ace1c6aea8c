"""A real pseudo-terminal for tests: a process that believes it runs in a terminal."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Sequence
from pathlib import Path


class Terminal:
    """A command run on a pty of rows x columns, its output collected as it comes."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: dict[str, str],
        rows: int = 40,
        columns: int = 120,
    ) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.master = master
        self.output = b""
        self.proc = subprocess.Popen(
            list(argv),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            start_new_session=True,
            # The pty becomes the session's controlling terminal, as in a real shell.
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def _read(self, timeout_s: float) -> bool:
        """Read what is there within timeout_s; False once the other side is closed."""
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every process holding the pty is gone
            return False
        self.output += data
        return bool(data)

    def wait_for(self, pattern: str, timeout_s: float = 60, start: int = 0) -> re.Match[str]:
        """The first match of the regex pattern in the output from start, read as it comes."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.search(pattern, self.text[start:], re.MULTILINE)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the terminal:\n{self.text[-3000:]}")
            if not self._read(0.1) and self.proc.poll() is not None:
                found = re.search(pattern, self.text[start:], re.MULTILINE)
                if found:
                    return found
                raise AssertionError(f"exited without {pattern!r}:\n{self.text[-3000:]}")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout_s: float = 60) -> int:
        """Read until the process exits; its exit status."""
        deadline = time.monotonic() + timeout_s
        while self._read(0.1):
            if self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"still running:\n{self.text[-3000:]}")
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        with contextlib.suppress(OSError):
            os.close(self.master)


def frames(text: str) -> list[str]:
    """What a terminal showed line after line: the output split at carriage returns too."""
    return [part for part in re.split(r"[\r\n]+", text) if part.strip()]
