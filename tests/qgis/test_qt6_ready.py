"""QGIS 4 (Qt6) readiness: the metadata says so, and the plugin has no Qt5-only constructs
(scripts/check_qt6.py, run here so CI fails on a new exec_() or short enum)."""
from __future__ import annotations

import configparser
import subprocess
import sys

from qgis_testlib import REPO

sys.path.insert(0, str(REPO / "scripts"))


def test_metadata_declares_qt6_and_qgis4():
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str
    cp.read_string((REPO / "metadata.txt").read_text())
    meta = cp["general"]
    assert meta["supportsQt6"] == "True"
    assert meta["qgisMaximumVersion"] == "4.99" and meta["qgisMinimumVersion"] == "3.22"


def test_plugin_has_no_qt5_only_constructs():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "check_qt6.py"), str(REPO / "refound_qgis")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


def test_checker_catches_each_qt5_construct():
    import check_qt6

    bad = (
        "from PyQt5.QtCore import Qt\n"               # 1 direct binding import
        "import sip\n"                                # 2
        "dlg.exec_()\n"                               # 3 exec_
        "p.setPen(Qt.NoPen)\n"                        # 4 short enum on Qt
        "QPainter.Antialiasing\n"                     # 5 short enum on a class
        "QgsField('a', QVariant.Int)\n"               # 6 QVariant type
        "QgsField('a', QVariant.Type.Int)\n"          # 7
    )
    lines = [line for line, _ in check_qt6.check_source(bad)]
    assert lines == [1, 2, 3, 4, 5, 6, 7]
    good = (
        "from qgis.PyQt.QtCore import Qt, QMetaType\n"
        "dlg.exec()\n"
        "p.setPen(Qt.PenStyle.NoPen)\n"
        "QPainter.RenderHint.Antialiasing\n"
        "QgsField('a', QMetaType.Type.Int)\n"
        "QColor.fromRgb(1, 2, 3)\n"                   # a static method, not an enum
        "QgsProcessing.TypeVectorPolygon\n"           # QGIS enums are outside the check
    )
    assert check_qt6.check_source(good) == []
