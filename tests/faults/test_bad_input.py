"""Bad input: exit status 2, one line that says what is wrong and how to fix it, nothing on disk changed."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import (
    SCRIPT_HEAD,
    SCRIPT_TAIL,
    assert_one_line_error,
    child_env,
    drop_file_permissions_override,
    executions,
    run_cli,
    snapshot,
)

BODY = """
@dataclass(frozen=True)
class Config:
    i: int
    tag: str = "x"


def work(config):
    record_execution(repr(config))
    return {{"i": config.i}}


experiment = resweep.Experiment(
    function=work,
    configs={configs},
    output_dir=OUT,
    name="bad-input",
    config_naming={naming},
)
"""
GOOD_CONFIGS = "[Config(i) for i in range(3)]"
RUN = ("run", "--backend", "sequential", "--noprogress")
FIRST = "i=0"


def write_exp(directory: Path, configs: str = GOOD_CONFIGS, naming: str = "None") -> Path:
    path = directory / "exp.py"
    body = BODY.format(configs=configs, naming=naming)
    path.write_text(SCRIPT_HEAD + body + SCRIPT_TAIL, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished experiment, made by a real run, copied by every test that needs one."""
    base = tmp_path_factory.mktemp("finished")
    proc = run_cli(write_exp(base), *RUN)
    assert proc.returncode == 0, proc.stderr
    (base / "executions.txt").unlink()
    return base


@pytest.fixture
def exp(tmp_path: Path, finished: Path) -> Path:
    """exp.py next to a copy of the finished experiment's output_dir."""
    shutil.copytree(finished / "out", tmp_path / "out", symlinks=True)
    return write_exp(tmp_path)


def check_untouched(script: Path, *args: str, needles: tuple[str, ...] = ()) -> str:
    """Run one command; it must fail with one line and leave every byte under tmp_path as it was."""
    before = snapshot(script.parent / "out")
    proc = run_cli(script, *args)
    line = assert_one_line_error(proc, *needles)
    # A message says what is wrong, then after a ';' how to fix it.
    assert ";" in line, line
    assert snapshot(script.parent / "out") == before
    assert executions(script) == []
    return line


