"""The public API: what `import resweep` exports, and what it does not import."""

from __future__ import annotations
import __future__

import subprocess
import sys
import types

import resweep


def test_all_is_the_sorted_list_of_public_names() -> None:
    """__all__ is sorted and names exactly the public, non-module attributes of resweep."""
    public = {
        name
        for name in dir(resweep)
        if not name.startswith("_")
        and not isinstance(getattr(resweep, name), types.ModuleType | __future__._Feature)
    }
    assert resweep.__all__ == sorted(resweep.__all__)
    assert set(resweep.__all__) == public | {"__version__"}


def test_contract_names_are_exported() -> None:
    """Every name the contract promises is importable from resweep."""
    for name in (
        "Experiment",
        "Context",
        "WorkerSetup",
        "RunReport",
        "cached",
        "grid",
        "load_configs",
        "load_summary",
        "open",
        "ResweepError",
        "CacheMiss",
    ):
        assert name in resweep.__all__
    assert issubclass(resweep.CacheMiss, resweep.ResweepError)
    assert all(
        issubclass(getattr(resweep, n), resweep.ResweepError)
        for n in resweep.__all__
        if n.endswith("Error")
    )


def test_import_resweep_does_not_import_heavy_dependencies() -> None:
    """`import resweep` in a fresh process leaves pandas, joblib, diskcache and PyYAML unimported:
    every worker process pays for what it imports before it runs a config."""
    code = (
        "import sys, resweep\n"
        "heavy = [m for m in ('pandas', 'joblib', 'diskcache', 'numpy', 'yaml') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
