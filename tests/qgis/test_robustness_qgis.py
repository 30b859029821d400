"""Issue 19 in real headless QGIS: a second analysis lands on top of the first under its own
name, and the style stored in a GeoPackage has a name GDAL accepts (<= 30 characters)."""
from __future__ import annotations

import datetime as _dt
import sqlite3

from qgis_testlib import EPSG


def _cells():
    return [{"cell_id": f"{EPSG}/256/{i}_0", "bounds": (i * 256.0, 0.0, (i + 1) * 256.0, 256.0), "poi_count": i,
             "image_coverage": 0.5, "sufficient": True, "value": i / 4} for i in range(4)]


def test_second_result_on_top_with_its_own_name(project):
    from qgis.core import QgsVectorLayer

    from refound_qgis import results

    pois = QgsVectorLayer("Point?crs=EPSG:4326", "pois", "memory")
    project.addMapLayer(pois)
    when = _dt.datetime(2026, 1, 2, 3, 4, 5)
    first = results.build_result_layer(_cells(), EPSG, "urban_village", "m", when=when)
    results.add_to_project(first, [pois.id()], project)
    second = results.build_result_layer(_cells(), EPSG, "urban_village", "m", when=when)  # same second
    results.add_to_project(second, [pois.id()], project)
    order = [n.layerId() for n in project.layerTreeRoot().findLayers()]
    assert order == [second.id(), first.id(), pois.id()]
    assert first.name() != second.name() and second.name().startswith(first.name())
    assert "03:04:05" in first.name()  # time to the second: runs minutes apart differ


def test_geopackage_style_name_fits_gdal_limit(project, tmp_path):
    from refound_qgis import results

    layer = results.memory_layer(_cells(), EPSG, results.layer_title("urban_village", "a-long-model-name-v2"))
    assert len(layer.name()) > 30
    out = results.write_geopackage(layer, str(tmp_path / "uv.gpkg"), "urban_village")
    assert out.isValid()
    with sqlite3.connect(tmp_path / "uv.gpkg") as db:
        names = [r[0] for r in db.execute("SELECT styleName FROM layer_styles")]
    assert names and all(0 < len(n) <= 30 for n in names), names
