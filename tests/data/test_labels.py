"""Downstream labels (paper 5.1.2): area-weighted population, urban-village overlap, commercial activeness."""
import numpy as np
import pytest
import shapely

from refound_core.data.grid import Grid
from refound_core.data.labels import (area_weighted_sum, commercial_activeness, overlap_fraction,
                                      population_from_polygons, population_from_raster, urban_village_from_polygons)
from refound_core.data.poi_sources import assign_to_cells
from refound_core.errors import InputError

HSY_TOTAL = 71_724  # shared/data/README.md: 92 populated cells, 71,724 residents


@pytest.fixture(scope="module")
def hsy(shared_dir):
    return shared_dir / "data" / "helsinki" / "helsinki_population_grid_2020.gpkg"


@pytest.fixture(scope="module")
def hsy_bounds(hsy):
    import pyogrio

    return pyogrio.read_info(hsy)["total_bounds"]


def _write_polygons(path, geoms, crs, **fields):
    import geopandas as gpd

    gpd.GeoDataFrame(fields, geometry=list(geoms), crs=crs).to_file(path, engine="pyogrio")
    return path


def test_hsy_total_population_is_preserved_on_a_256m_utm_grid(hsy, hsy_bounds):
    g = Grid.for_extent(hsy_bounds, "EPSG:4326")  # UTM 35N
    cells = g.cells_for_extent(*hsy_bounds, extent_crs="EPSG:4326")
    pop = population_from_polygons(hsy, cells)
    assert pop.sum() == pytest.approx(HSY_TOTAL, rel=0.005)
    assert (pop >= 0).all() and (pop > 0).sum() > 92  # 250 m units spread over more 256 m cells


def _overlap_1d(a0, a1, b0, b1):
    return np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None)


@pytest.mark.parametrize("size", [250.0, 125.0])
def test_hsy_aligned_cells_get_their_unit_value_scaled_by_overlap(hsy, hsy_bounds, size):
    """HSY units are 250 m squares of ETRS-GK25 (EPSG:3879), columns on multiples of 250 m and rows
    offset by about -1 m. A grid in EPSG:3879 lines up with them, so each cell's value is, by hand,
    sum_u value_u * (x-overlap * y-overlap) / 250^2 - computed here with intervals, not polygons."""
    import pyogrio

    units = pyogrio.read_dataframe(hsy).to_crs("EPSG:3879")
    b = units.geometry.bounds.to_numpy()
    values = units["population"].to_numpy().astype(float)
    x0 = np.round(b[:, 0] / 250) * 250  # columns: multiples of 250 m (to 3e-5 m)
    off = float(np.median((b[:, 1] + 125) % 250 - 125))  # the rows' common offset
    assert abs(off) < 5 and np.allclose(b[:, 1] - off, np.round((b[:, 1] - off) / 250) * 250, atol=0.05)
    y0 = np.round((b[:, 1] - off) / 250) * 250 + off

    g = Grid("EPSG:3879", size)
    cells = g.cells_for_extent(*hsy_bounds, extent_crs="EPSG:4326")
    got = population_from_polygons(hsy, cells)
    cb = np.array([c.bounds for c in cells])
    ox = _overlap_1d(cb[:, None, 0], cb[:, None, 2], x0[None], x0[None] + 250)
    oy = _overlap_1d(cb[:, None, 1], cb[:, None, 3], y0[None], y0[None] + 250)
    expected = (ox * oy / 250 ** 2) @ values
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=0.05)
    # The most populated unit: all of it in its 250 m cell, a quarter in each of its 125 m cells.
    assert got.max() == pytest.approx(values.max() * (size / 250) ** 2, rel=0.01)
    assert got.sum() == pytest.approx(HSY_TOTAL, rel=1e-4)


def test_area_weighting_by_hand_on_a_synthetic_square():
    g = Grid("EPSG:32650", 256.0)
    # One unit of 300 x 300 m holding 900 persons, over x in [100, 400], y in [0, 300].
    unit = shapely.box(100, 0, 400, 300)
    cells = [g.cell(0, 0), g.cell(1, 0), g.cell(0, 1), g.cell(1, 1), g.cell(2, 0)]
    pop = area_weighted_sum(np.array([unit]), np.array([900.0]), cells)
    # Overlaps: (0,0) 156 x 256; (1,0) 144 x 256; (0,1) 156 x 44; (1,1) 144 x 44; (2,0) none.
    expected = 900.0 / 90_000 * np.array([156 * 256, 144 * 256, 156 * 44, 144 * 44, 0.0])
    np.testing.assert_allclose(pop, expected)
    assert pop.sum() == pytest.approx(900.0)


