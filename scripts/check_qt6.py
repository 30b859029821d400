#!/usr/bin/env python3
"""Fail on Qt5-only constructs that break the plugin under QGIS 4 (Qt6 / PyQt6).

The QGIS project's own migration script (pyqt5_to_pyqt6.py in the QGIS source tree) needs PyQt6
installed and is not on the package index; the only indexed tool (qgis-pyqt5to6) is a 0.0.0.dev0
pre-release. So this is a small AST check of the rules that matter for this plugin:

* ``PyQt5`` / ``PyQt6`` / ``PyQt4`` / ``sip`` imported directly: use ``qgis.PyQt`` (QGIS picks the binding);
* ``exec_()`` / ``print_()``: gone in PyQt6, use ``exec()`` / ``print()``;
* short (unscoped) Qt enums such as ``Qt.NoPen`` or ``QPainter.Antialiasing``: PyQt6 only has the
  scoped form ``Qt.PenStyle.NoPen`` / ``QPainter.RenderHint.Antialiasing`` (PyQt5 5.11+ has both);
* ``QVariant.<Type>`` field types: PyQt6 has no QVariant.Type, use ``QMetaType.Type``.

Rule for enums: an attribute ``Q<Class>.<Name>`` on a Qt class (``Q`` but not ``Qgs``/``Qgis``)
whose name starts with a capital letter (for ``Qt``: any name) must be followed by a further
attribute (``Qt.PenStyle.NoPen``); calls (static methods) are fine. QGIS's own enums are outside
this check. Usage: ``python scripts/check_qt6.py [paths...]`` (default: refound_qgis); exit 1 on
findings, one ``file:line: message`` per finding.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIRECT_BINDINGS = {"PyQt4", "PyQt5", "PyQt6", "sip", "PySide2", "PySide6"}
QT5_ONLY_METHODS = {"exec_": "exec()", "print_": "print()"}
# Attributes of Qt classes that are not enum members (checked names are the capitalised ones).
NOT_ENUM_MEMBERS = {"staticMetaObject"}


def _is_qt_class(name: str) -> bool:
    return name == "Qt" or (name.startswith("Q") and name[1:2].isupper() and not name.startswith(("Qgs", "Qgis")))


def check_source(source: str, filename: str = "<string>") -> list:
    """``[(line, message)]`` for the Qt5-only constructs in ``source``."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in DIRECT_BINDINGS:
                    found.append((node.lineno, f"import {alias.name}: import from qgis.PyQt instead"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in DIRECT_BINDINGS:
                found.append((node.lineno, f"from {node.module} import ...: import from qgis.PyQt instead"))
        elif isinstance(node, ast.Attribute):
            if node.attr in QT5_ONLY_METHODS:
                found.append((node.lineno, f".{node.attr}(): PyQt6 has only {QT5_ONLY_METHODS[node.attr]}"))
                continue
            if not (isinstance(node.value, ast.Name) and _is_qt_class(node.value.id)):
                continue
            cls, attr = node.value.id, node.attr
            if cls == "QVariant" and attr[:1].isupper():  # QVariant.Int and QVariant.Type.Int alike
                found.append((node.lineno, f"QVariant.{attr}: PyQt6 has no QVariant.Type, use QMetaType.Type"))
                continue
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) or (isinstance(parent, ast.Call) and parent.func is node):
                continue  # Qt.PenStyle.NoPen, or a static method call
            if attr in NOT_ENUM_MEMBERS or not (cls == "Qt" or attr[:1].isupper()):
                continue
            found.append((node.lineno, f"{cls}.{attr}: unscoped enum, PyQt6 needs {cls}.<EnumName>.{attr}"))
    return sorted(found)


def check_paths(paths) -> list:
    out = []
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            if "__pycache__" in f.parts:
                continue
            for line, msg in check_source(f.read_text(encoding="utf-8"), str(f)):
                out.append(f"{f}:{line}: {msg}")
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    problems = check_paths(args or [REPO / "refound_qgis"])
    print("\n".join(problems) if problems else "Qt6 check: no Qt5-only constructs found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
