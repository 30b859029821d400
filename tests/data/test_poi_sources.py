"""POI readers (vector files, OSM) and the vectorised POI -> cell join."""
import time

import numpy as np
import pytest

from refound_core.data.grid import Grid
from refound_core.data.poi_sources import (CellAssignment, assign_to_cells, parse_other_tags, read_osm_pois,
                                           read_pois, read_vector_pois)
from refound_core.errors import InputError

NAMES = ["Café Ääni ☕", "北京烤鸭店 🦆", "", "naïve — “quoted”", "👩‍🍳🍜"]


def _write_points(path, names, categories, xs, ys, crs="EPSG:4326", extra=None, **kw):
    import geopandas as gpd
    import shapely

    data = {"name": names, "category": categories, **(extra or {})}
    gdf = gpd.GeoDataFrame(data, geometry=shapely.points(xs, ys), crs=crs)
    gdf.to_file(path, engine="pyogrio", **kw)
    return path


@pytest.fixture(scope="module")
def helsinki(shared_dir):
    return read_osm_pois(shared_dir / "data" / "helsinki" / "Helsinki.osm.pbf")


def test_helsinki_osm_pois(helsinki):
    # shared/data/README.md: about 1,711 POIs, 1,178 named (amenity / shop / tourism, nodes and areas).
    assert 1_600 <= len(helsinki) <= 1_800
    assert 1_100 <= int((helsinki.names != "").sum()) <= 1_250
    assert set(helsinki.categories) >= {"amenity=restaurant", "amenity=cafe", "shop=clothes", "amenity=bench"}
    assert all(c.split("=")[0] in ("amenity", "shop", "tourism", "leisure") for c in helsinki.categories)
    assert helsinki.crs == "EPSG:4326"
    assert 24.93 <= helsinki.x.min() and helsinki.x.max() <= 24.96
    assert 60.16 <= helsinki.y.min() and helsinki.y.max() <= 60.18


def test_helsinki_reprojected_and_joined(helsinki):
    g = Grid.for_extent(helsinki.bounds(), "EPSG:4326")
    assert g.crs == "EPSG:32635"
    pois = helsinki.to_crs(g.crs)
    assert pois.x.min() > 380_000 and pois.y.min() > 6_670_000  # UTM 35N metres, not degrees
    cells = g.cells_for_extent(*helsinki.bounds(), extent_crs="EPSG:4326")
    a = assign_to_cells(pois.x, pois.y, g, cells)
    assert a.outside == 0 and int(a.counts().sum()) == len(pois)
    for i, cell in enumerate(cells):
        xmin, ymin, xmax, ymax = cell.bounds
        idx = a.indices(i)
        assert np.all((pois.x[idx] >= xmin) & (pois.x[idx] < xmax) & (pois.y[idx] >= ymin) & (pois.y[idx] < ymax))


def test_join_matches_brute_force_and_edges_go_east_north():
    rng = np.random.default_rng(7)
    g = Grid("EPSG:32650", 100.0)
    cells = g.cells_for_extent(1000, 1000, 1500, 1400)
    x = rng.uniform(900, 1600, 5000)
    y = rng.uniform(900, 1500, 5000)
    x[:3], y[:3] = [1100.0, 1200.0, 1500.0], [1100.0, 1250.0, 1399.0]  # on cell edges / the outer edge
    a = assign_to_cells(x, y, g, cells)
    seen = np.zeros(x.size, int)
    for i, c in enumerate(cells):
        inside = np.flatnonzero((x >= c.bounds[0]) & (x < c.bounds[2]) & (y >= c.bounds[1]) & (y < c.bounds[3]))
        assert sorted(a.indices(i).tolist()) == inside.tolist()
        seen[inside] += 1
    assert seen.max() == 1 and a.outside == int((seen == 0).sum())
    assert a.indices(cells.index(g.cell(11, 11))).tolist().count(0) == 1  # (1100, 1100) -> cell (11, 11)
    assert 2 not in a.order  # x = 1500 is the extent's east edge: outside


