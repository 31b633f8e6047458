"""The benchmark scripts import the package's names inside their functions (a stage imports what it
uses), so a name that moved breaks a stage only when it runs: on a lent GPU machine whose minutes are
few. Every name they import from the package must exist."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def package_imports() -> list[tuple[str, str, str]]:
    """(script, module, name) for every ``from cifar_onecycle... import name`` in the scripts."""
    found = []
    for script in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(), str(script))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cifar_onecycle":
                found += [(script.name, node.module, alias.name) for alias in node.names]
    return found


def test_every_name_the_benchmarks_import_from_the_package_exists():
    imports = package_imports()
    assert len({script for script, _, _ in imports}) >= 8  # the scripts were found and read
    missing = [f"{script}: from {module} import {name}" for script, module, name in imports
               if not hasattr(importlib.import_module(module), name)]
    assert missing == []
