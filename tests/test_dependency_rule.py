"""refound_core must import with qgis, PyQt and training blocked (ARCHITECTURE.md dependency rule),
and the plugin package must import with torch blocked (it may run the model in a backend)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys, importlib.abc, pkgutil
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked by test: ' + name)
sys.meta_path.insert(0, Block())
import {package}
for m in pkgutil.walk_packages({package}.__path__, '{package}.'):
    if m.name.split('.')[-1] in {skip!r}:
        continue
    importlib.import_module(m.name)
print('ok')
"""


def _run(package, blocked, skip=()):
    code = BLOCKER.format(blocked=set(blocked), package=package, skip=set(skip))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)


def test_core_never_imports_qgis_qt_or_training():
    res = _run("refound_core", {"qgis", "PyQt5", "PyQt6", "training", "processing"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_blocker_really_blocks():
    # The check above is only meaningful if a blocked import actually fails.
    res = _run("training", {"training"})
    assert res.returncode != 0 and "blocked by test" in res.stderr
