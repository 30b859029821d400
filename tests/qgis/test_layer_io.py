"""QGIS layers -> RegionSample through the core pipeline's grid and blocks (QgisCellSource):
stable grid, POIs binned after reprojection, chips rendered by QGIS."""
from __future__ import annotations


import numpy as np
import pytest
from qgis_testlib import CELL, EPSG, IMAGE_COLS, SCENE_CELLS, X0, Y0, expected_cell_count, scene_extent

pytestmark = pytest.mark.qgis


def _crs(authid):
    from qgis.core import QgsCoordinateReferenceSystem

    return QgsCoordinateReferenceSystem(authid)


def _samples(pois, imagery, rect, chip, crs=EPSG):
    """The RegionSamples run_analysis would hand the model for ``rect`` (core grid and blocks)."""
    from refound_core.inference.pipeline import AnalysisRequest, collect_samples
    from refound_qgis.sources import QgisCellSource

    return collect_samples(AnalysisRequest(cell_size=CELL), QgisCellSource(pois, imagery, rect, _crs(crs)), chip)


def test_grid_matches_core_grid_and_is_stable(qgis_app):
    from qgis.core import QgsCoordinateTransform, QgsProject, QgsRectangle

    from refound_core.data.grid import Grid
    from refound_qgis import layer_io

    # Same cells as the core grid (the CLI), for a metric extent ...
    rect = QgsRectangle(X0 + 30, Y0 + 70, X0 + 700, Y0 + 900)
    plan = layer_io.plan_grid(rect, _crs(EPSG), CELL)
    core = Grid(EPSG, CELL).cells_for_extent(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
    assert [c.id for c in plan.cells] == [c.id for c in core]
    assert [c.bounds for c in plan.cells] == [c.bounds for c in core]
    # Panning by less than a cell keeps every shared cell's id and bounds (fixed origin).
    moved = layer_io.plan_grid(QgsRectangle(X0 + 130, Y0 + 10, X0 + 800, Y0 + 840), _crs(EPSG), CELL)
    shared = {c.id: c.bounds for c in plan.cells}.keys() & {c.id for c in moved.cells}
    assert shared
    for c in moved.cells:
        if c.id in shared:
            assert c.bounds == next(p.bounds for p in plan.cells if p.id == c.id)
    # A lon/lat extent gets the UTM zone of its centre, the core rule.
    geo = QgsCoordinateTransform(_crs(EPSG), _crs("EPSG:4326"), QgsProject.instance()).transformBoundingBox(rect)
    gplan = layer_io.plan_grid(geo, _crs("EPSG:4326"), CELL)
    assert gplan.crs_authid == Grid.for_extent((geo.xMinimum(), geo.yMinimum(), geo.xMaximum(), geo.yMaximum()),
                                               "EPSG:4326", CELL).crs == EPSG
    # Web Mercator is metric but not true to scale: UTM instead (docs/PLUGIN.md).
    merc = QgsCoordinateTransform(_crs(EPSG), _crs("EPSG:3857"), QgsProject.instance()).transformBoundingBox(rect)
    assert layer_io.plan_grid(merc, _crs("EPSG:3857"), CELL).crs_authid == EPSG


@pytest.mark.parametrize("case", ["empty", "antimeridian", "inverted_lon", "cell_size", "too_many"])
def test_bad_extents_raise_one_actionable_error(qgis_app, case):
    from qgis.core import QgsRectangle

    from refound_core.errors import InputError
    from refound_qgis import layer_io

    args = {
        "empty": (QgsRectangle(X0, Y0, X0, Y0), _crs(EPSG), CELL, "empty"),
        "antimeridian": (QgsRectangle(179.5, 60.0, 180.5, 60.5), _crs("EPSG:4326"), CELL, "antimeridian"),
        "inverted_lon": (QgsRectangle(-181.0, 10.0, -179.0, 11.0), _crs("EPSG:4326"), CELL, "antimeridian"),
        "cell_size": (QgsRectangle(X0, Y0, X0 + 500, Y0 + 500), _crs(EPSG), -5, "cell size"),
        "too_many": (QgsRectangle(X0, Y0, X0 + 100_000, Y0 + 100_000), _crs(EPSG), CELL, "limit"),
    }[case]
    with pytest.raises(InputError, match=args[3]):
        layer_io.plan_grid(*args[:3], max_cells=1000)


def test_samples_from_layers(scene_layers, scene):
    from qgis.core import QgsRectangle

    from refound_qgis import layer_io

    pois_layer, img_layer = scene_layers
    rect = scene_extent()
    plan = layer_io.plan_grid(rect, _crs(EPSG), CELL)
    assert len(plan) == expected_cell_count(rect) == SCENE_CELLS ** 2
    pois = layer_io.PoiInput.from_layer(pois_layer, "title", "kind")
    imagery = layer_io.ImageryInput.from_layer(img_layer)
    chip = 64  # 256 m / 64 px = 4 m: the raster's own pixel size, so chips are exact copies
    samples = _samples(pois, imagery, rect, chip)
    assert [s.cell_id for s in samples] == [c.id for c in plan.cells]

    # POIs: each sample holds exactly the scene POIs inside its bounds (reprojected from lon/lat).
    xy = scene["poi_xy"]
    assert sum(s.num_pois for s in samples) == len(xy)
    for s in samples:
        x0, y0, x1, y1 = s.bounds
        inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
        assert s.num_pois == int(inside.sum())
        if s.num_pois:
            got = np.sort(s.poi_xy, axis=0)
            want = np.sort(xy[inside], axis=0)
            assert np.allclose(got, want, atol=0.01)  # cm agreement after the round trip through lon/lat
            assert set(s.poi_categories) <= set(scene["categories"])

    # Imagery: covered cells hold the raster's own pixels, row 0 = north; the east column has none.
    image, pixel = scene["image"], scene["pixel"]
    for s in samples:
        col = int(round(s.bounds[0] / CELL)) - int(X0 / CELL)
        row_from_top = SCENE_CELLS - 1 - (int(round(s.bounds[1] / CELL)) - int(Y0 / CELL))
        if col >= IMAGE_COLS:
            assert s.image is None and s.image_coverage == 0.0
            continue
        assert s.image.shape == (chip, chip, 3) and s.image.dtype == np.uint8
        assert s.image_coverage == pytest.approx(1.0)
        r0, c0 = row_from_top * chip, col * chip
        assert np.array_equal(s.image, image[r0:r0 + chip, c0:c0 + chip])


def test_partial_coverage_and_missing_imagery(project, tmp_path, scene):
    from qgis.core import QgsRasterLayer, QgsRectangle

    from qgis_testlib import write_geotiff
    from refound_core.errors import InputError
    from refound_qgis import layer_io

    # A raster covering the west half of one cell: coverage 0.5 there.
    write_geotiff(tmp_path / "half.tif", X0, Y0 + CELL, 32, 64, 4.0, seed=3)
    half = QgsRasterLayer(str(tmp_path / "half.tif"), "half")
    project.addMapLayer(half)
    got = _samples(None, layer_io.ImageryInput.from_layer(half),
                   QgsRectangle(X0 + 1, Y0 + 1, X0 + 2 * CELL - 1, Y0 + CELL - 1), 64)
    assert sorted(s.image_coverage for s in got) == pytest.approx([0.0, 0.5])
    # Nodata pixels count as not covered (QGIS's renderer makes them transparent).
    write_geotiff(tmp_path / "nodata.tif", X0, Y0 + CELL, 64, 64, 4.0, seed=4, nodata_block=True)
    nod = QgsRasterLayer(str(tmp_path / "nodata.tif"), "nodata")
    project.addMapLayer(nod)
    [s] = _samples(None, layer_io.ImageryInput.from_layer(nod), QgsRectangle(X0 + 1, Y0 + 1, X0 + CELL - 1, Y0 + CELL - 1),
                   64)
    rgb, cov = s.image, s.image_coverage
    assert cov == pytest.approx(0.5) and not rgb[:, :32].any() and rgb[:, 32:].all()
    # ... and the model is told which pixels hold data (the coverage-aware inputs' mask).
    assert s.image_valid is not None and not s.image_valid[:, :32].any() and s.image_valid[:, 32:].all()
    # A raster far away from the extent: one clear error.
    with pytest.raises(InputError, match="does not cover"):
        _samples(None, layer_io.ImageryInput.from_layer(half), QgsRectangle(X0 + 50 * CELL, Y0, X0 + 52 * CELL, Y0 + CELL),
                 64)


def test_poi_input_checks_fields(scene_layers):
    from refound_core.errors import InputError
    from refound_qgis import layer_io

    pois_layer, img = scene_layers
    with pytest.raises(InputError, match="no field 'name'"):
        layer_io.PoiInput.from_layer(pois_layer, "name", "kind")
    with pytest.raises(InputError, match="No category field"):
        layer_io.PoiInput.from_layer(pois_layer, "title", "")
    with pytest.raises(InputError, match="No POI layer"):
        layer_io.PoiInput.from_layer(None, "title", "kind")
