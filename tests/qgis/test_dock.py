"""The dock, filled through qtbot, runs a real analysis in-process on the synthetic scene."""
from __future__ import annotations

import math
import os

import pytest

from qgis_testlib import fill_dock, show_canvas  # noqa: E402
from qgis_testlib import CELL, EPSG, IMAGE_COLS, SCENE_CELLS, X0, Y0, expected_cell_count, scene_extent

pytestmark = pytest.mark.qgis
TIMEOUT_MS = 60_000


@pytest.fixture
def dock(iface, qtbot, clean_settings):

    from refound_qgis.dock import RefoundDock

    # A shown, square top-level canvas: the mocked iface's canvas sits in a hidden main window
    # and never gets its size, so its extent would not be the one set.
    canvas = show_canvas(qtbot, iface, EPSG, scene_extent())
    d = RefoundDock(iface)
    qtbot.addWidget(d)
    yield d
    d.cancel_analysis()
    if d.current_task is not None:
        with qtbot.waitSignal(d.analysis_finished, timeout=TIMEOUT_MS):
            pass
    d.shutdown()


def _fill(dock, pois, img, checkpoint, task="urban_village", output=""):
    fill_dock(dock, pois, img, task=task, checkpoint=checkpoint, batch=4, output=output)


def _run(qtbot, dock):
    with qtbot.waitSignal(dock.analysis_finished, timeout=TIMEOUT_MS) as blocker:
        dock.run_button.click()
    return blocker.args


def assert_styled(layer):
    """Rule-based style: every sufficient cell falls in exactly one class, every insufficient
    cell in the (hatched or transparent) insufficient rule."""
    from qgis.core import QgsExpression, QgsExpressionContext, QgsExpressionContextUtils, QgsRuleBasedRenderer
    from qgis.PyQt.QtCore import Qt

    r = layer.renderer()
    assert isinstance(r, QgsRuleBasedRenderer)
    rules = r.rootRule().children()
    exprs = [QgsExpression(rule.filterExpression()) for rule in rules]
    ctx = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
    for f in layer.getFeatures():
        ctx.setFeature(f)
        hits = [rule for rule, e in zip(rules, exprs) if e.evaluate(ctx)]
        assert len(hits) == 1, (f["cell_id"], [h.label() for h in hits])
        if not f["sufficient"]:
            sym = hits[0].symbol().symbolLayer(0)
            assert "insufficient" in hits[0].label()
            assert sym.brushStyle() != Qt.SolidPattern or sym.color().alpha() == 0


def _layers(project):
    return {lyr.id(): lyr for lyr in project.mapLayers().values()}


def test_dock_runs_a_real_analysis(qtbot, dock, iface, project, scene_layers, checkpoints):
    from qgis.core import QgsRuleBasedRenderer

    pois, img = scene_layers
    # The bundle folder (one checkpoint per task): the dock picks the urban-village one.
    _fill(dock, pois, img, checkpoints["root"], "urban_village")
    assert "16 cells" in dock.estimate_label.text()
    before = set(_layers(project))
    layer, message = _run(qtbot, dock)
    assert layer is not None, message
    assert set(_layers(project)) - before == {layer.id()}
    # One feature per cell of the canvas extent, with ids of the fixed grid.
    n = expected_cell_count(iface.mapCanvas().extent())
    assert layer.featureCount() == n == SCENE_CELLS ** 2
    names = layer.fields().names()
    for f in ("prediction", "cell_id", "poi_count", "image_coverage", "sufficient"):
        assert f in names
    feats = list(layer.getFeatures())
    assert {f["cell_id"] for f in feats} == {f"{EPSG}/256/{c}_{r}" for c in range(1500, 1504) for r in range(26060, 26064)}
    for f in feats:
        col = int(f["cell_id"].split("/")[-1].split("_")[0]) - 1500
        if col >= IMAGE_COLS:  # neither POIs nor imagery: kept, flagged, not predicted
            assert not f["sufficient"] and f["prediction"] in (None,) or str(f["prediction"]) == "NULL"
            assert f["image_coverage"] == 0 and f["poi_count"] == 0
        else:
            assert f["sufficient"]
            assert 0.0 <= float(f["prediction"]) <= 1.0  # a probability
            assert f["image_coverage"] == pytest.approx(1.0)
    assert sum(f["poi_count"] for f in feats) == 60
    # Styled: rule-based, probability classes plus a hatched rule for insufficient cells.
    r = layer.renderer()
    assert isinstance(r, QgsRuleBasedRenderer)
    assert_styled(layer)
    assert any("0.50" in rule.label() for rule in r.rootRule().children())  # the decision break
    # Legend title carries task, model and date; the layer sits above the inputs.
    assert "Urban villages" in layer.name() and "refound_tiny" in layer.name()
    assert __import__("datetime").date.today().isoformat() in layer.name()
    order = [n.layerId() for n in project.layerTreeRoot().findLayers()]
    assert order.index(layer.id()) < min(order.index(pois.id()), order.index(img.id()))
    assert "refound_tiny" in layer.metadata().abstract()
    assert dock.progress_bar.value() == 100 and dock.run_button.isEnabled()
    # The same cells give the same predictions on a second run (stable grid, seeded featurisation).
    first = {f["cell_id"]: f["prediction"] for f in feats}
    layer2, _ = _run(qtbot, dock)
    assert {f["cell_id"]: f["prediction"] for f in layer2.getFeatures()} == first


