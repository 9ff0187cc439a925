"""analysis modules talk to each other through public names only (issue 14, item 6)."""

from __future__ import annotations

import ast
from pathlib import Path

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("analysis"):
            found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_")]
            modules.update({a.asname or a.name: a.name for a in node.names if node.module == "analysis"})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_private_cross_module_use():
    found = [use for path in sorted(ANALYSIS.glob("*.py")) for use in _private_uses(path)]
    assert found == []


def test_the_check_finds_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from analysis.models import _secret\nfrom analysis import io\nio._atomic('x')\n")
    assert _private_uses(bad) == ["bad.py:1 from analysis.models import _secret", "bad.py:3 io._atomic"]


def _foreign_private_uses(path: Path) -> list[str]:
    """``obj._name`` on anything but self/cls, and ``from lib import _name``: another object's or
    another library's internals (lifelines' ``CoxPHFitter._norm_mean``, say), which change without notice."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_attribute_of_another_object_or_library():
    found = [use for path in sorted(ANALYSIS.glob("*.py")) for use in _foreign_private_uses(path)]
    assert found == []


def test_the_check_finds_a_private_attribute(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lifelines.utils import _to_list\n"
                   "def f(result):\n    self_ok = result.fitter.params_\n    return result.fitter._norm_mean\n"
                   "class A:\n    def g(self):\n        return self._own\n")
    assert _foreign_private_uses(bad) == ["bad.py:1 from lifelines.utils import _to_list", "bad.py:4 ._norm_mean"]


def test_backend_is_chosen_by_the_command_line_only():
    """Plot functions take ``ax=None`` and return the Axes; choosing matplotlib's backend is the
    caller's business (the CLI's, once), never a library function's."""
    calls = [f"{p.name}:{n}" for p in sorted(ANALYSIS.glob("*.py")) if p.name != "cli.py"
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "matplotlib.use(" in line]
    assert calls == []
