"""One analysis path (issue 14): the same synthetic city through `refound predict`, the
Processing algorithm and the dock's task gives the same cells, values and columns."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from qgis_testlib import CELL, EPSG, IMAGE_COLS, REPO, SCENE_CELLS, X0, Y0
from test_dock import _fill, _run, dock  # noqa: F401 - the dock fixture and its helpers
from test_processing import predict_params

pytestmark = pytest.mark.qgis


def _read(path):
    """``({cell_id: prediction or None}, field names without the GeoPackage fid)`` of a result file."""
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(f"{path}|layername=cells", "read", "ogr")
    if not layer.isValid():  # a Processing file output names its layer after the file
        layer = QgsVectorLayer(f"{path}|layername={path.stem}", "read", "ogr")
    assert layer.isValid(), path
    names = [n for n in layer.fields().names() if n != "fid"]
    vals = {}
    for f in layer.getFeatures():
        v = f["prediction"]
        vals[f["cell_id"]] = None if v is None or str(v) == "NULL" else float(v)
    return vals, names


def test_cli_processing_and_dock_agree(provider, dock, qtbot, project, scene, scene_layers, checkpoints,  # noqa: F811
                                       tmp_path):
    import processing

    margin = 10.0
    ext = (X0 + margin, Y0 + margin, X0 + SCENE_CELLS * CELL - margin, Y0 + SCENE_CELLS * CELL - margin)
    cli_out = tmp_path / "cli.gpkg"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "training.cli", "predict", "--checkpoint", str(checkpoints["population"]),
           "--pois", str(scene["pois"]), "--poi-layer", "pois", "--name-field", "title", "--category-field", "kind",
           "--imagery", str(scene["imagery"]), "--extent", ",".join(f"{v:.1f}" for v in ext) + f",{EPSG}",
           "--cell-size", str(CELL), "--batch-size", "4", "--device", "cpu", "--task", "population",
           "--out", str(cli_out), "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    proc_out = tmp_path / "processing.gpkg"
    processing.run("refound:predict_population", predict_params(scene, checkpoints["root"], OUTPUT=str(proc_out)))

    pois, img = scene_layers
    dock_out = tmp_path / "dock.gpkg"
    _fill(dock, pois, img, checkpoints["root"], "population", str(dock_out))
    layer, message = _run(qtbot, dock)
    assert layer is not None, message

    cli, cli_cols = _read(cli_out)
    got = {"processing": _read(proc_out), "dock": _read(dock_out)}
    assert len(cli) == SCENE_CELLS ** 2
    assert sum(v is not None for v in cli.values()) == IMAGE_COLS * SCENE_CELLS
    assert {"image_coverage", "image_used", "sufficient", "poi_count"} <= set(cli_cols)
    from qgis.core import QgsVectorLayer

    cli_layer = QgsVectorLayer(f"{cli_out}|layername=cells", "cli", "ogr")
    used = {f["cell_id"]: (int(f["image_used"]), float(f["image_coverage"])) for f in cli_layer.getFeatures()}
    assert sorted(set(used.values())) == [(0, 0.0), (1, 1.0)]  # the imagery covers the west columns only
    for name, (vals, cols) in got.items():
        assert cols == cli_cols, name
        assert vals.keys() == cli.keys(), name
        for cid, v in cli.items():
            if v is None:
                assert vals[cid] is None, (name, cid)
            else:
                assert vals[cid] is not None and math.isfinite(vals[cid])
                assert abs(vals[cid] - v) <= 1e-5, (name, cid, vals[cid], v)