def test_dock_population_to_geopackage(qtbot, dock, project, scene_layers, checkpoints, tmp_path):
    pois, img = scene_layers
    out = tmp_path / "population.gpkg"
    _fill(dock, pois, img, checkpoints["population"], "population", str(out))
    layer, message = _run(qtbot, dock)
    assert layer is not None, message
    assert out.exists() and layer.source().startswith(str(out))
    values = [f["prediction"] for f in layer.getFeatures() if f["sufficient"]]
    assert len(values) == IMAGE_COLS * SCENE_CELLS and all(math.isfinite(float(v)) for v in values)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp leftovers


def test_normal_run_leaves_no_warning_anywhere(qtbot, dock, project, scene_layers, checkpoints, tmp_path, capfd):
    """A normal analysis to a styled GeoPackage: no warning or error in QGIS's message log (any
    tag: ReFound, GDAL, OGR, Python), no Python warning, nothing from GDAL on stderr (the
    'styleName has N characters' warning was printed on every styled write)."""
    import warnings

    from qgis.core import Qgis, QgsApplication

    seen = []

    def on_message(message, tag, level):
        if level in (Qgis.Warning, Qgis.Critical):
            seen.append((tag, message))

    log = QgsApplication.messageLog()
    log.messageReceived.connect(on_message)
    pois, img = scene_layers
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fill(dock, pois, img, checkpoints["population"], "population", str(tmp_path / "pop.gpkg"))
            layer, message = _run(qtbot, dock)
            qtbot.wait(50)  # deliver queued log messages
    finally:
        log.messageReceived.disconnect(on_message)
    assert layer is not None, message
    assert seen == []
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    err = capfd.readouterr().err
    assert "Warning" not in err and "ERROR" not in err and "styleName" not in err, err


def test_field_mapping_remembered_per_layer(qtbot, dock, scene_layers):
    from qgis.core import QgsVectorLayer

    from refound_qgis import settings

    pois, img = scene_layers
    other = QgsVectorLayer("Point?crs=EPSG:4326&field=name:string&field=amenity:string", "other", "memory")
    __import__("qgis.core", fromlist=["QgsProject"]).QgsProject.instance().addMapLayer(other)
    dock.poi_combo.setLayer(pois)
    dock.name_field.setField("title")
    dock.category_field.setField("kind")
    assert settings.field_mapping(pois.source()) == ("title", "kind")
    dock.poi_combo.setLayer(other)  # a new layer: fields guessed from their names
    assert (dock.name_field.currentField(), dock.category_field.currentField()) == ("name", "amenity")
    dock.poi_combo.setLayer(pois)  # back: the remembered mapping returns
    assert (dock.name_field.currentField(), dock.category_field.currentField()) == ("title", "kind")


def test_cancel_leaves_no_layer_and_no_file(qtbot, dock, project, scene_layers, checkpoints, tmp_path, monkeypatch):
    from refound_qgis.sources import QgisCellSource

    pois, img = scene_layers
    out = tmp_path / "canceled.gpkg"
    _fill(dock, pois, img, checkpoints["root"], "urban_village", str(out))
    real = QgisCellSource.read_block

    def read_then_cancel(self, cells):
        samples = real(self, cells)
        dock.current_task.cancel()  # the user presses Cancel while the model is about to run
        return samples

    monkeypatch.setattr(QgisCellSource, "read_block", read_then_cancel)
    before = set(_layers(project))
    from qgis.core import Qgis, QgsApplication

    failures = []
    QgsApplication.messageLog().messageReceived.connect(
        lambda m, tag, level: failures.append(m) if level >= Qgis.Warning else None)
    layer, message = _run(qtbot, dock)
    assert layer is None and "canceled" in message.lower()
    assert "failed" not in message.lower() and failures == []  # a cancel is reported as a cancel
    assert dock.progress_bar.value() == 0  # no stale progress after the cancel
    assert set(_layers(project)) == before
    assert not out.exists() and os.listdir(tmp_path) == []


def test_cancel_button_during_run(qtbot, dock, project, scene_layers, checkpoints):
    pois, img = scene_layers
    _fill(dock, pois, img, checkpoints["root"], "urban_village")
    before = set(_layers(project))
    with qtbot.waitSignal(dock.analysis_finished, timeout=TIMEOUT_MS) as blocker:
        dock.start_analysis()
        assert dock.cancel_button.isEnabled()
        dock.cancel_button.click()
    assert blocker.args[0] is None and "canceled" in blocker.args[1].lower()
    assert set(_layers(project)) == before


@pytest.mark.parametrize("case", ["no_poi_layer", "antimeridian", "raster_elsewhere", "empty_extent",
                                  "no_checkpoint", "wrong_task_checkpoint"])
