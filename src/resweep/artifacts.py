"""ArtifactWriter: JSON and CSV files written atomically under a checked path of output_dir."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from resweep.durable import write_atomic
from resweep.errors import ResweepError
from resweep.files import HOOKS_DIR

# A part of an artifact's path: no separator, no control character, not hidden (write_atomic's
# temporary files start with a dot), not a relative directory.
_UNSAFE_PART = re.compile(r"[/\\\x00-\x1f\x7f]")
# A file name's limit (255 bytes) less the room write_atomic's temporary name takes around it:
# ".{name}.{pid}.tmp".
MAX_PART_BYTES = 255 - 24


def check_part(part: object, what: str = "artifact path") -> str:
    """part itself when it is a safe single path component, else a ResweepError."""
    problem = None
    if not isinstance(part, str):
        problem = f"is a {type(part).__name__}, not a str"
    elif not part or part.strip() != part:
        problem = "is empty or has leading or trailing spaces"
    elif part.startswith("."):
        problem = "starts with '.'"
    elif _UNSAFE_PART.search(part):
        problem = "contains '/', '\\' or a control character"
    elif len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
        problem = (
            f"is longer than {MAX_PART_BYTES} bytes (a file name's 255 less room for the "
            "temporary file written first); give a shorter name"
        )
    if problem or not isinstance(part, str):
        raise ResweepError(f"{what}: {part!r} {problem}")
    return part


class ArtifactWriter:
    """Files under root/parts..., each replaced atomically (a temporary file, then a rename).

    Every path is made of checked parts and no directory on the way is a symbolic link, so
    nothing is written outside root or through a link. Names are deterministic: the same call
    writes the same file on every run, and two writers with different parts never collide.
    """

    def __init__(self, root: str | os.PathLike[str], *parts: str) -> None:
        self.root = Path(root)
        self.parts = tuple(check_part(p) for p in parts)

    @classmethod
    def for_hook(cls, output_dir: str | os.PathLike[str], hook_id: str) -> ArtifactWriter:
        """The writer of one hook: output_dir/hooks/<hook id>/."""
        return cls(output_dir, HOOKS_DIR, check_part(hook_id, "hook id"))

    @property
    def dir(self) -> Path:
        """The directory this writer writes in (made when the first file is written)."""
        return self.root.joinpath(*self.parts)

    def path(self, name: str) -> Path:
        """Where name ("a.json", or "per_config/a.json") goes; makes its directories."""
        if isinstance(name, str) and (name.startswith(("/", "\\")) or os.path.isabs(name)):
            raise ResweepError(
                f"artifact path: {name!r} is an absolute path; give a path relative to the "
                f"hook's directory ({self.dir})"
            )
        names = name.split("/") if isinstance(name, str) else [name]
        checked = [check_part(p) for p in names]
        directory = self.root
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)  # ctx.dir, made when first used
        for part in (*self.parts, *checked[:-1]):
            directory = directory / part
            _make_dir(directory)
        return directory / checked[-1]

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        if path.is_symlink() or path.is_dir():
            raise ResweepError(f"{path} is a symbolic link or a directory; not written")
        write_atomic(path, text)
        return path

    def write_json(self, name: str, data: Any, *, indent: int | None = 2) -> Path:
        """data as JSON (keys sorted, so the same data gives the same bytes)."""
        text = json.dumps(data, indent=indent, sort_keys=True, ensure_ascii=False, default=str)
        return self.write_text(name, text + "\n")

    def write_csv(
        self,
        name: str,
        rows: Iterable[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
    ) -> Path:
        """rows as CSV with a header: columns, or every key in the order first seen."""
        rows = list(rows)
        if columns is None:
            seen: dict[str, None] = {}
            for row in rows:
                seen.update(dict.fromkeys(row))
            columns = list(seen)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return self.write_text(name, buffer.getvalue())


def _make_dir(directory: Path) -> None:
    """directory, made if missing; a symbolic link or a file there is an error."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory)
    if directory.is_symlink() or not directory.is_dir():
        raise ResweepError(
            f"{directory} is a symbolic link or a file; resweep writes artifacts only into "
            "directories it made"
        )
