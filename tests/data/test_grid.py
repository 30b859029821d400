"""The region grid: snapped cells, stable ids, auto-UTM and bad extents (paper 5.1.1)."""
import math

import numpy as np
import pytest

from refound_core.data.grid import Grid, utm_crs_for_lonlat
from refound_core.errors import InputError


def test_cell_ids_and_bounds_do_not_depend_on_the_extent():
    g = Grid("EPSG:32650", 256.0)
    a = {c.id: c for c in g.cells_for_extent(400_000, 2_500_000, 401_000, 2_501_000)}
    b = {c.id: c for c in g.cells_for_extent(400_300, 2_500_300, 402_000, 2_502_000)}
    shared = set(a) & set(b)
    assert shared, "overlapping extents must share cells"
    for cid in shared:
        assert a[cid] == b[cid]
    cell = a[sorted(shared)[0]]
    # Snapped to the CRS origin: bounds are exact multiples of the cell size.
    assert all(v % 256.0 == 0 for v in cell.bounds)
    assert cell.bounds == (cell.col * 256.0, cell.row * 256.0, (cell.col + 1) * 256.0, (cell.row + 1) * 256.0)
    assert cell.id == f"EPSG:32650/256/{cell.col}_{cell.row}"
    assert g.cell_from_id(cell.id) == cell


def test_cells_cover_the_extent_exactly_once():
    g = Grid("EPSG:32650", 256.0)
    ext = (400_100.5, 2_500_050.0, 401_333.0, 2_501_000.0)
    cells = g.cells_for_extent(*ext)
    cols = sorted({c.col for c in cells})
    rows = sorted({c.row for c in cells})
    assert len(cells) == len(cols) * len(rows) == len({c.id for c in cells})
    assert cols == list(range(math.floor(ext[0] / 256), math.ceil(ext[2] / 256)))
    assert rows == list(range(math.floor(ext[1] / 256), math.ceil(ext[3] / 256)))
    # Edges exactly on cell borders add no sliver cells.
    assert len(g.cells_for_extent(0, 0, 512, 512)) == 4
    # North-west first, row by row.
    assert cells[0].row == max(rows) and cells[0].col == min(cols)


def test_point_to_cell_floor_division_including_negative_coordinates():
    g = Grid("EPSG:3857", 100.0)
    col, row = g.cell_indices([-0.5, 0.0, 99.999, 100.0, -250.0], [0.0, -0.1, 50.0, 100.0, -100.0])
    assert col.tolist() == [-1, 0, 0, 1, -3]
    assert row.tolist() == [0, -1, 0, 1, -1]
    assert g.cell(-1, -1).id == "EPSG:3857/100/-1_-1"


@pytest.mark.parametrize("lon,lat", [(24.94, 60.17), (151.2, -33.9), (-74.0, 40.7), (116.4, 39.9), (3.0, 0.5)])
def test_geographic_extent_gets_the_utm_zone_of_its_centre(lon, lat):
    import pyproj
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    ext = (lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01)
    g = Grid.for_extent(ext, "EPSG:4326")
    infos = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat))
    assert g.crs in {f"{i.auth_name}:{i.code}" for i in infos}
    assert g.crs == utm_crs_for_lonlat(lon, lat)
    assert pyproj.CRS(g.crs).utm_zone.endswith("N" if lat >= 0 else "S")
    # The grid covers the geographic extent once it is projected.
    cells = g.cells_for_extent(*ext, extent_crs="EPSG:4326")
    t = pyproj.Transformer.from_crs("EPSG:4326", g.crs, always_xy=True)
    x, y = t.transform([ext[0], ext[2], ext[0], ext[2]], [ext[1], ext[1], ext[3], ext[3]])
    xs = [c.bounds[0] for c in cells] + [c.bounds[2] for c in cells]
    ys = [c.bounds[1] for c in cells] + [c.bounds[3] for c in cells]
    assert min(xs) <= min(x) and max(xs) >= max(x) and min(ys) <= min(y) and max(ys) >= max(y)


def test_metric_extent_keeps_its_own_crs():
    g = Grid.for_extent((385_000, 6_671_000, 386_000, 6_672_000), "EPSG:32635", cell_size=128)
    assert g.crs == "EPSG:32635" and g.cell_size == 128.0
    assert g.cell(3, 4).id == "EPSG:32635/128/3_4"


def test_lonlat_extent_without_crs_is_refused():
    with pytest.raises(InputError, match="EPSG:4326"):
        Grid.for_extent((24.9, 60.1, 25.0, 60.2), None)
    with pytest.raises(InputError, match="no CRS"):
        Grid.for_extent((385_000, 6_671_000, 386_000, 6_672_000), None)
    with pytest.raises(InputError, match="longitude/latitude"):
        Grid("EPSG:32635").cells_for_extent(24.9, 60.1, 25.0, 60.2)