def test_wrong_inputs_give_a_message_and_no_layer(qtbot, dock, iface, project, scene_layers, checkpoints, tmp_path,
                                                  case):
    from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsRectangle

    from qgis_testlib import write_geotiff

    pois, img = scene_layers
    _fill(dock, pois, img, checkpoints["root"], "urban_village")
    canvas = iface.mapCanvas()
    expect = {"no_poi_layer": "No POI layer", "antimeridian": "antimeridian", "raster_elsewhere": "does not cover",
              "empty_extent": "empty", "no_checkpoint": "checkpoint", "wrong_task_checkpoint": "no head for"}[case]
    if case == "no_poi_layer":
        dock.poi_combo.setLayer(None)
    elif case == "antimeridian":
        canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
        canvas.setExtent(QgsRectangle(179.9, 60.0, 180.1, 60.1))
    elif case == "raster_elsewhere":
        write_geotiff(tmp_path / "far.tif", X0 + 100 * CELL, Y0 + CELL, 64, 64, 4.0)
        far = QgsRasterLayer(str(tmp_path / "far.tif"), "far")
        project.addMapLayer(far)
        dock.imagery_combo.setLayer(far)
    elif case == "empty_extent":
        # A canvas never reports an empty extent by itself (e.g. before the first render it can).
        canvas.extent = lambda: QgsRectangle(X0, Y0, X0, Y0)
    elif case == "no_checkpoint":
        dock.checkpoint_widget.setFilePath(str(tmp_path / "missing"))
    elif case == "wrong_task_checkpoint":
        dock.checkpoint_widget.setFilePath(str(checkpoints["population"]))
    before = set(_layers(project))
    layer, message = _run(qtbot, dock)
    assert layer is None
    assert expect.lower() in message.lower(), message
    assert dock.status_label.text() == message
    assert set(_layers(project)) == before
    assert dock.run_button.isEnabled() and dock.current_task is None


def test_block_size_does_not_change_results(project, scene_layers, checkpoints, monkeypatch):
    """Cells go through imagery reading and the model block by block (the core pipeline's
    blocks); the split is invisible."""
    from qgis.core import QgsCoordinateReferenceSystem

    from refound_core.inference import pipeline
    from refound_qgis import layer_io, task
    from refound_qgis.sources import QgisCellSource

    pois, img = scene_layers
    params = task.AnalysisParams(task="population", extent=scene_extent(), extent_crs=QgsCoordinateReferenceSystem(EPSG),
                                 checkpoint_dir=str(checkpoints["root"]), backend="inprocess", device="cpu", batch_size=2,
                                 pois=layer_io.PoiInput.from_layer(pois, "title", "kind"),
                                 imagery=layer_io.ImageryInput.from_layer(img))
    whole = task.execute(params)
    monkeypatch.setattr(pipeline, "BLOCK_CELLS", 4)  # 4 columns: one row per block
    seen = []
    real = QgisCellSource.read_block
    monkeypatch.setattr(QgisCellSource, "read_block", lambda self, cells: seen.append(len(cells)) or real(self, cells))
    progress = []
    split = task.execute(params, progress.append)
    assert seen == [4, 4, 4, 4]
    a = {c.cell_id: c.value for c in split.cells if c.sufficient}
    b = {c.cell_id: c.value for c in whole.cells if c.sufficient}
    assert a.keys() == b.keys() and len(a) == IMAGE_COLS * SCENE_CELLS
    for k in a:  # other batch compositions pad differently: equal up to bf16 rounding
        assert a[k] == pytest.approx(b[k], rel=1e-4)
    assert progress == sorted(progress) and progress[-1] == 1.0


@pytest.mark.parametrize("width", [240, 420])
def test_narrow_panel_cuts_no_label(qtbot, dock, width):
    """The panel can be dragged narrow (it used to insist on ~455 px and squeeze the map canvas, or
    have its labels cut where the dock area was narrower): each tab scrolls, form rows wrap their
    field below the label, and every label is drawn at its full width inside the scrollable area."""
    from qgis.PyQt.QtWidgets import QLabel, QScrollArea

    dock.show()
    dock.resize(width, 700)
    qtbot.wait(50)
    assert dock.width() <= width + 10
    areas = [dock.tabs.widget(i) for i in range(dock.tabs.count())]
    assert len(areas) == 2 and all(isinstance(a, QScrollArea) and a.widgetResizable() for a in areas)
    checked = 0
    for area in areas:
        dock.tabs.setCurrentWidget(area)
        qtbot.wait(20)
        reach = area.viewport().width() + area.horizontalScrollBar().maximum()
        for label in area.widget().findChildren(QLabel):
            if not (label.text() and label.isVisibleTo(dock)):
                continue
            right = label.mapTo(area.widget(), label.rect().topRight()).x()
            assert right <= reach, (label.text(), right, reach)  # reachable, never clipped away
            if not label.wordWrap():
                assert label.width() >= label.sizeHint().width(), (label.text(), label.width())
            checked += 1
    assert checked >= 10
