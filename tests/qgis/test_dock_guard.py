"""The panel's guards: obvious layers preselected, the cost question above 'Ask above', the cell
limit set in the panel, and no stale progress after a refusal (refound_qgis/dock_guard.py)."""
from __future__ import annotations

import pytest

from qgis_testlib import EPSG, expected_cell_count, fill_dock, scene_extent, show_canvas  # noqa: E402

pytestmark = pytest.mark.qgis
TIMEOUT_MS = 60_000


@pytest.fixture
def make_dock(iface, qtbot, clean_settings):
    made = []

    def make():
        from refound_qgis.dock import RefoundDock

        show_canvas(qtbot, iface, EPSG, scene_extent())
        d = RefoundDock(iface)
        qtbot.addWidget(d)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cancel_analysis()
        if d.current_task is not None:
            with qtbot.waitSignal(d.analysis_finished, timeout=TIMEOUT_MS):
                pass
        d.shutdown()


def _cells(dock) -> int:
    return expected_cell_count(dock._canvas().extent())


def _ready(dock, checkpoints):
    fill_dock(dock, checkpoint=checkpoints["root"], cell=256)  # layers: the panel's own preselection


def test_pickers_preselect_the_only_point_layer_and_raster(make_dock, project, scene):
    """The panel exists before the project's layers are loaded (QGIS opens it at start-up)."""
    from qgis.core import QgsRasterLayer, QgsVectorLayer

    dock = make_dock()
    assert dock.poi_combo.currentLayer() is None and dock.imagery_combo.currentLayer() is None
    pois = QgsVectorLayer(f"{scene['pois']}|layername=pois", "pois", "ogr")
    img = QgsRasterLayer(str(scene["imagery"]), "imagery")
    project.addMapLayers([img, pois])
    assert dock.poi_combo.currentLayer() is pois and dock.imagery_combo.currentLayer() is img
    assert dock.name_field.layer() is pois  # the field pickers follow the preselected layer
    project.addMapLayer(QgsRasterLayer(str(scene["imagery"]), "imagery 2"))
    assert dock.imagery_combo.currentLayer() is img  # a choice already made is kept


def test_pickers_stay_empty_when_the_choice_is_not_obvious(make_dock, project, scene):
    from qgis.core import QgsVectorLayer

    dock = make_dock()
    project.addMapLayers([QgsVectorLayer(f"Point?crs={EPSG}", name, "memory") for name in ("shops", "trees")])
    assert dock.poi_combo.currentLayer() is None
    named = QgsVectorLayer(f"{scene['pois']}|layername=pois", "city POIs", "ogr")
    project.addMapLayer(named)  # among several point layers, the one named like POIs
    assert dock.poi_combo.currentLayer() is named


def test_cost_question_above_the_threshold(make_dock, project, scene_layers, checkpoints, qtbot, monkeypatch):
    from qgis.PyQt.QtWidgets import QMessageBox

    from refound_qgis import settings

    dock = make_dock()
    _ready(dock, checkpoints)
    n = _cells(dock)
    dock.confirm_cells_spin.setValue(n - 1)
    assert int(settings.value("confirm_cells")) == n - 1  # the control is the setting
    asked = []

    def answer(reply):
        def question(parent, title, text, *a):
            asked.append(text)
            return reply
        return question

    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.StandardButton.No))
    before = set(project.mapLayers())
    with qtbot.waitSignal(dock.analysis_finished, timeout=TIMEOUT_MS) as blocker:
        dock.run_button.click()
    assert blocker.args[0] is None and blocker.args[1].startswith("Not started"), blocker.args[1]
    assert f"{n} cells" in asked[-1] and dock.current_task is None and set(project.mapLayers()) == before
    assert dock.progress_bar.value() == 0
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.StandardButton.Yes))
    with qtbot.waitSignal(dock.analysis_finished, timeout=TIMEOUT_MS) as blocker:
        dock.run_button.click()
    assert blocker.args[0] is not None, blocker.args[1]
    dock.confirm_cells_spin.setValue(n)  # at the threshold: no question
    asked.clear()
    with qtbot.waitSignal(dock.analysis_finished, timeout=TIMEOUT_MS) as blocker:
        dock.run_button.click()
    assert blocker.args[0] is not None and not asked


def test_cell_limit_set_in_the_panel(make_dock, project, scene_layers, checkpoints, qtbot):
    dock = make_dock()
    _ready(dock, checkpoints)
    dock.confirm_cells_spin.setValue(0)  # never ask
    dock.max_cells_spin.setValue(_cells(dock) - 1)
    with qtbot.waitSignal(dock.analysis_finished, timeout=TIMEOUT_MS) as blocker:
        dock.run_button.click()
    layer, message = blocker.args
    assert layer is None and "Cell limit" in message and f"{_cells(dock) - 1}" in message, message
    assert dock.progress_bar.value() == 0
    dock.max_cells_spin.setValue(_cells(dock))
    with qtbot.waitSignal(dock.analysis_finished, timeout=TIMEOUT_MS) as blocker:
        dock.run_button.click()
    assert blocker.args[0] is not None, blocker.args[1]
