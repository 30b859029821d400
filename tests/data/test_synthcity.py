"""The seeded synthetic city (refound_core.data.synthcity, `refound synthcity`).

Small cities (1-2 km) keep this file fast; the 8 km timing is measured by hand (docs/SYNTHCITY.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sqlite3

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")

from refound_core.data import synthcity  # noqa: E402
from refound_core.data.synthcity import generate_city, make_layout  # noqa: E402
from refound_core.data.synthcity.labels import building_persons  # noqa: E402
from refound_core.errors import InputError  # noqa: E402

SEED2 = 11
CJK = re.compile(r"[\u4e00-\u9fff]")


def _cli(argv):
    """Parse and run `refound synthcity ...` the way training/cli.py does for this subcommand."""
    from training.commands import synthcity as cmd

    parser = argparse.ArgumentParser(prog="refound")
    sub = parser.add_subparsers(dest="command")
    cmd.add_arguments(sub.add_parser("synthcity"))
    args = parser.parse_args(["synthcity", *argv])
    return cmd.run(args)


@pytest.fixture(scope="module")
def city2(tmp_path_factory):
    """A 2 km city made through the CLI (`--size-km 2`)."""
    out = tmp_path_factory.mktemp("city2")
    assert _cli(["--out", str(out), "--seed", str(SEED2), "--size-km", "2", "--quiet"]) == 0
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    pois = pyogrio.read_dataframe(out / "pois.gpkg", layer="pois")
    districts = pyogrio.read_dataframe(out / "districts.gpkg")
    with rasterio.open(out / "imagery.tif") as src:
        img = src.read()
        transform = src.transform
    return {"dir": out, "meta": meta, "pois": pois, "districts": districts, "img": img,
            "transform": transform, "layout": make_layout(SEED2, 2)}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pix(city, x, y):
    """CRS coordinates -> (col, row) pixel indices of the 1 m image."""
    t = city["transform"]
    return np.floor((np.asarray(x) - t.c) / t.a).astype(int), np.floor((np.asarray(y) - t.f) / t.e).astype(int)


# ---------------------------------------------------------------------------------------------
def test_outputs_exist_with_right_crs_resolution_and_dtypes(city2):
    out, meta = city2["dir"], city2["meta"]
    for name in synthcity.OUTPUT_FILES:
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if "partial" in p.name]  # temp files moved away
    with rasterio.open(out / "imagery.tif") as src:
        assert src.crs.to_epsg() == 32650
        assert src.res == (1.0, 1.0)
        assert (src.width, src.height, src.count) == (2000, 2000, 3)
        assert src.dtypes == ("uint8",) * 3
        assert src.block_shapes[0] == (256, 256)
        assert src.compression.name.lower() == "deflate"
        assert src.transform.c % 256 == 0 and src.transform.f % 256 == 0
        assert (src.transform.c, src.transform.f) == (meta["origin_x"], meta["origin_y"])
        img_bounds = src.bounds
    with rasterio.open(out / "population.tif") as src:
        assert src.crs.to_epsg() == 32650
        assert src.res == (100.0, 100.0)
        assert src.dtypes == ("float32",)
        assert (src.transform.c, src.transform.f) == (meta["origin_x"], meta["origin_y"])
        assert src.shape == (20, 20)
        pop = src.read(1)
    assert pop.min() >= 0 and pop.sum() > 0
    assert abs(float(pop.sum(dtype=np.float64)) - meta["counts"]["population"]) < 1.0
    info = pyogrio.read_info(out / "pois.gpkg", layer="pois")
    assert info["geometry_type"] == "Point" and pyogrio.list_layers(out / "pois.gpkg")[0][0] == "pois"
    fields = dict(zip(info["fields"], info["dtypes"]))
    assert fields["name"] == "object" and fields["category"] == "object"
    assert np.issubdtype(np.dtype(fields["reviews"]), np.integer)
    with sqlite3.connect(out / "pois.gpkg") as con:  # GeoPackage 1.2 (QGIS 3.22 warns on 1.4)
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200
    uv = pyogrio.read_dataframe(out / "urban_villages.gpkg")
    assert len(uv) == meta["counts"]["urban_villages"] > 0
    assert set(uv.geom_type) == {"Polygon"} and uv.crs.to_epsg() == 32650
    d = city2["districts"]
    assert set(d["kind"]) <= set(synthcity.KINDS) and len(d) == meta["counts"]["districts"]
    x0, y0, x1, y1 = d.total_bounds
    assert img_bounds.left <= x0 and x1 <= img_bounds.right and img_bounds.bottom <= y0 and y1 <= img_bounds.top
    assert meta["seed"] == SEED2 and meta["size_km"] == 2 and meta["crs"] == "EPSG:32650"
    assert meta["language"] == "en" and "CC0" in meta["licence"] and meta["generator_version"]
    assert sum(meta["district_counts"].values()) == len(d)
    assert 30 <= len(meta["poi_categories"]) <= 60
    assert len(set(city2["pois"]["category"])) >= 30


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    a = generate_city(tmp_path / "a", seed=5, size_km=1)
    b = generate_city(tmp_path / "b", seed=5, size_km=1)
    c = generate_city(tmp_path / "c", seed=6, size_km=1)
    assert a["counts"] == b["counts"]
    for name in synthcity.OUTPUT_FILES:
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name), name
    for name in ("imagery.tif", "pois.gpkg", "population.tif", "districts.gpkg"):
        assert _sha(tmp_path / "a" / name) != _sha(tmp_path / "c" / name), name


def _district_windows(city, kind, side=200):
    """For each district of ``kind``: (POIs per 256 m x 256 m, mean length of constant runs
    between strong luminance edges along rows) in a central window of the district."""
    img = city["img"].astype(np.float32)
    lum = 0.3 * img[0] + 0.59 * img[1] + 0.11 * img[2]
    px, py = _pix(city, city["pois"].geometry.x.values, city["pois"].geometry.y.values)
    out = []
    for geom in city["districts"][city["districts"]["kind"] == kind].geometry:
        (c0, c1), (r1, r0) = _pix(city, [geom.bounds[0], geom.bounds[2]], [geom.bounds[1], geom.bounds[3]])
        s = min(side, c1 - c0, r1 - r0)
        cc, rc = (c0 + c1) // 2, (r0 + r1) // 2
        wc0, wr0 = cc - s // 2, rc - s // 2
        inside = (px >= wc0) & (px < wc0 + s) & (py >= wr0) & (py < wr0 + s)
        density = inside.sum() / (s * s) * 256 * 256
        win = lum[wr0:wr0 + s, wc0:wc0 + s]
        edges = np.abs(np.diff(win, axis=1)) > 25
        run = win.shape[1] / (edges.sum(axis=1).mean() + 1)
        out.append((density, run))
    return np.array(out)


def test_urban_villages_have_denser_pois_and_smaller_roofs_than_modern_residential(city2):
    uv = _district_windows(city2, "urban_village")
    res = _district_windows(city2, "residential")
    assert len(uv) and len(res)
    assert uv[:, 0].mean() >= 100  # hundreds of POIs per region
    assert uv[:, 0].mean() > 3 * res[:, 0].mean()
    assert uv[:, 1].mean() < 0.6 * res[:, 1].mean()  # many more roof edges per metre
    ind = _district_windows(city2, "industrial")
    park = _district_windows(city2, "park")
    cbd = _district_windows(city2, "cbd")
    assert cbd[:, 0].mean() > res[:, 0].mean() > ind[:, 0].mean() > park[:, 0].mean()
    assert park[:, 0].mean() < 5


def test_old_towns_look_like_villages_but_are_not_labelled_and_differ_in_pois(city2):
    d = city2["districts"]
    old = d[d["kind"] == "old_town"]
    assert len(old) >= 1
    uv = pyogrio.read_dataframe(city2["dir"] / "urban_villages.gpkg")
    assert shapely.intersection(shapely.union_all(uv.geometry.values), shapely.union_all(old.geometry.values)).area == 0
    # from above: old towns are much closer to villages than to modern housing (roof edge runs)
    run = {k: _district_windows(city2, k)[:, 1].mean() for k in ("old_town", "urban_village", "residential")}
    assert abs(run["old_town"] - run["urban_village"]) < 0.5 * abs(run["residential"] - run["urban_village"])
    # but the POI mix differs: tourism and heritage vs rentals and repair shops
    pois = city2["pois"]
    tourism = {"souvenir_shop", "boutique", "art_gallery", "museum", "temple", "heritage_site", "guesthouse",
               "hostel", "tea_house"}

    def mix(polys):
        inside = shapely.contains_xy(shapely.union_all(polys), pois.geometry.x.values, pois.geometry.y.values)
        cats = pois["category"].values[inside]
        return np.isin(cats, list(tourism)).mean(), (cats == "rental_apartment").mean()

    old_t, old_r = mix(old.geometry.values)
    uv_t, uv_r = mix(uv.geometry.values)
    assert old_t > 0.3 and uv_t < 0.15
    assert uv_r > 0.1 and old_r < 0.05


def test_population_follows_residential_building_volume(city2):
    lay = city2["layout"]
    with rasterio.open(city2["dir"] / "population.tif") as src:
        pop = src.read(1).astype(np.float64)
    b = lay.buildings
    cx, cy = (b["x0"] + b["x1"]) / 2.0, (b["y0"] + b["y1"]) / 2.0
    idx = (cy // 100).astype(int) * pop.shape[1] + (cx // 100).astype(int)

    def binned(v):
        return np.bincount(idx, weights=v, minlength=pop.size).reshape(pop.shape)

    res_vol = binned(lay.building_volume(residential_only=True))
    all_vol = binned(lay.building_volume())
    assert np.corrcoef(pop.ravel(), res_vol.ravel())[0, 1] > 0.7
    assert np.corrcoef(pop.ravel(), all_vol.ravel())[0, 1] > 0.3
    # nobody lives where no one could (a little spills over from footprints that straddle pixels)
    assert pop[res_vol == 0].sum() < 0.05 * pop.sum()
    # village housing is more crowded than modern housing: more residents per cubic metre
    kind = lay.districts["kind"][b["district"]]
    per_kind = {k: binned(lay.building_volume(residential_only=True) * (kind == synthcity.KINDS.index(k)))
                for k in ("urban_village", "residential")}
    uv_px = per_kind["urban_village"] > 0.9 * res_vol
    res_px = (per_kind["residential"] > 0.9 * res_vol) & (res_vol > 0)
    assert uv_px.sum() >= 3 and res_px.sum() >= 3
    assert pop[uv_px].sum() / res_vol[uv_px].sum() > 1.3 * pop[res_px].sum() / res_vol[res_px].sum()


def test_rental_pois_raise_urban_village_population():
    lay = make_layout(3, 1)
    nb = len(lay.buildings["x0"])
    none = building_persons(np.random.default_rng(0), lay, np.zeros(nb, int))
    two = building_persons(np.random.default_rng(0), lay, np.full(nb, 2))
    kind = lay.districts["kind"][lay.buildings["district"]]
    uv = kind == synthcity.KINDS.index("urban_village")
    res = lay.buildings["use"] == 0
    assert (uv & res).any() and (~uv & res).any()
    np.testing.assert_allclose(two[uv], 2.0 * none[uv])
    np.testing.assert_allclose(two[~uv], none[~uv])


def test_pois_lie_in_the_raster_off_roads_in_their_district(city2):
    pois, lay = city2["pois"], city2["layout"]
    col, row = _pix(city2, pois.geometry.x.values, pois.geometry.y.values)
    n = lay.size_px
    assert ((col >= 0) & (col < n) & (row >= 0) & (row < n)).all()
    roads = lay.road_mask()
    assert 1.0 - roads[row, col].mean() > 0.9
    union = shapely.union_all(city2["districts"].geometry.values)
    assert shapely.contains_xy(union, pois.geometry.x.values, pois.geometry.y.values).mean() > 0.97
    # on roofs: most POIs stand on a building footprint of the layout
    b = lay.buildings
    foot = np.zeros((n, n), bool)
    for x0, y0, x1, y1 in zip(b["x0"].tolist(), b["y0"].tolist(), b["x1"].tolist(), b["y1"].tolist()):
        foot[y0:y1, x0:x1] = True
    assert foot[row, col].mean() > 0.85
    # factories only where industry is
    d = city2["districts"]
    ind = shapely.union_all(d[d["kind"] == "industrial"].geometry.values)
    fac = pois[pois["category"] == "factory"]
    assert len(fac) and shapely.contains_xy(ind, fac.geometry.x.values, fac.geometry.y.values).all()


def test_reviews_depend_on_category_and_centrality(city2):
    pois, meta = city2["pois"], city2["meta"]
    rev = pois["reviews"].values
    cat = pois["category"].values
    assert rev.min() >= 0
    assert np.median(rev[cat == "restaurant"]) > 5 * max(1.0, np.median(rev[cat == "rental_apartment"]))
    cx, cy = meta["cbd_center"]
    dist = np.hypot(pois.geometry.x.values - cx, pois.geometry.y.values - cy)
    food = np.isin(cat, ["restaurant", "noodle_shop", "street_food", "fast_food", "cafe", "convenience_store"])
    near, far = food & (dist < 600), food & (dist > 1000)
    assert near.sum() > 30 and far.sum() > 30
    base = {c: i for i, c in enumerate(["restaurant", "noodle_shop", "street_food", "fast_food", "cafe",
                                        "convenience_store"])}
    # compare like with like: mean reviews per category, near vs far, averaged over categories
    ratios = [rev[near & (cat == c)].mean() / rev[far & (cat == c)].mean() for c in base
              if (near & (cat == c)).sum() > 5 and (far & (cat == c)).sum() > 5]
    assert ratios and np.mean(ratios) > 1.2


def _lone_buildings(heights, sun_deg, n=512):
    """A layout with no districts (bare ground, no trees) and one building per height."""
    from refound_core.data.synthcity.layout import Layout

    k = len(heights)

    def i32(v):
        return np.asarray(v, np.int32)

    def none(*fields, dtype=np.int32):
        return {f: np.zeros(0, dtype) for f in fields}

    rect = ("x0", "y0", "x1", "y1")
    xs = 60 + 120 * np.arange(k)
    buildings = {"x0": i32(xs), "y0": i32([400] * k), "x1": i32(xs + 30), "y1": i32([430] * k),
                 "height": np.asarray(heights, np.float32), "use": np.zeros(k, np.int8),
                 "district": np.zeros(k, np.int32), "roof": np.full((k, 3), 200, np.uint8),
                 "pitched": np.zeros(k, bool)}
    return Layout(size_px=n, sun_elevation_deg=sun_deg, cbd_xy=(0.0, 0.0),
                  districts={**none(*rect), **none("kind", dtype=np.int8), "dist_cbd": np.zeros(0)},
                  roads={**none(*rect, "district"), **none("cls", dtype=np.int8)},
                  buildings=buildings,
                  pads={**none(*rect, "district"), **none("type", dtype=np.int8)},
                  lakes={**none("cx", "cy", "rx", "ry", dtype=np.float32), **none("district")})


def test_shadow_length_reveals_building_height_across_strips():
    from refound_core.data.synthcity.render import Renderer

    heights, sun = [40.0, 80.0, 160.0], 40.0
    lay = _lone_buildings(heights, sun)
    img = np.zeros((lay.size_px, lay.size_px, 3), np.uint8)
    for r0, r1, strip in Renderer(lay, np.random.default_rng(0)).strips():
        img[r0:r1] = strip
    lum = img.astype(np.float32).mean(axis=2)
    ground = np.median(lum[450:])
    for i, h in enumerate(heights):
        col = lum[:400, int(lay.buildings["x0"][i]) + 15]
        dark = col < 0.75 * ground
        length = 0
        while length < 400 and dark[399 - length]:
            length += 1
        # h / tan(elevation) metres north of the wall; 160 m crosses the strip seam at row 256
        assert abs(length - h / lay.shadow_slope) <= 3, (h, length)


def test_chinese_mode_gives_cjk_names_and_english_mode_ascii(tmp_path, city2):
    generate_city(tmp_path, seed=2, size_km=1, language="zh")
    zh = pyogrio.read_dataframe(tmp_path / "pois.gpkg", layer="pois")
    assert len(zh) > 100
    assert np.mean([bool(CJK.search(s)) for s in zh["name"]]) > 0.99
    assert all(CJK.search(s) for s in pyogrio.read_dataframe(tmp_path / "districts.gpkg")["name"])
    en = city2["pois"]["name"]
    assert all(s.isascii() and s.strip() for s in en)
    # names carry the category: most rentals say so in their name
    rent = zh[zh["category"] == "rental_apartment"]["name"]
    assert len(rent) and np.mean([bool(re.search("公寓|出租|租房", s)) for s in rent]) > 0.9


def test_bad_inputs_raise_actionable_errors(tmp_path):
    with pytest.raises(InputError, match="projected"):
        generate_city(tmp_path, seed=1, size_km=1, crs="EPSG:4326")
    with pytest.raises(InputError, match="size_km"):
        generate_city(tmp_path, seed=1, size_km=0)
    with pytest.raises(InputError, match="language"):
        generate_city(tmp_path, seed=1, size_km=1, language="fr")
    with pytest.raises(InputError, match="seed"):
        generate_city(tmp_path, seed=-1, size_km=1)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="folder"):
        generate_city(f, seed=1, size_km=1)


def test_cli_registration_points_at_this_command():
    from training.cli import COMMANDS

    assert COMMANDS["synthcity"][0] == "training.commands.synthcity"
