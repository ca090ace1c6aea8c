"""Run every benchmark in turn: `make bench`."""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# These first, in this order; any other benchmark script found here runs after them.
BENCHMARKS = ["overhead", "peers", "scale", "cache_hit", "replay_speed"]
NOT_BENCHMARKS = {"harness", "run_all"}


def _names() -> list[str]:
    found = sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))
    return BENCHMARKS + [n for n in found if n not in BENCHMARKS and n not in NOT_BENCHMARKS]


def main() -> None:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    failed = []
    for name in _names():
        if not (HERE / f"{name}.py").exists():
            print(f"\n== {name}: benchmarks/{name}.py is not there yet; skipped ==", flush=True)
            continue
        started = time.perf_counter()
        try:
            module = importlib.import_module(name)
            if not callable(getattr(module, "main", None)):
                print(f"\n== {name}: no main(); skipped ==", flush=True)
                continue
            module.main()
        except ImportError as error:
            print(f"\n== {name}: skipped, {error} (install the extras: `make bench`) ==")
        except Exception:
            failed.append(name)
            traceback.print_exc()
        print(f"({name} took {time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
