"""Whole-process timing for the benchmarks: wall time, peak RSS, medians and ratios."""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PYTHON = sys.executable
# Runs per measurement; the machine is shared, so every figure is a median of several.
REPEAT = max(1, int(os.environ.get("RESWEEP_BENCH_REPEAT", "3")))
_PEAK_PREFIX = "resweep-bench-peak-rss-kb="

# The experiment every resweep benchmark runs: BENCH_N no-op configs into BENCH_OUT.
RESWEEP_SCRIPT = """\
import atexit
import os
import resource
import sys

import resweep


def noop(config):
    return None


N = int(os.environ["BENCH_N"])
experiment = resweep.Experiment(
    function=noop,
    configs=[{"i": i} for i in range(N)],
    output_dir=os.environ["BENCH_OUT"],
    name="bench",
)

if __name__ == "__main__":
    atexit.register(
        lambda: print(
            f"PEAK{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr
        )
    )
    experiment.run_cli()
""".replace("PEAK", _PEAK_PREFIX)

# Raw joblib on the same function and the same configs: the floor resweep is compared to.
JOBLIB_SCRIPT = """\
import os

from joblib import Parallel, delayed


def noop(config):
    return None


N = int(os.environ["BENCH_N"])
Parallel(n_jobs=int(os.environ["BENCH_WORKERS"]))(
    delayed(noop)(c) for c in [{"i": i} for i in range(N)]
)
"""


@dataclass
class Sample:
    """One whole process: wall time from start to exit, and peak resident memory."""

    wall_s: float
    # Largest RSS among the process and the children it waited for (wait4).
    tree_peak_rss_mb: float
    # The process's own peak RSS, when it reports it (the resweep scripts do).
    own_peak_rss_mb: float | None
    returncode: int
    stdout: str
    stderr: str


def run_process(
    argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Sample:
    """Run argv to completion; time it from fork to exit and read its rusage."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=full_env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    own = None
    for line in stderr.splitlines():
        if line.startswith(_PEAK_PREFIX):
            own = int(line.removeprefix(_PEAK_PREFIX)) / 1024
    return Sample(wall_s, usage.ru_maxrss / 1024, own, proc.returncode, stdout, stderr)


def check(sample: Sample, what: str, codes: tuple[int, ...] = (0,)) -> Sample:
    """The sample itself, or a clear error with the process's stderr."""
    if sample.returncode not in codes:
        raise RuntimeError(f"{what} exited {sample.returncode}:\n{sample.stderr[-3000:]}")
    return sample


# Scratch trees removed when the benchmark process ends, not between measurements. On ext4
# without a journal (this machine's disk), a new inode skips, one lookup each, every inode
# freed in the last minute or more: a run right after removing the previous run's 20,000 files
# costs nearly twice as much, which would measure the benchmark's clean-up, not resweep.
_SCRATCH: list[Path] = []


@atexit.register
def _remove_scratch() -> None:
    for path in _SCRATCH:
        shutil.rmtree(path, ignore_errors=True)


def filesystem(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem path is on (ext4, tmpfs, ...), from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            for line in handle:
                fields = line.split()
                mount_point = fields[4].replace("\\040", " ")
                fs_type = fields[fields.index("-") + 1]
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, kind = mount_point, fs_type
    except (OSError, ValueError, IndexError):
        pass
    return kind


def places() -> list[tuple[str, str]]:
    """Where to measure: (label, scratch base). The disk is RESWEEP_BENCH_DIR or the temporary
    directory; tmpfs is /dev/shm. RESWEEP_BENCH_PLACES=disk or =tmpfs keeps one."""
    disk = os.environ.get("RESWEEP_BENCH_DIR") or tempfile.gettempdir()
    found = [("disk", disk)]
    if os.path.isdir("/dev/shm") and filesystem("/dev/shm") == "tmpfs":
        found.append(("tmpfs", "/dev/shm"))
    wanted = os.environ.get("RESWEEP_BENCH_PLACES")
    if wanted:
        found = [place for place in found if place[0] in wanted.split(",")]
    return found


def place_line(label: str, base: str) -> str:
    return f"-- on the {label}: {base} ({filesystem(base)})"


def count_entries(path: Path) -> int:
    """Files and directories under path, path itself not counted."""
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


class Workdir:
    """A scratch directory (on the project's disk unless given), removed when the process ends."""

    def __init__(self, base: str | None = None) -> None:
        base = base or os.environ.get("RESWEEP_BENCH_DIR")
        self.path = Path(tempfile.mkdtemp(prefix="resweep-bench-", dir=base))
        self._made = 0
        _SCRATCH.append(self.path)

    def script(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    def fresh(self, name: str) -> Path:
        """An output directory path never used before; earlier ones stay until the end."""
        self._made += 1
        return self.path / f"{name}-{self._made}"

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def interleaved(
    cases: dict[str, Callable[[], float]], repeat: int = REPEAT
) -> dict[str, list[float]]:
    """Run every case once per round, round after round, so load hits them alike."""
    figures: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(repeat):
        for label, case in cases.items():
            figures[label].append(case())
    return figures


def describe(values: list[float], unit: str = "s", scale: float = 1.0) -> str:
    """Median and min-max of a list of figures."""
    scaled = [v * scale for v in values]
    med = statistics.median(scaled)
    return f"median {med:.3g} {unit} (min-max {min(scaled):.3g}-{max(scaled):.3g}, n={len(values)})"


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """Ratio of the medians."""
    return statistics.median(numerator) / statistics.median(denominator)


def verdict(ok: bool) -> str:
    return "goal met" if ok else "goal NOT met"


def heading(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def compile_resweep() -> None:
    """Byte-compile resweep, as installing it does. An editable install under
    PYTHONDONTWRITEBYTECODE would otherwise compile it from source in every process, a cost
    that no peer installed from a wheel pays."""
    import compileall

    import resweep

    compileall.compile_dir(os.path.dirname(resweep.__file__), quiet=1)


def machine() -> str:
    """One line about where the figures come from."""
    import platform

    load = os.getloadavg()
    where = ", ".join(f"{label} {base} ({filesystem(base)})" for label, base in places())
    return (
        f"{os.cpu_count()} cpus, python {platform.python_version()}, "
        f"load average {load[0]:.2f} at start, repeat {REPEAT}, scratch: {where}"
    )
