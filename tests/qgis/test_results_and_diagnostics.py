"""Result layers from any backend's answers, their placement in the project, and the diagnostics report."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
from qgis_testlib import CELL, EPSG

pytestmark = pytest.mark.qgis


def _cells(n=6, vectors=False):
    out = []
    for i in range(n):
        c = {"cell_id": f"{EPSG}/256/{i}_0", "bounds": (i * CELL, 0.0, (i + 1) * CELL, CELL), "poi_count": i,
             "image_coverage": 0.5, "sufficient": i != 3}
        if vectors:
            c["fused"] = None if i == 3 else [float(i), 2.0 * i, 1.0]
            c["value"] = None
        else:
            c["value"] = None if i == 3 else 10.0 * i
        out.append(c)
    return out


def test_result_layer_from_backend_answers(qgis_app, tmp_path):
    from qgis.core import QgsRuleBasedRenderer

    from refound_qgis import results

    when = dt.datetime(2024, 8, 25, 9, 30)
    layer = results.build_result_layer(_cells(), EPSG, "population", "refound_small", checkpoint="/ck",
                                       inputs={"POIs": "pois"}, when=when)
    assert layer.name() == "ReFound Population – refound_small – 2024-08-25 09:30:00"
    assert layer.fields().names() == ["cell_id", "prediction", "poi_count", "image_coverage", "image_used", "sufficient"]
    feats = {f["cell_id"]: f for f in layer.getFeatures()}
    assert len(feats) == 6 and layer.crs().authid() == EPSG
    bad = feats[f"{EPSG}/256/3_0"]
    assert bad["sufficient"] == 0 and (bad["prediction"] is None or str(bad["prediction"]) == "NULL")
    assert feats[f"{EPSG}/256/5_0"]["prediction"] == 50.0
    g = feats[f"{EPSG}/256/2_0"].geometry().boundingBox()
    assert (g.xMinimum(), g.xMaximum()) == (2 * CELL, 3 * CELL)
    assert isinstance(layer.renderer(), QgsRuleBasedRenderer)
    assert "refound_small" in layer.metadata().abstract() and "pois" in layer.metadata().abstract()
    # The same to a GeoPackage: the file holds the data and its default style.
    gp = results.build_result_layer(_cells(), EPSG, "population", "refound_small", output_path=str(tmp_path / "p"))
    assert gp.source().startswith(str(tmp_path / "p.gpkg")) and gp.featureCount() == 6
    from qgis.core import QgsVectorLayer

    reopened = QgsVectorLayer(f"{tmp_path / 'p.gpkg'}|layername=cells", "again", "ogr")
    assert isinstance(reopened.renderer(), QgsRuleBasedRenderer)
    del reopened, gp


def test_embedding_layer_has_vectors_and_pc1(qgis_app):
    from refound_qgis import results

    layer = results.build_result_layer(_cells(vectors=True), EPSG, "embedding", "refound_tiny")
    names = layer.fields().names()
    assert [n for n in names if n.startswith("emb_")] == ["emb_000", "emb_001", "emb_002"]
    feats = sorted(layer.getFeatures(), key=lambda f: f["poi_count"])
    pcs = [f["prediction"] for f in feats if f["sufficient"]]
    # Vectors (i, 2i, 1) lie on a line: PC1 is an affine function of i, centred, largest loading positive.
    i = np.array([0, 1, 2, 4, 5], dtype=float)
    assert np.allclose(pcs, (i - i.mean()) * math.sqrt(5.0), atol=1e-9)
    assert feats[3]["emb_000"] is None or str(feats[3]["emb_000"]) == "NULL"


def test_added_above_the_top_most_input_inside_its_group(project):
    from qgis.core import QgsVectorLayer

    from refound_qgis import results

    a = QgsVectorLayer("Point?crs=EPSG:4326", "a", "memory")
    b = QgsVectorLayer("Point?crs=EPSG:4326", "b", "memory")
    top = QgsVectorLayer("Point?crs=EPSG:4326", "top", "memory")
    project.addMapLayers([a, b, top], False)
    root = project.layerTreeRoot()
    root.addLayer(top)
    group = root.addGroup("inputs")
    group.addLayer(a)
    group.addLayer(b)
    out = results.build_result_layer(_cells(), EPSG, "urban_village", "m")
    results.add_to_project(out, [b.id(), a.id()], project)
    assert [n.layerId() for n in group.findLayers()] == [out.id(), a.id(), b.id()]
    alone = results.build_result_layer(_cells(), EPSG, "urban_village", "m")
    results.add_to_project(alone, [], project)
    assert root.children()[0].layerId() == alone.id()


def test_diagnostics_report(qgis_app, checkpoints, qtbot):
    from refound_qgis.diagnostics import DiagnosticsDialog, collect

    rep = collect({"backend": "remote", "backend_url": "http://127.0.0.1:9", "backend_token": "secret",
                   "checkpoint_dir": str(checkpoints["root"])})
    assert rep["qgis"].startswith("3.") and rep["python"].startswith("3.")
    assert rep["torch_in_qgis"]["importable"] is True and "cuda_available" in rep["torch_in_qgis"]
    assert rep["backend"]["reachable"] is False and "cannot reach" in rep["backend"]["error"]
    assert rep["settings"]["backend_token"] == "***"
    found = {c["task"]: c for c in rep["checkpoint"]["checkpoints"]}
    assert set(found) == {"urban_village", "population", "commercial", None}
    assert all(found["population"]["files"][f] for f in ("config.json", "model.safetensors", "head.safetensors",
                                                          "tokenizer", "category_vocab"))
    assert found[None]["files"]["head.safetensors"] is False and found[None]["model"] == "refound_tiny"
    dlg = DiagnosticsDialog(None, {"backend": "auto", "checkpoint_dir": ""}, probe_local=False)
    qtbot.addWidget(dlg)
    assert '"qgis"' in dlg.text.toPlainText()
    from refound_qgis.diagnostics import report_text

    text = report_text({"checkpoint_dir": "/data/Łódź/ckpt"})
    assert "Łódź" in text and "\\u0141" not in text  # readable, not escaped