def cut_line(text: str, index: int) -> str:
    """The text cut in the middle of line `index` (negative counts from the end)."""
    lines = text.splitlines(keepends=True)
    line_no = index % len(lines)
    start = sum(len(line) for line in lines[:line_no])
    return text[: start + len(lines[line_no].rstrip("\n")) // 2]


def line_index(text: str, prefix: str) -> int:
    return next(i for i, line in enumerate(text.splitlines()) if line.startswith(prefix))


# -- the state file --------------------------------------------------------------------------

TRUNCATIONS = [
    *[(where, RUN) for where in ("format_version", "name", "journal_seq", "sessions", "configs:")],
    *[(where, command) for where in ("  ", "last") for command in (RUN, ("status",))],
]


@pytest.mark.parametrize(("where", "command"), TRUNCATIONS, ids=[w + c[0] for w, c in TRUNCATIONS])
def test_truncated_state_file(exp: Path, where: str, command: tuple[str, ...]) -> None:
    """A state file cut in the middle of any line is refused, not read as fewer configs."""
    state = exp.parent / "out" / "experiment.yaml"
    text = state.read_text(encoding="utf-8")
    index = -1 if where == "last" else line_index(text, where)
    state.write_text(cut_line(text, index), encoding="utf-8")
    check_untouched(exp, *command, needles=("experiment.yaml",))


def test_state_file_cut_before_its_configs(exp: Path) -> None:
    """A state file cut at the line before 'configs:' is refused, not read as an empty sweep."""
    state = exp.parent / "out" / "experiment.yaml"
    text = state.read_text(encoding="utf-8")
    state.write_text(text[: text.index("\nconfigs:") + 1], encoding="utf-8")
    check_untouched(exp, *RUN, needles=("cut short",))


MALFORMED = {
    "unclosed flow": lambda t: t.replace('"status": "done"', '"status": ["done"', 1),
    "tab indentation": lambda t: t.replace("\n  ", "\n\t", 1),
    "a list at the top": lambda t: "- just\n- a list\n",
    "a scalar": lambda t: "hello\n",
    "empty": lambda t: "",
    "not utf-8": lambda t: t.replace("bad-input", "bad-\udcff-input"),
    "configs not a mapping": lambda t: t.split("configs:")[0] + "configs: [1, 2]\n",
    "record not a mapping": lambda t: t.replace('"i=0": {', '"i=0": [{', 1).replace(
        "}\n", "}]\n", 1
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_state_file(exp: Path, case: str) -> None:
    """Malformed YAML, a non-mapping and a non-UTF-8 file each stop run with one line."""
    state = exp.parent / "out" / "experiment.yaml"
    text = MALFORMED[case](state.read_text(encoding="utf-8"))
    state.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    check_untouched(exp, *RUN, needles=("experiment.yaml",))


HAND_EDITS = {
    "newer format_version": (("format_version: 1", "format_version: 99"), "upgrade"),
    "unknown status": (('"status": "done"', '"status": "finished"'), "finished"),
    "negative attempts": (('"attempts": 1', '"attempts": -1'), "attempts"),
    "params not a mapping": (('"params": {"i": 0', '"params": 7, "was": {"i": 0'), "params"),
}


@pytest.mark.parametrize(
    ("case", "command"),
    [
        *[(case, RUN) for case in HAND_EDITS],
        ("newer format_version", ("status",)),
        ("unknown status", ("show", FIRST)),
    ],
    ids=[*(f"run-{case}" for case in HAND_EDITS), "status-newer", "show-unknown status"],
)
def test_state_file_this_code_cannot_read(exp: Path, case: str, command: tuple[str, ...]) -> None:
    """A newer format version or an impossible record is refused by every command."""
    (old, new), needle = HAND_EDITS[case]
    state = exp.parent / "out" / "experiment.yaml"
    text = state.read_text(encoding="utf-8")
    assert old in text
    state.write_text(text.replace(old, new, 1), encoding="utf-8")
    check_untouched(exp, *command, needles=(needle,))


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [("show", "nope"), ("replay", "--config", "nope")],
    ids=["show", "replay"],
)
def test_unknown_config_name(exp: Path, command: tuple[str, ...]) -> None:
    """show and replay of a name the experiment does not have name it and change nothing."""
    check_untouched(exp, *command, needles=("'nope'",))


UNSAFE_NAMING = {
    "parent": '"../x"',
    "slash": '"a/" + str(c.i)',
    "empty": '""',
    "dot-dot": '".."',
    "newline": 'f"a\\nb{c.i}"',
    "control char": 'f"a\\x01{c.i}"',
    "NUL": 'f"a\\x00{c.i}"',
    "absolute": 'f"/tmp/{c.i}"',
    "not a str": "c.i",
    "duplicate": '"same"',
    "duplicate by case": '"A" if c.i == 0 else "a" if c.i == 1 else "b"',
}


@pytest.mark.parametrize(
    ("case", "existing"),
    [*((case, False) for case in UNSAFE_NAMING), *((c, True) for c in ("parent", "duplicate"))],
    ids=[*UNSAFE_NAMING, "existing-parent", "existing-duplicate"],
)
def test_unsafe_or_duplicate_names(
    tmp_path: Path, finished: Path, case: str, existing: bool
) -> None:
    """A config_naming that gives an unsafe or a duplicate name is refused before anything runs."""
    if existing:
        shutil.copytree(finished / "out", tmp_path / "out", symlinks=True)
    script = write_exp(tmp_path, naming=f"lambda c: {UNSAFE_NAMING[case]}")
    check_untouched(script, *RUN, needles=("config_naming" if "dup" not in case else "unique",))
    assert existing or not (tmp_path / "out").exists()


NOT_CONFIGS = {
    "ints": "[1, 2]",
    "strings": '["a", "b"]',
    "tuples": "[(1, 2)]",
    "objects": "[object()]",
    "the class": "[Config]",
    "a string": '"abc"',
    "a number": "42",
}


@pytest.mark.parametrize("case", NOT_CONFIGS, ids=list(NOT_CONFIGS))
def test_configs_neither_dataclasses_nor_mappings(tmp_path: Path, case: str) -> None:
    """Configs that are neither dataclass instances nor mappings are refused with one line."""
    script = write_exp(tmp_path, configs=NOT_CONFIGS[case])
    check_untouched(script, *RUN, needles=("config",))
    assert not (tmp_path / "out").exists()


# -- the output directory --------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [RUN, ("status",), ("show", FIRST)], ids=["run", "status", "show"]
)
def test_output_dir_is_a_file(tmp_path: Path, command: tuple[str, ...]) -> None:
    """An output_dir that is a file is refused, and the file keeps its bytes."""
    script = write_exp(tmp_path)
    (tmp_path / "out").write_bytes(b"precious data\n")
    check_untouched(script, *command, needles=("out",))
    assert (tmp_path / "out").read_bytes() == b"precious data\n"


@pytest.fixture
def unprivileged() -> Callable[[], None]:
    """A preexec_fn that makes a child obey file permissions, or a skip where none can."""
    try:
        probe = subprocess.run(
            ["true"], preexec_fn=drop_file_permissions_override, check=False, env=child_env()
        )
    except (OSError, subprocess.SubprocessError):
        pytest.skip("root cannot give up its file-permission override here")
    assert probe.returncode == 0
    return drop_file_permissions_override


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Make directories read-only for the test; their modes come back afterwards."""
    changed: list[tuple[Path, int]] = []

    def make(path: Path) -> None:
        changed.append((path, stat.S_IMODE(path.stat().st_mode)))
        path.chmod(0o555)

    yield make
    for path, mode in reversed(changed):
        path.chmod(mode)


def test_output_dir_not_writable(
    exp: Path, unprivileged: Callable[[], None], read_only: Callable[[Path], None]
) -> None:
    """run on an existing experiment in a read-only output_dir stops with one line, writes nothing."""
    out = exp.parent / "out"
    for directory in (out, out / "configs"):
        read_only(directory)
    before = snapshot(out)
    proc = run_cli(exp, *RUN, preexec_fn=unprivileged)
    line = assert_one_line_error(proc, "not writable")
    assert ";" in line, line
    assert snapshot(out) == before
    status = run_cli(exp, "status", preexec_fn=unprivileged)
    assert status.returncode == 0, status.stderr
    assert "done 3" in status.stdout


def test_output_dir_cannot_be_created(
    tmp_path: Path, unprivileged: Callable[[], None], read_only: Callable[[Path], None]
) -> None:
    """run whose output_dir cannot be created (read-only parent) stops with one line."""
    script = write_exp(tmp_path)
    read_only(tmp_path)
    before = snapshot(tmp_path)
    proc = run_cli(script, *RUN, preexec_fn=unprivileged)
    line = assert_one_line_error(proc, "out")
    assert ";" in line, line
    assert snapshot(tmp_path) == before


# -- options ---------------------------------------------------------------------------------

BAD_OPTIONS = {
    "max-workers 0": (("--max-workers", "0"), "max_workers"),
    "max-workers -1": (("--max-workers=-1",), "max_workers"),
    "max-workers text": (("--max-workers", "many"), "max_workers"),
    "backend nope": (("--backend", "nope"), "nope"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_bad_run_options(exp: Path, case: str) -> None:
    """run with an impossible option value stops with one line and runs nothing."""
    options, needle = BAD_OPTIONS[case]
    check_untouched(exp, "run", "--noprogress", *options, needles=(needle,))


def test_bad_input_leaves_a_usable_experiment(exp: Path) -> None:
    """After every refusal, the experiment still reads: status works, nothing ran twice."""
    proc = run_cli(exp, "status")
    assert proc.returncode == 0, proc.stderr
    assert "done 3" in proc.stdout
    assert os.path.exists(exp.parent / "out" / "experiment.yaml")