def test_population_raster_by_hand_and_in_another_crs(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    # 4 x 3 pixels of 100 m from (0, 300): values 1..12 persons per pixel.
    data = np.arange(1, 13, dtype=np.float32).reshape(1, 3, 4)
    path = tmp_path / "pop.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=3, count=1, dtype="float32",
                       crs="EPSG:32650", transform=from_origin(0, 300, 100, 100), nodata=-1) as dst:
        dst.write(data)
    g = Grid("EPSG:32650", 256.0)
    cells = [g.cell(0, 0), g.cell(1, 0), g.cell(0, 1), g.cell(5, 5)]
    pop = population_from_raster(path, cells)
    # Cell (0,0) = [0,256]^2: rows y in [200,300] (top row: 1..4) only 56 m inside; cols 0,1 full, col 2 56 m.
    wx = np.array([1, 1, 0.56, 0])
    wy = np.array([0.56, 1, 1])  # top row (y 200..300) is 56 % inside, the others fully
    assert pop[0] == pytest.approx(float(wy @ data[0] @ wx))
    assert np.isnan(pop[3])  # outside the raster: unknown, not zero
    # Tiny windows (one cell per tile) give the same values as one window for everything.
    np.testing.assert_allclose(population_from_raster(path, cells, max_window_px=1), pop)
    assert np.nansum(population_from_raster(path, Grid("EPSG:32650", 256.0).cells_for_extent(0, 0, 400, 300))) \
        == pytest.approx(data.sum())
    # The same raster as seen from a grid in another CRS keeps its total.
    g2 = Grid("EPSG:3857", 64.0)
    from pyproj import Transformer

    t = Transformer.from_crs("EPSG:32650", "EPSG:3857", always_xy=True)
    ext = t.transform_bounds(-10, -10, 410, 310)
    total = np.nansum(population_from_raster(path, g2.cells_for_extent(*ext)))
    assert total == pytest.approx(data.sum(), rel=1e-3)


def test_population_raster_nodata_is_ignored(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    data = np.array([[[5, -1], [-1, 7]]], dtype=np.float32)
    path = tmp_path / "nd.tif"
    with rasterio.open(path, "w", driver="GTiff", width=2, height=2, count=1, dtype="float32",
                       crs="EPSG:32650", transform=from_origin(0, 256, 128, 128), nodata=-1) as dst:
        dst.write(data)
    assert population_from_raster(path, [Grid("EPSG:32650", 256.0).cell(0, 0)])[0] == pytest.approx(12.0)


def test_urban_village_overlap_threshold(tmp_path):
    g = Grid("EPSG:32650", 100.0)
    cells = [g.cell(0, 0), g.cell(1, 0), g.cell(2, 0), g.cell(3, 0)]
    polys = [shapely.box(0, 0, 25, 100),      # cell 0: 25 % -> positive
             shapely.box(100, 0, 115, 100),   # cell 1: 15 % ...
             shapely.box(100, 0, 115, 50),    # ... overlapping itself: still 15 %, not 22.5 %
             shapely.box(200, 0, 220, 100)]   # cell 2: exactly 20 % -> negative ("more than 20 %")
    path = _write_polygons(tmp_path / "uv.gpkg", polys, "EPSG:32650", name=["a", "b", "c", "d"])
    labels, frac = urban_village_from_polygons(path, cells)
    np.testing.assert_allclose(frac, [0.25, 0.15, 0.20, 0.0])
    assert labels.tolist() == [1, 0, 0, 0]
    np.testing.assert_allclose(overlap_fraction(np.array([shapely.box(-50, -50, 450, 150)]), cells), 1.0)


def test_urban_village_in_lonlat_is_projected(tmp_path):
    from pyproj import Transformer

    g = Grid("EPSG:32650", 256.0)
    cell = g.cell(1800, 17500)
    xmin, ymin, xmax, ymax = cell.bounds
    t = Transformer.from_crs("EPSG:32650", "EPSG:4326", always_xy=True)
    half = shapely.box(xmin, ymin, xmin + 128, ymax)  # the west half of the cell, written in lon/lat
    half_ll = shapely.transform(shapely.segmentize(half, 8), t.transform, interleaved=False)
    path = _write_polygons(tmp_path / "uv_ll.gpkg", [half_ll], "EPSG:4326", name=["v"])
    labels, frac = urban_village_from_polygons(path, [cell])
    assert frac[0] == pytest.approx(0.5, abs=1e-3) and labels[0] == 1


def test_commercial_activeness_sums_reviews_per_cell():
    g = Grid("EPSG:32650", 256.0)
    cells = g.cells_for_extent(0, 0, 512, 256)
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 512, 200), rng.uniform(0, 256, 200)
    reviews = rng.integers(0, 50, 200).astype(float)
    reviews[::7] = np.nan  # missing counts count as 0
    cap = commercial_activeness(reviews, assign_to_cells(x, y, g, cells))
    west = x < 256
    assert cap.tolist() == [np.nansum(reviews[west]), np.nansum(reviews[~west])]
    empty = commercial_activeness(np.zeros(0), assign_to_cells(np.zeros(0), np.zeros(0), g, cells))
    assert empty.tolist() == [0.0, 0.0]


def test_bad_label_inputs(tmp_path, hsy):
    cells = [Grid("EPSG:32635").cell(1505, 26060)]
    with pytest.raises(InputError, match="no field 'residents'") as err:
        population_from_polygons(hsy, cells, value_field="residents")
    assert "'population'" in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        population_from_raster(tmp_path / "none.tif", cells)
    pts = tmp_path / "pts.gpkg"
    _write_polygons(pts, [shapely.Point(0, 0)], "EPSG:32635", population=[3])
    with pytest.raises(InputError, match="non-polygon"):
        population_from_polygons(pts, cells)
    with pytest.raises(InputError, match="several grids"):
        population_from_polygons(hsy, cells + [Grid("EPSG:32634").cell(0, 0)])
