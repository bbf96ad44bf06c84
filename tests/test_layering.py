"""Imports go one way: dtr_core <- tasks <- flows <- dtr (the CLI), and benchmarks use dtr_core only (the flow
`benchmarks` and `dtr bench` run them). dtr_core never imports Prefect or MLflow (docs/DESIGN.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str, names: str) -> list[str]:
    pattern = re.compile(rf"^\s*(import|from)\s+({names})\b", re.MULTILINE)
    hits = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            line = path.read_text(encoding="utf-8")[: match.start()].count("\n") + 1
            hits.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0).strip()}")
    return hits


@pytest.mark.parametrize(("package", "forbidden"), [
    ("dtr_core", "prefect|prefect_dask|mlflow|tasks|flows|dtr"),
    ("tasks", "flows|dtr|benchmarks"),
    ("flows", "dtr"),
    ("benchmarks", "tasks|flows|dtr|prefect|prefect_dask|mlflow"),
])
def test_no_upward_imports(package, forbidden):
    assert _imports(package, forbidden) == []


def test_importing_dtr_core_loads_neither_prefect_nor_mlflow():
    code = ("import sys, dtr_core, dtr_core.run_layout, dtr_core.hybrid.export, dtr_core.speed, dtr_core.distill.training, "
            "dtr_core.search.greedy_search, dtr_core.search.decisions, dtr_core.distill.block\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'prefect_dask')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_every_dtr_core_package_imports_first():
    """No import cycle between the folders: each package of dtr_core imports first thing in a fresh interpreter
    (a cycle shows only when its package is the first one imported)."""
    packages = sorted(".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "dtr_core").rglob("__init__.py"))
    processes = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"], cwd=ROOT, stderr=subprocess.PIPE,
                                        text=True) for name in packages}
    failed = {name: process.communicate()[1].strip().splitlines()[-1:] for name, process in processes.items()
              if process.wait() != 0}
    assert len(packages) >= 7 and failed == {}