def test_hundred_thousand_pois_in_one_cell_and_empty_cells():
    g = Grid("EPSG:32650", 256.0)
    cells = g.cells_for_extent(0, 0, 768, 768)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(256, 512, 100_000), rng.uniform(256, 512, 100_000)
    t = time.perf_counter()
    a = assign_to_cells(x, y, g, cells)
    assert time.perf_counter() - t < 1.0
    counts = a.counts()
    assert counts[cells.index(g.cell(1, 1))] == 100_000 and counts.sum() == 100_000
    assert isinstance(assign_to_cells(np.zeros(0), np.zeros(0), g, cells), CellAssignment)
    assert assign_to_cells(np.zeros(0), np.zeros(0), g, cells).counts().tolist() == [0] * 9


def test_unicode_names_survive_gpkg_geojson(tmp_path):
    xs, ys = np.linspace(24.94, 24.95, 5), np.linspace(60.17, 60.175, 5)
    cats = ["cafe", "restaurant", "shop", "bar", "restaurant"]
    for name in ("p.gpkg", "p.geojson"):
        path = _write_points(tmp_path / name, NAMES, cats, xs, ys, extra={"reviews": [3, 0, None, 12, 7]})
        t = read_vector_pois(path, value_fields=("reviews",))
        assert t.names.tolist() == NAMES
        assert t.categories.tolist() == cats
        np.testing.assert_allclose(t.x, xs)
        np.testing.assert_array_equal(t.values["reviews"], [3, 0, np.nan, 12, 7])


def test_non_utf8_shapefile_is_decoded(tmp_path):
    names = ["Café Ääni", "Smörgås", "Ñandú"]
    path = _write_points(tmp_path / "latin.shp", names, ["a", "b", "c"], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0],
                         encoding="cp1252")
    raw = (tmp_path / "latin.dbf").read_bytes()
    assert "Café".encode("cp1252") in raw and "Café".encode("utf-8") not in raw  # really not UTF-8 on disk
    assert read_vector_pois(path).names.tolist() == names
    (tmp_path / "latin.cpg").unlink()  # no declared encoding: the caller says which one
    assert read_vector_pois(path, encoding="cp1252").names.tolist() == names


def test_missing_field_lists_the_available_ones(tmp_path):
    path = _write_points(tmp_path / "p.gpkg", ["a"], ["b"], [1.0], [2.0])
    with pytest.raises(InputError) as err:
        read_pois(path, name_field="title")
    msg = str(err.value)
    assert "title" in msg and "'name'" in msg and "'category'" in msg and "--name-field" in msg
    with pytest.raises(InputError, match="--category-field"):
        read_pois(path, category_field="type")
    with pytest.raises(InputError, match="--value-field"):
        read_pois(path, value_fields=("reviews",))
    with pytest.raises(InputError, match="not numeric"):
        read_pois(path, value_fields=("category",))


@pytest.mark.filterwarnings("ignore:.crs. was not provided")
def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_pois(tmp_path / "nope.gpkg")
    (tmp_path / "junk.gpkg").write_bytes(b"not a geopackage")
    with pytest.raises(InputError, match="cannot be read"):
        read_pois(tmp_path / "junk.gpkg")
    path = _write_points(tmp_path / "nocrs.shp", ["a"], ["b"], [1.0], [2.0], crs=None)  # no .prj
    with pytest.raises(InputError, match="no CRS"):
        read_pois(path)
    assert read_pois(path, crs="EPSG:32650").crs == "EPSG:32650"


def test_layer_without_pois_is_valid(tmp_path):
    path = _write_points(tmp_path / "empty.gpkg", [], [], np.zeros(0), np.zeros(0))
    t = read_pois(path)
    assert len(t) == 0 and t.bounds() is None and len(t.to_crs("EPSG:32635")) == 0


def test_other_tags_hstore_parsing():
    tags = parse_other_tags('"amenity"=>"cafe","name:fi"=>"Kahvila \\"Ääni\\"","shop"=>"a=>b"')
    assert tags == {"amenity": "cafe", "name:fi": 'Kahvila "Ääni"', "shop": "a=>b"}
    assert parse_other_tags(None) == {}
