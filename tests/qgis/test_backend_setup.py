""""Set up model backend" for real, offline: a wheel of this project in a temporary wheelhouse,
a venv in a temporary QGIS profile folder, then the dock analyses the synthetic scene through a
backend process started from that venv. A failed install says why and is repaired by a re-run.

Honest limits (docs/INSTALL.md): installing torch itself from a wheelhouse is too heavy for a
test, so the venv reuses this interpreter's packages (the dialog's "Reuse packages of" option, a
.pth file): pip then finds torch and the pins satisfied and installs refound itself, with
``--no-index``, from the wheelhouse. The venv's refound is the wheel's copy, not the working tree.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qgis_testlib import EPSG, REPO, SCENE_CELLS, fill_dock, scene_extent, show_canvas

pytestmark = [pytest.mark.qgis, pytest.mark.slow]
TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """refound-<version>-py3-none-any.whl built from a copy of the sources (the tree stays clean)."""
    d = tmp_path_factory.mktemp("wheelhouse")
    src = d / "src"
    src.mkdir()
    for name in ("setup.py", "README.md", "metadata.txt", "requirements", "refound_core", "training"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    wh = d / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(wh), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [p.name for p in wh.iterdir()] == [f"refound-{_version()}-py3-none-any.whl"]
    return wh


def _version():
    from refound_qgis.backend_install import plugin_version

    return plugin_version()


@pytest.fixture
def dock(iface, qtbot, clean_settings):
    from refound_qgis.dock import RefoundDock

    show_canvas(qtbot, iface, EPSG, scene_extent())
    d = RefoundDock(iface)
    qtbot.addWidget(d)
    yield d
    d.cancel_analysis()
    d.shutdown()
    from refound_qgis.backend import stop_local_backends

    stop_local_backends()


def _dialog(qtbot, dock, venv, wheelhouse):
    from refound_qgis.dock_setup import BackendSetupDialog

    dlg = BackendSetupDialog(dock, dock=dock)
    qtbot.addWidget(dlg)
    dlg.venv_widget.setFilePath(str(venv))
    dlg.wheelhouse_widget.setFilePath(str(wheelhouse))
    dlg.reuse_widget.setFilePath(sys.executable)
    dlg.build_combo.setCurrentIndex(dlg.build_combo.findData("cpu"))
    return dlg


def _setup(qtbot, dlg):
    with qtbot.waitSignal(dlg.setup_finished, timeout=TIMEOUT_MS) as blocker:
        dlg.start_button.click()
    return blocker.args[0]


def _clean_python(py, code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd="/")


def test_setup_from_wheelhouse_then_the_dock_analyses_through_it(qtbot, dock, qgis_app, project, scene_layers,
                                                                checkpoints, wheelhouse):
    from qgis.core import QgsApplication

    from refound_qgis import backend, settings
    from refound_qgis.setup_task import default_venv_dir

    # the default folder is in the QGIS profile (start_app's profile: a temporary folder)
    assert default_venv_dir() == os.path.join(QgsApplication.qgisSettingsDirPath(), "refound", "backend-venv")
    venv = default_venv_dir()
    shutil.rmtree(venv, ignore_errors=True)
    assert not dock.setup_button.isHidden()  # the dock's "Set up model backend…" (backend: automatic)
    dock.backend_combo.setCurrentIndex(dock.backend_combo.findData("remote"))
    assert dock.setup_button.isHidden()
    dock.backend_combo.setCurrentIndex(dock.backend_combo.findData("auto"))
    dlg = _dialog(qtbot, dock, venv, wheelhouse)
    res = _setup(qtbot, dlg)
    assert res["ok"], res["message"]
    assert "The model backend is ready" in dlg.status_label.text() and dlg.progress_bar.value() == 100
    assert res["doctor"]["refound"] == _version() and "torch" in dlg.report_text.toPlainText()
    log = Path(res["log"]).read_text(encoding="utf-8")
    assert "--no-index" in log and "Successfully installed refound" in log
    py = res["python"]
    got = _clean_python(py, "import refound_core; print(refound_core.__file__)")
    assert got.returncode == 0 and got.stdout.strip().startswith(venv), got  # the wheel's copy, in the venv
    # the plugin now points at the venv: settings and the dock
    assert settings.value("backend") == "local" and settings.value("backend_python") == venv
    assert dock.backend_combo.currentData() == "local" and dock.backend_python_widget.filePath() == venv

    pois, img = scene_layers
    fill_dock(dock, pois, img, task="population", checkpoint=checkpoints["population"], backend=None,
              cell=dock.cell_size_spin.value())
    with qtbot.waitSignal(dock.analysis_finished, timeout=TIMEOUT_MS) as blocker:
        dock.run_button.click()
    layer, message = blocker.args
    assert layer is not None, message
    assert layer.featureCount() == SCENE_CELLS ** 2
    assert [be.python for be in backend._LOCAL.values()] == [py]  # the analysis went through the venv


def test_failed_install_says_why_and_a_rerun_repairs(qtbot, dock, tmp_path, wheelhouse):
    from refound_qgis import settings
    from refound_qgis.backend_install_run import venv_health

    venv = tmp_path / "profile" / "refound" / "backend-venv"
    empty = tmp_path / "empty-wheelhouse"
    empty.mkdir()
    dlg = _dialog(qtbot, dock, venv, empty)
    res = _setup(qtbot, dlg)
    assert not res["ok"] and res["kind"] == "not-found" and res["step"] == "refound", res
    msg = dlg.status_label.text()
    assert f"refound=={_version()}" in msg and "wheelhouse" in msg and res["log"] in msg
    assert dlg.start_button.text() == "Repair"
    assert venv_health(str(venv))[0] == "incomplete"
    assert settings.value("backend_python") == ""  # a failed set-up changes nothing in the plugin
    # break it further: the interpreter is gone -> the re-run recreates the venv
    os.remove(os.path.join(venv, "bin", "python"))
    assert venv_health(str(venv))[0] == "broken"
    dlg.wheelhouse_widget.setFilePath(str(wheelhouse))
    res = _setup(qtbot, dlg)
    assert res["ok"] and res["repaired"], res["message"]
    assert venv_health(str(venv)) == ("ok", "")
    log = Path(res["log"]).read_text(encoding="utf-8")
    assert "venv state: broken" in log and "is missing" in log  # what the repair saw
    assert settings.value("backend_python") == str(venv)
