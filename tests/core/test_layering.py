"""core stays importable without the GUI and training stacks: no Qt, no TensorFlow, no Keras.

Two checks: importing each core module in a fresh interpreter loads none of them (catches
indirect imports through other packages), and no source file under core/ names them in an import
statement (catches imports hidden in functions that the first check never runs).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "core"

FORBIDDEN = frozenset(
    {"PySide6", "PySide2", "PyQt5", "PyQt6", "shiboken6", "tensorflow", "keras", "tf_keras"}
)
REQUIRED = ("core.io",)
EXPECTED = ("core.io", "core.preprocess", "core.inference", "core.batch", "core.cli")

_PROBE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
exec(sys.argv[3])
try:
    importlib.import_module(sys.argv[2])
except ModuleNotFoundError as exc:
    print(json.dumps({"missing": exc.name}))
else:
    print(json.dumps({"loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _core_modules() -> list[str]:
    found = {
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in CORE.rglob("*.py")
        if p.name != "__init__.py"
    }
    return sorted(found | set(EXPECTED))


def _probe(module: str, prelude: str = "") -> dict:
    """Import `module` in a fresh interpreter; report the top-level packages it loaded."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(REPO), module, prelude],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _forbidden_imports(source: str) -> set[str]:
    """Top-level forbidden packages named by import statements or import_module("...") calls."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                names.add(str(first.value))
    return {name.split(".")[0] for name in names} & FORBIDDEN


@pytest.mark.parametrize("module", _core_modules())
def test_core_module_loads_no_gui_or_training_stack(module):
    spec_path = REPO / Path(*module.split("."))
    if module not in REQUIRED and not spec_path.with_suffix(".py").exists():
        pytest.skip(f"{module} is not written yet")
    report = _probe(module)
    if "missing" in report:
        missing = str(report["missing"])
        assert missing.split(".")[0] not in FORBIDDEN, f"{module} imports {missing}"
        assert module not in REQUIRED, f"{module} cannot be imported: {missing} is missing"
        pytest.skip(f"{module} needs {missing}, which is not installed here")
    assert not set(report["loaded"]) & FORBIDDEN, (
        f"importing {module} loads {sorted(set(report['loaded']) & FORBIDDEN)}"
    )


def test_probe_sees_a_forbidden_package_when_one_is_loaded():
    pytest.importorskip("PySide6")
    report = _probe("core.io", prelude="import PySide6")
    assert "PySide6" in report["loaded"]


def test_no_core_source_names_a_forbidden_package():
    offenders = {
        str(path.relative_to(REPO)): sorted(found)
        for path in sorted(CORE.rglob("*.py"))
        if (found := _forbidden_imports(path.read_text(encoding="utf-8")))
    }
    assert not offenders, f"core must not import Qt, TensorFlow or Keras: {offenders}"


def test_static_check_finds_forbidden_imports():
    source = """
import numpy as np
import tensorflow as tf
from PySide6.QtCore import Qt
import importlib

def later():
    from keras import layers
    return importlib.import_module("PyQt6.QtWidgets")

# import tf_keras  (a comment is not an import)
TEXT = "import shiboken6"
"""
    assert _forbidden_imports(source) == {"tensorflow", "PySide6", "keras", "PyQt6"}
    assert _forbidden_imports("import numpy\nfrom . import keras\n") == set()
