"""Every Processing algorithm through processing.run, and predict_population through qgis_process."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import sysconfig

import pytest
from qgis_testlib import CELL, EPSG, IMAGE_COLS, REPO, SCENE_CELLS, X0, Y0

pytestmark = pytest.mark.qgis


def extent_string(margin=10.0, crs=EPSG):
    # Processing's extent text is XMIN,XMAX,YMIN,YMAX [CRS]
    return f"{X0 + margin},{X0 + SCENE_CELLS * CELL - margin},{Y0 + margin},{Y0 + SCENE_CELLS * CELL - margin} [{crs}]"


def predict_params(scene, checkpoint, **extra):
    params = {"EXTENT": extent_string(), "POIS": f"{scene['pois']}|layername=pois", "NAME_FIELD": "title",
              "CATEGORY_FIELD": "kind", "IMAGERY": str(scene["imagery"]), "CHECKPOINT": str(checkpoint),
              "BACKEND": 1, "DEVICE": 2, "CELL_SIZE": CELL, "BATCH_SIZE": 4, "OUTPUT": "TEMPORARY_OUTPUT"}
    params.update(extra)
    return params


def test_create_region_grid(provider, project):
    import processing

    from refound_core.data.grid import Grid

    res = processing.run("refound:create_region_grid", {"EXTENT": extent_string(), "CELL_SIZE": CELL,
                                                         "OUTPUT": "TEMPORARY_OUTPUT"})
    layer = res["OUTPUT"]
    assert res["CELLS"] == layer.featureCount() == SCENE_CELLS ** 2
    want = Grid(EPSG, CELL).cells_for_extent(X0 + 10, Y0 + 10, X0 + SCENE_CELLS * CELL - 10, Y0 + SCENE_CELLS * CELL - 10)
    got = {f["cell_id"]: f.geometry().boundingBox() for f in layer.getFeatures()}
    assert set(got) == {c.id for c in want}
    for c in want:
        b = got[c.id]
        assert (b.xMinimum(), b.yMinimum(), b.xMaximum(), b.yMaximum()) == c.bounds
    assert layer.crs().authid() == EPSG


@pytest.mark.parametrize("alg,task,lo,hi", [
    ("predict_urban_villages", "urban_village", 0.0, 1.0),
    ("predict_population", "population", -math.inf, math.inf),
    ("predict_commercial_activeness", "commercial", -math.inf, math.inf),
])
def test_predict_algorithms(provider, project, scene, checkpoints, alg, task, lo, hi):
    import processing

    res = processing.run(f"refound:{alg}", predict_params(scene, checkpoints["root"]))
    layer = res["OUTPUT"]
    assert res["CELLS"] == layer.featureCount() == SCENE_CELLS ** 2
    assert res["PREDICTED"] == IMAGE_COLS * SCENE_CELLS and res["MODEL"] == "refound_tiny"
    for f in layer.getFeatures():
        if f["sufficient"]:
            assert lo <= float(f["prediction"]) <= hi and math.isfinite(float(f["prediction"]))
        else:
            assert f["prediction"] is None or str(f["prediction"]) == "NULL"


def test_predictions_agree_with_the_dock_path(provider, project, scene, checkpoints):
    """Same cells, same values whatever the entry point (one analysis function)."""
    import processing

    a = processing.run("refound:predict_population", predict_params(scene, checkpoints["population"]))["OUTPUT"]
    b = processing.run("refound:predict_population",
                       predict_params(scene, checkpoints["root"], EXTENT=extent_string(margin=100.0)))["OUTPUT"]
    va = {f["cell_id"]: f["prediction"] for f in a.getFeatures()}
    vb = {f["cell_id"]: f["prediction"] for f in b.getFeatures()}
    assert va == vb


def test_compute_region_embeddings(provider, project, scene, checkpoints):
    import processing

    res = processing.run("refound:compute_region_embeddings", predict_params(scene, checkpoints["backbone"]))
    layer = res["OUTPUT"]
    emb = [n for n in layer.fields().names() if n.startswith("emb_")]
    assert len(emb) == 64  # refound_tiny hidden size
    suff = [f for f in layer.getFeatures() if f["sufficient"]]
    assert len(suff) == IMAGE_COLS * SCENE_CELLS
    vecs = [[float(f[n]) for n in emb] for f in suff]
    assert all(all(math.isfinite(v) for v in vec) for vec in vecs)
    assert len({tuple(v) for v in vecs}) == len(vecs)  # distinct regions, distinct embeddings
    assert abs(sum(float(f["prediction"]) for f in suff)) < 1e-6 * len(suff) * 1e3  # PC1 scores are centred


def test_output_styled_by_post_processor(provider, project, scene, checkpoints, iface):
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsRuleBasedRenderer

    context = QgsProcessingContext()
    context.setProject(project)
    res = processing.runAndLoadResults("refound:predict_population", predict_params(scene, checkpoints["root"]),
                                       context=context, feedback=QgsProcessingFeedback())
    layer = project.mapLayer(res["OUTPUT"]) if isinstance(res["OUTPUT"], str) else res["OUTPUT"]
    assert layer is not None and layer.featureCount() == SCENE_CELLS ** 2
    assert isinstance(layer.renderer(), QgsRuleBasedRenderer)
    assert "Population" in layer.name() and "refound_tiny" in layer.name()


def test_wrong_inputs_raise_processing_errors(provider, project, scene, checkpoints, tmp_path):
    import processing
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="no head for"):
        processing.run("refound:predict_population", predict_params(scene, checkpoints["urban_village"]))
    with pytest.raises(QgsProcessingException, match="antimeridian"):
        processing.run("refound:predict_population",
                       predict_params(scene, checkpoints["root"], EXTENT="179.9,180.2,60,60.1 [EPSG:4326]"))
    from qgis_testlib import write_geotiff

    write_geotiff(tmp_path / "far.tif", X0 + 100 * CELL, Y0 + CELL, 32, 32, 8.0)
    with pytest.raises(QgsProcessingException, match="does not cover"):
        processing.run("refound:predict_population",
                       predict_params(scene, checkpoints["root"], IMAGERY=str(tmp_path / "far.tif")))


def _label_layer(project, value_field=False):
    from qgis.core import QgsFeature, QgsGeometry, QgsRectangle, QgsVectorLayer

    uri = f"Polygon?crs={EPSG}" + ("&field=pop:double" if value_field else "")
    layer = QgsVectorLayer(uri, "labels", "memory")
    feats = []
    # Label polygons over whole cells of the imagery-covered columns, at opposite corners.
    for i, (c, r, v) in enumerate([(0, 0, 120.0), (2, 3, 30.0), (1, 1, 80.0)] if value_field else [(0, 0, 1), (2, 3, 1)]):
        f = QgsFeature(layer.fields())
        rect = QgsRectangle(X0 + c * CELL + 5, Y0 + r * CELL + 5, X0 + (c + 1) * CELL - 5, Y0 + (r + 1) * CELL - 5)
        f.setGeometry(QgsGeometry.fromRect(rect))
        if value_field:
            f.setAttributes([v])
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    project.addMapLayer(layer)
    return layer


def test_train_task_head_binary_then_predict(provider, project, scene, checkpoints, tmp_path):
    import processing

    from refound_qgis.task import read_checkpoint_meta

    labels = _label_layer(project)
    out = tmp_path / "uv_head"
    res = processing.run("refound:train_task_head", {
        "POIS": f"{scene['pois']}|layername=pois", "NAME_FIELD": "title", "CATEGORY_FIELD": "kind",
        "IMAGERY": str(scene["imagery"]), "CHECKPOINT": str(checkpoints["backbone"]), "LABELS": labels,
        "TASK": 0, "CELL_SIZE": CELL, "EPOCHS": 60, "DEVICE": 2, "OUTPUT": str(out)})
    # Polygons' extent = cols 0..2, rows 0..3 = 12 cells: 2 positives, 10 negatives, all with data.
    assert res["LABELLED_CELLS"] == 12
    assert 0.0 <= res["TRAIN_METRIC"] <= 1.0
    meta = read_checkpoint_meta(str(out))
    assert meta["task"]["name"] == "urban_village" and meta["head"]["kind"] == "binary"
    pred = processing.run("refound:predict_urban_villages", predict_params(scene, out))["OUTPUT"]
    values = {f["cell_id"]: float(f["prediction"]) for f in pred.getFeatures() if f["sufficient"]}
    assert len(values) == 12 and all(0.0 <= v <= 1.0 for v in values.values())


def test_train_task_head_regression_from_label_field(provider, project, scene, checkpoints, tmp_path):
    import processing

    labels = _label_layer(project, value_field=True)
    out = tmp_path / "pop_head"
    res = processing.run("refound:train_task_head", {
        "POIS": f"{scene['pois']}|layername=pois", "NAME_FIELD": "title", "CATEGORY_FIELD": "kind",
        "CHECKPOINT": str(checkpoints["backbone"]), "LABELS": labels, "LABEL_FIELD": "pop", "TASK": 1,
        "CELL_SIZE": CELL, "EPOCHS": 300, "DEVICE": 2, "OUTPUT": str(out)})
    assert res["LABELLED_CELLS"] == 3
    assert res["TRAIN_METRIC"] > 0.5  # 3 points and a 2-layer MLP: it can fit them
    # Predict from the same inputs as in training (POIs only): the labelled cells come back close
    # to their labels, in their own units (the head's target normalisation is undone).
    pred = processing.run("refound:predict_population", predict_params(scene, out, IMAGERY=None))["OUTPUT"]
    fitted = {f["cell_id"]: float(f["prediction"]) for f in pred.getFeatures() if f["sufficient"]}
    for (c, r), want in (((0, 0), 120.0), ((2, 3), 30.0), ((1, 1), 80.0)):
        assert fitted[f"{EPSG}/256/{1500 + c}_{26060 + r}"] == pytest.approx(want, abs=25.0)


def _qgis_process_env(home, plugin_path):
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "QGIS_PREFIX_PATH")}
    env.update(HOME=str(home), QT_QPA_PLATFORM="offscreen", QGIS_PLUGINPATH=str(plugin_path),
               PYTHONPATH=os.pathsep.join([str(REPO), site]), XDG_RUNTIME_DIR=os.environ["XDG_RUNTIME_DIR"])
    return env


@pytest.mark.slow
def test_predict_population_with_qgis_process(scene, checkpoints, tmp_path):
    """Headless: /usr/bin/qgis_process.bin (not the wrapper, SETUP-NOTES pitfall 9), plugin enabled
    from QGIS_PLUGINPATH in a throw-away HOME, venv site-packages on PYTHONPATH for torch."""
    sys.path.insert(0, str(REPO / "scripts"))
    from build_plugin_zip import stage

    qp = "/usr/bin/qgis_process.bin"
    if not os.path.exists(qp):
        pytest.fail("qgis_process.bin is missing; install the Debian package 'qgis'")
    plugins = tmp_path / "plugins"
    stage(plugins)
    env = _qgis_process_env(tmp_path / "home", plugins)
    (tmp_path / "home").mkdir()
    en = subprocess.run([qp, "plugins", "enable", "refound_qgis"], env=env, capture_output=True, text=True, timeout=120)
    assert en.returncode == 0 or "already enabled" in en.stderr, en.stdout[-2000:] + en.stderr[-2000:]
    out = tmp_path / "population.gpkg"
    args = predict_params(scene, checkpoints["population"], OUTPUT=str(out))
    cmd = [qp, "run", "refound:predict_population", "--json", "--"] + [f"{k}={v}" for k, v in args.items()]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout[res.stdout.index("{"):])
    assert report["results"]["CELLS"] == SCENE_CELLS ** 2
    assert report["results"]["PREDICTED"] == IMAGE_COLS * SCENE_CELLS
    with sqlite3.connect(out) as db:
        styles = db.execute("SELECT count(*) FROM layer_styles").fetchone()[0]
    from qgis.core import QgsRuleBasedRenderer, QgsVectorLayer

    layer = QgsVectorLayer(str(out), "population", "ogr")  # opens with the stored default style
    n = layer.featureCount()
    assert isinstance(layer.renderer(), QgsRuleBasedRenderer)
    del layer
    assert n == SCENE_CELLS ** 2 and styles >= 1