@pytest.mark.parametrize("ext,message", [
    ((10, 10, 10, 20), "empty"),
    ((10, 20, 30, 20), "empty"),
    ((30, 10, 10, 20), "inverted"),
    ((10, 20, 30, 10), "inverted"),
    ((10, float("nan"), 30, 40), "non-finite"),
])
def test_bad_extents(ext, message):
    with pytest.raises(InputError, match=message):
        Grid("EPSG:32650").cells_for_extent(*ext)


def test_antimeridian_crossing_extent_is_explained():
    with pytest.raises(InputError, match="antimeridian"):
        Grid.for_extent((179.5, -17.0, -179.5, -16.0), "EPSG:4326")
    with pytest.raises(InputError, match="antimeridian"):
        Grid("EPSG:32601").cells_for_extent(179.5, -17.0, -179.5, -16.0, extent_crs="EPSG:4326")


def test_unknown_and_unsuitable_crs():
    with pytest.raises(InputError, match="not a known CRS"):
        Grid("EPSG:999999")
    with pytest.raises(InputError, match="not a known CRS"):
        Grid.for_extent((0, 0, 1, 1), "not-a-crs")
    with pytest.raises(InputError, match="not projected"):
        Grid("EPSG:4326")
    with pytest.raises(InputError, match="positive"):
        Grid("EPSG:32650", cell_size=0)


def test_too_large_extent_estimates_the_cell_count():
    g = Grid("EPSG:32650", 256.0, max_cells=10_000)
    with pytest.raises(InputError) as err:
        g.cells_for_extent(0, 0, 100_000, 100_000)
    n = math.ceil(100_000 / 256) ** 2
    assert f"{n:,}" in str(err.value) and "10,000" in str(err.value)
    # A continent in lon/lat is refused the same way before any cell is built.
    with pytest.raises(InputError, match="too large"):
        Grid.for_extent((70.0, 15.0, 135.0, 55.0), "EPSG:4326")


def test_iter_cells_streams():
    g = Grid("EPSG:32650", 256.0)
    it = g.iter_cells(0, 0, 2560, 2560)
    first = next(it)
    assert first.id == "EPSG:32650/256/0_9"
    assert 1 + sum(1 for _ in it) == 100
    assert np.all(np.diff([c.col for c in g.cells_for_extent(0, 0, 2560, 256)]) == 1)


def test_projected_extent_without_epsg_or_metres_falls_back_to_utm():
    # New York State Plane in US feet: a grid needs metres, so the centre's UTM zone (18N) is used.
    g = Grid.for_extent((980_000, 190_000, 990_000, 200_000), "EPSG:2263")
    assert g.crs == "EPSG:32618"
    with pytest.raises(InputError, match="metres"):
        Grid("EPSG:2263")
    # A custom transverse Mercator without an EPSG code, centred on 117 E (Beijing): UTM 50N.
    custom = "+proj=tmerc +lon_0=117 +k=1 +x_0=500000 +y_0=0 +datum=WGS84 +units=m +no_defs"
    g = Grid.for_extent((440_000, 4_410_000, 450_000, 4_420_000), custom)
    assert g.crs == "EPSG:32650"
    assert len(g.cells_for_extent(440_000, 4_410_000, 450_000, 4_420_000, extent_crs=custom)) > 1500


@pytest.mark.parametrize("block_cells, sizes", [(12, [10, 10, 10, 5]), (3, [3, 2] * 7), (100, [35])])
def test_blocks_partition_the_cells_in_order(block_cells, sizes):
    """The pipeline's blocks (every entry point: CLI, dock, Processing) are rectangles that,
    read one after another, give every cell once in the north-west, row-by-row order."""
    from refound_core.data.grid import CellGrid

    grid = CellGrid("EPSG:32650", 256.0)
    ranges = (10, 15, -3, 4)  # 5 columns x 7 rows
    blocks = list(grid.blocks(ranges, block_cells))
    cells = [list(grid.cells_of_ranges(b)) for b in blocks]
    assert [len(c) for c in cells] == sizes
    assert [c.id for b in cells for c in b] == [c.id for c in grid.cells_of_ranges(ranges)]
    for b, got in zip(blocks, cells):
        x0, y0, x1, y1 = grid.bounds_of_ranges(b)
        assert all(x0 <= c.bounds[0] and c.bounds[2] <= x1 and y0 <= c.bounds[1] and c.bounds[3] <= y1 for c in got)
