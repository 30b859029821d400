"""The plugin zip: built by scripts/build_plugin_zip.py, passes the plugin repository's rules, and
its plugin loads in a clean QGIS profile with Debian's bare Python (no venv, no torch)."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
from qgis_testlib import REPO

pytestmark = pytest.mark.qgis
sys.path.insert(0, str(REPO / "scripts"))


REAL_PROJECT = """[project]
homepage = https://github.com/refound-qgis/refound-qgis
repository = https://github.com/refound-qgis/refound-qgis
tracker = https://github.com/refound-qgis/refound-qgis/issues
email = maintainers@refound-qgis.org
"""


@pytest.fixture(scope="module")
def plugin_zip(qgis_app, tmp_path_factory):
    import build_plugin_zip

    project = tmp_path_factory.mktemp("project") / "project.ini"
    project.write_text(REAL_PROJECT)
    return build_plugin_zip.build(tmp_path_factory.mktemp("dist"), project=project)


def test_license_is_in_the_repository():
    assert "MIT License" in (REPO / "LICENSE").read_text()


def test_placeholder_urls_stop_the_build_unless_local(qgis_app, tmp_path):
    import build_plugin_zip

    res = subprocess.run([sys.executable, str(REPO / "scripts" / "build_plugin_zip.py"), "--out-dir", str(tmp_path),
                          "--project", str(REPO / "project.ini")], capture_output=True, text=True, timeout=120)
    if "example.invalid" not in (REPO / "project.ini").read_text():
        pytest.fail("project.ini has real URLs now: point this test at a copy with placeholders")
    assert res.returncode != 0 and "placeholder" in res.stderr and "project.ini" in res.stderr
    assert "--local" in res.stderr and not list(tmp_path.glob("*.zip"))
    local = build_plugin_zip.build(tmp_path, local=True)
    assert build_plugin_zip.check_zip(local, allow_placeholders=True) == []
    assert any("placeholder" in p for p in build_plugin_zip.check_zip(local))


def test_zip_follows_the_repository_rules(plugin_zip):
    import build_plugin_zip

    meta = build_plugin_zip.read_metadata()
    assert plugin_zip.name == f"refound_qgis-{meta['version']}.zip"
    assert build_plugin_zip.check_zip(plugin_zip) == []
    assert plugin_zip.stat().st_size < 20 * 1024 * 1024
    with zipfile.ZipFile(plugin_zip) as zf:
        names = set(zf.namelist())
        cp = configparser.ConfigParser(interpolation=None)
        cp.optionxform = str
        cp.read_string(zf.read("refound_qgis/metadata.txt").decode())
        icon = zf.read("refound_qgis/icon.png")
    for key in build_plugin_zip.REQUIRED_METADATA:
        assert cp["general"][key].strip()
    assert cp["general"]["hasProcessingProvider"] == "yes"
    assert cp["general"]["tracker"] == "https://github.com/refound-qgis/refound-qgis/issues"  # from project.ini
    assert cp["general"]["supportsQt6"] == "True" and cp["general"]["qgisMaximumVersion"] == "4.99"
    assert "refound_qgis/LICENSE" in names
    assert icon.startswith(b"\x89PNG") and len(icon) < 16 * 1024
    assert {"refound_qgis/__init__.py", "refound_qgis/plugin.py", "refound_qgis/processing/provider.py",
            "refound_qgis/styles/urban_village.qml", "refound_qgis/i18n/README.txt",
            "refound_qgis/ext/refound_core/backend/client.py", "refound_qgis/ext/refound_core/data/grid.py",
            "refound_qgis/backend_install.py", "refound_qgis/backend/pins.txt"} <= names  # the backend installer's pins
    assert not any(n.endswith((".pyc", ".so")) or "__pycache__" in n for n in names)
    # Only the torch-free part of refound_core travels with the plugin.
    assert "refound_qgis/ext/refound_core/model/checkpoint.py" not in names
    assert "refound_qgis/ext/refound_core/inference/predictor.py" not in names


def test_check_zip_catches_broken_zips(tmp_path):
    import build_plugin_zip

    bad = tmp_path / "refound_qgis-9.9.9.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("refound_qgis/__init__.py", "")
        zf.writestr("refound_qgis/metadata.txt", "[general]\nname=x\nversion=1.0\nqgisMinimumVersion=2.18\n")
        zf.writestr("refound_qgis/__pycache__/a.cpython-311.pyc", b"\0")
        zf.writestr("other/readme.txt", "")
        exe = zipfile.ZipInfo("refound_qgis/run.sh")
        exe.external_attr = 0o100755 << 16
        zf.writestr(exe, "#!/bin/sh\n")
    problems = "\n".join(build_plugin_zip.check_zip(bad))
    for needle in ("one top folder", "__pycache__", "'email'", "'about'", "'tracker'", "version 1.0", "3.x",
                   "hasProcessingProvider", "0644"):
        assert needle in problems


def test_bandit_scan_flags_insecure_code(tmp_path):
    import build_plugin_zip

    (tmp_path / "bad.py").write_text("import hashlib\nkey = hashlib.md5(b'x').hexdigest()\n")
    (tmp_path / "ok.py").write_text("x = 1\n")
    assert any("B324" in p for p in build_plugin_zip.bandit_problems(tmp_path))
    (tmp_path / "bad.py").unlink()
    assert build_plugin_zip.bandit_problems(tmp_path) == []


def test_demo_checkpoint_is_bundled_and_offered(qgis_app, checkpoints, tmp_path):
    import build_plugin_zip

    root = build_plugin_zip.stage(tmp_path, checkpoint=checkpoints["root"])
    demo = root / "checkpoints" / "demo"
    assert (demo / "population" / "model.safetensors").is_file()
    spec = __import__("importlib.util").util.spec_from_file_location("staged_settings", root / "settings.py")
    mod = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.bundled_checkpoint_dir() == str(demo)


CLEAN_PROFILE = textwrap.dedent("""
    import os, sys, zipfile
    from unittest import mock
    zip_path, profile = sys.argv[1], sys.argv[2]
    plugins = os.path.join(profile, "python", "plugins")
    os.makedirs(plugins)
    zipfile.ZipFile(zip_path).extractall(plugins)
    from qgis.core import QgsApplication
    app = QgsApplication([], True, profile)
    app.initQgis()
    from qgis.PyQt.QtWidgets import QMainWindow
    from qgis.gui import QgisInterface, QgsMapCanvas
    import qgis.utils
    win = QMainWindow()
    iface = mock.Mock(spec=QgisInterface)
    iface.mainWindow.return_value = win
    iface.mapCanvas.return_value = QgsMapCanvas(win)
    qgis.utils.iface = iface
    sys.path.insert(0, plugins)
    qgis.utils.plugin_paths = [plugins]
    qgis.utils.updateAvailablePlugins()
    assert "refound_qgis" in qgis.utils.available_plugins, qgis.utils.available_plugins
    print("NAME", qgis.utils.pluginMetadata("refound_qgis", "name"))
    assert qgis.utils.loadPlugin("refound_qgis")
    assert qgis.utils.startPlugin("refound_qgis")
    import refound_core
    print("CORE", os.path.relpath(refound_core.__file__, plugins))
    algs = [a.id() for a in QgsApplication.processingRegistry().algorithms() if a.provider().id() == "refound"]
    print("ALGS", len(algs))
    print("ACTIONS", iface.addToolBarIcon.call_count, iface.addDockWidget.call_count)
    assert qgis.utils.unloadPlugin("refound_qgis")
    print("AFTER", QgsApplication.processingRegistry().providerById("refound"))
    print("TORCH", "torch" in sys.modules)
    del iface, win
    app.exitQgis()
""")


def test_zip_plugin_loads_in_a_clean_profile_without_torch(plugin_zip, tmp_path):
    py = "/usr/bin/python3"  # Debian's interpreter, as QGIS embeds it: no venv, no torch
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path / "home"))
    res = subprocess.run([py, "-c", CLEAN_PROFILE, str(plugin_zip), str(tmp_path / "profile")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    assert "NAME ReFound Urban Regions" in out
    assert "CORE refound_qgis/ext/refound_core/__init__.py" in out  # the bundled copy
    assert "ALGS 10" in out and "ACTIONS 1 1" in out
    assert "AFTER None" in out and "TORCH False" in out
