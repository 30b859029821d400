"""The region dataset folder (writer, reader) and `refound build-dataset` end to end."""
import json
import pickle
import time

import numpy as np
import pytest

from refound_core.data.dataset import FORMAT_VERSION, RegionDataset, RegionDatasetWriter
from refound_core.data.grid import Grid
from refound_core.data.sample import RegionSample
from refound_core.errors import InputError
from training.cli import main as cli_main

GRID = Grid("EPSG:32650", 256.0)
NAMES = ["Café Ääni ☕", "北京烤鸭店 🦆", "", "👩‍🍳🍜"]


def _sample(col, row, n_pois, rng, image_size=16, with_image=True, labels=None):
    cell = GRID.cell(col, row)
    x0, y0 = cell.bounds[:2]
    names = [NAMES[i % len(NAMES)] + str(i) for i in range(n_pois)]
    return RegionSample(
        cell_id=cell.id, bounds=cell.bounds, crs=cell.crs, poi_names=names,
        poi_categories=[f"amenity=c{i % 3}" for i in range(n_pois)],
        poi_xy=np.column_stack([x0 + rng.uniform(0, 256, n_pois), y0 + rng.uniform(0, 256, n_pois)]),
        image=rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) if with_image else None,
        image_coverage=0.75 if with_image else 0.0, labels=labels or {},
        poi_values={"reviews": rng.integers(0, 9, n_pois).astype(float)})


def _write(folder, samples, **kw):
    with RegionDatasetWriter(folder, crs="EPSG:32650", cell_size=256.0, image_size=16,
                             poi_value_fields=("reviews",), label_names=("population", "urban_village"),
                             provenance={"synthetic": True, "seed": 3}, **kw) as w:
        for s in samples:
            w.add(s)
    return folder


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    samples = [_sample(10, 20, 5, rng, labels={"population": 12.5, "urban_village": 1}),
               _sample(11, 20, 0, rng, labels={"population": 0.0}),            # zero POIs: valid
               _sample(12, 20, 3, rng, with_image=False)]                        # no image, no labels
    ds = RegionDataset(_write(tmp_path / "ds", samples))
    assert len(ds) == 3 and ds.crs == "EPSG:32650" and ds.cell_size == 256.0 and ds.image_size == 16
    for want, got in zip(samples, (ds[0], ds[1], ds[-1])):
        assert got.cell_id == want.cell_id and got.bounds == want.bounds and got.crs == want.crs
        assert got.poi_names == want.poi_names and got.poi_categories == want.poi_categories
        np.testing.assert_array_equal(got.poi_xy, want.poi_xy)
        np.testing.assert_array_equal(got.poi_values["reviews"], want.poi_values["reviews"])
        if want.image is None:
            assert got.image is None and got.image_coverage == 0.0 and not got.has_image
        else:
            assert np.array_equal(got.image, want.image) and got.image_coverage == 0.75
        assert got.labels == {k: float(v) for k, v in want.labels.items()}
    assert ds.labels["population"][2] != ds.labels["population"][2]  # NaN = unknown
    assert ds.images.shape == (3, 16, 16, 3) and ds.images.dtype == np.uint8
    assert ds.poi_count.tolist() == [5, 0, 3] and ds.index_of(samples[1].cell_id) == 1
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 1
    assert meta["crs"] == "EPSG:32650" and meta["cell_size"] == 256.0 and meta["image_size"] == 16
    assert meta["bounds"] == [10 * 256.0, 20 * 256.0, 13 * 256.0, 21 * 256.0]
    assert meta["provenance"] == {"synthetic": True, "seed": 3}
    assert ds.load_vocab().labels[2:] == ["amenity=c0", "amenity=c1", "amenity=c2"]
    tok = ds.load_tokenizer()
    assert {"北", "京", "烤", "鸭", "店"} <= set(tok.tokens)  # extended with the data's CJK characters
    with pytest.raises(IndexError):
        ds[3]


def test_hundred_thousand_pois_in_one_cell(tmp_path):
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    ds = RegionDataset(_write(tmp_path / "big", [_sample(0, 0, 100_000, rng), _sample(1, 0, 2, rng)],
                              flush_pois=30_000))
    s = ds[0]
    assert s.num_pois == 100_000 and s.poi_names[-1] == NAMES[99_999 % 4] + "99999"
    assert ds[1].num_pois == 2
    assert time.perf_counter() - t < 20


def test_writer_is_atomic(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(RuntimeError, match="boom"):
        with RegionDatasetWriter(tmp_path / "ds", crs="EPSG:32650", cell_size=256.0, image_size=16) as w:
            w.add(_sample(0, 0, 2, rng))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a temporary folder
    _write(tmp_path / "ds", [_sample(0, 0, 2, rng)])
    with pytest.raises(InputError, match="already exists"):
        RegionDatasetWriter(tmp_path / "ds", crs="EPSG:32650", cell_size=256.0, image_size=16)
    _write(tmp_path / "ds", [_sample(5, 5, 1, rng), _sample(6, 5, 1, rng)], overwrite=True)
    assert len(RegionDataset(tmp_path / "ds")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(ValueError, match="expected"):
        with RegionDatasetWriter(tmp_path / "bad", crs="EPSG:32650", cell_size=256.0, image_size=32) as w:
            w.add(_sample(0, 0, 1, rng))  # a 16 px image in a 32 px dataset
    assert not (tmp_path / "bad").exists()


def test_reader_refuses_other_folders(tmp_path):
    with pytest.raises(InputError, match="not a region dataset"):
        RegionDataset(tmp_path)
    _write(tmp_path / "ds", [_sample(0, 0, 1, np.random.default_rng(0))])
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    (tmp_path / "ds" / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(InputError, match="format_version 99"):
        RegionDataset(tmp_path / "ds")


def test_pickles_and_works_in_dataloader_workers(tmp_path):
    rng = np.random.default_rng(4)
    ds = RegionDataset(_write(tmp_path / "ds", [_sample(i, 0, i, rng) for i in range(6)]))
    first = ds[3]
    clone = pickle.loads(pickle.dumps(ds))  # no memory map travels
    assert clone._images is None and np.array_equal(clone[3].image, first.image)

    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=list)
    got = [s for batch in loader for s in batch]
    assert [s.cell_id for s in got] == ds.cell_ids
    assert [s.num_pois for s in got] == list(range(6))
    assert np.array_equal(got[3].image, first.image)


# ---------------------------------------------------------------- refound build-dataset
X0, Y0 = 1600 * 256.0, 9766 * 256.0  # south-west corner of the tiny city, on the grid


@pytest.fixture(scope="module")
def synthcity(tmp_path_factory):
    """A tiny synthetic city folder with the file names `refound synthcity` writes (3 x 2 cells)."""
    import geopandas as gpd
    import rasterio
    import shapely
    from rasterio.transform import from_origin

    d = tmp_path_factory.mktemp("city")
    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, (3, 512, 768), dtype=np.uint8)
    with rasterio.open(d / "imagery.tif", "w", driver="GTiff", width=768, height=512, count=3, dtype="uint8",
                       crs="EPSG:32650", transform=from_origin(X0, Y0 + 512, 1.0, 1.0), photometric="RGB") as dst:
        dst.write(img)
    pop = rng.uniform(0, 50, (1, 4, 6)).astype(np.float32)  # 128 m pixels: 2 x 2 per cell
    with rasterio.open(d / "population.tif", "w", driver="GTiff", width=6, height=4, count=1, dtype="float32",
                       crs="EPSG:32650", transform=from_origin(X0, Y0 + 512, 128.0, 128.0)) as dst:
        dst.write(pop)
    n = 80
    x, y = X0 + rng.uniform(0, 768, n), Y0 + rng.uniform(0, 512, n)
    names = [f"{NAMES[i % 4]} {i}" for i in range(n)]
    cats = [["restaurant", "cafe", "shop"][i % 3] for i in range(n)]
    reviews = rng.integers(0, 100, n)
    gpd.GeoDataFrame({"name": names, "category": cats, "reviews": reviews}, geometry=shapely.points(x, y),
                     crs="EPSG:32650").to_file(d / "pois.gpkg", engine="pyogrio")
    uv = [shapely.box(X0, Y0 + 256, X0 + 80, Y0 + 512),          # cell (0, top): 31 % -> 1
          shapely.box(X0 + 256, Y0, X0 + 256 + 40, Y0 + 256)]     # cell (1, bottom): 16 % -> 0
    gpd.GeoDataFrame({"name": ["uv1", "uv2"]}, geometry=uv, crs="EPSG:32650").to_file(
        d / "urban_villages.gpkg", engine="pyogrio")
    (d / "meta.json").write_text(json.dumps({"seed": 11, "size_km": 0.768, "crs": "EPSG:32650",
                                             "origin": [X0, Y0]}))
    return {"dir": d, "img": img, "pop": pop[0], "x": x, "y": y, "names": names, "reviews": reviews}


def test_build_from_synthcity(synthcity, tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli_main(["build-dataset", "--out", str(out), "--from-synthcity", str(synthcity["dir"]),
                     "--image-size", "256"]) == 0
    log = capsys.readouterr().out
    assert "6/6 cells (100%)" in log and "wrote" in log
    ds = RegionDataset(out)
    assert len(ds) == 6 and set(ds.label_names) == {"urban_village", "population", "commercial"}
    assert ds.meta["provenance"]["synthetic"] is True and ds.meta["provenance"]["seed"] == 11
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    img, pop, x, y = synthcity["img"], synthcity["pop"], synthcity["x"], synthcity["y"]
    for i in range(len(ds)):
        s = ds[i]
        c = GRID.cell_from_id(s.cell_id)
        cx, cy = c.col - 1600, c.row - 9766        # position in the city, row 0 = south
        r0 = (1 - cy) * 256                          # raster row of the cell's north edge
        assert s.image_coverage == 1.0
        assert np.array_equal(s.image, np.moveaxis(img[:, r0:r0 + 256, cx * 256:cx * 256 + 256], 0, -1))
        inside = (x >= c.bounds[0]) & (x < c.bounds[2]) & (y >= c.bounds[1]) & (y < c.bounds[3])
        assert sorted(s.poi_names) == sorted(np.array(synthcity["names"])[inside].tolist())
        assert s.labels["commercial"] == synthcity["reviews"][inside].sum()
        pr = (1 - cy) * 2
        assert s.labels["population"] == pytest.approx(pop[pr:pr + 2, cx * 2:cx * 2 + 2].sum(), rel=1e-5)
        want_uv = 1.0 if (cx, cy) == (0, 1) else 0.0
        assert s.labels["urban_village"] == want_uv
    assert ds.label_aux["urban_village_overlap"].max() == pytest.approx(80 / 256)
    assert set(ds.load_vocab().labels[2:]) == {"restaurant", "cafe", "shop"}


def test_build_from_files_with_extent_and_osm(shared_dir, tmp_path):
    osm = shared_dir / "data" / "helsinki" / "Helsinki.osm.pbf"
    hsy = shared_dir / "data" / "helsinki" / "helsinki_population_grid_2020.gpkg"
    out = tmp_path / "hel"
    assert cli_main(["build-dataset", "--out", str(out), "--pois", str(osm), "--population", str(hsy),
                     "--extent", "24.94,60.165,24.95,60.172,EPSG:4326", "--quiet"]) == 0
    ds = RegionDataset(out)
    assert ds.crs == "EPSG:32635" and ds.meta["provenance"]["synthetic"] is False
    assert ds.images.shape[1:] == (256, 256, 3) and (ds.image_coverage == 0).all()
    assert 300 < ds.poi_count.sum() < 1_748 and 0 < np.nansum(ds.labels["population"]) < 71_724


@pytest.mark.parametrize("extra,message", [
    (["--extent", "0,0,1000,1000"], "does not overlap imagery"),
    (["--extent", "113.9,22.5,114.0,22.6"], "looks like longitude/latitude"),
    (["--extent", "409600,2500096,409600,2500352"], "empty"),
    (["--extent", "409600,2500096,409900,2500352,EPSG:999999"], "not a known CRS"),
    (["--extent", "1,2,3"], "XMIN,YMIN,XMAX,YMAX"),
    (["--name-field", "title"], "fields are"),
    (["--bands", "1,2,9"], "between 1 and 3"),
])
def test_build_bad_inputs_exit_2_with_one_line(synthcity, tmp_path, capsys, extra, message):
    d = synthcity["dir"]
    rc = cli_main(["build-dataset", "--out", str(tmp_path / "ds"), "--pois", str(d / "pois.gpkg"),
                   "--imagery", str(d / "imagery.tif"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err
    assert not (tmp_path / "ds").exists() and list(tmp_path.iterdir()) == []


def test_build_refuses_existing_output_and_incomplete_city(synthcity, tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    assert cli_main(["build-dataset", "--out", str(tmp_path / "ds"), "--from-synthcity", str(synthcity["dir"])]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "city").mkdir()
    (tmp_path / "city" / "imagery.tif").write_bytes(b"")
    assert cli_main(["build-dataset", "--out", str(tmp_path / "x"), "--from-synthcity", str(tmp_path / "city")]) == 2
    assert "pois.gpkg" in capsys.readouterr().err
    assert cli_main(["build-dataset", "--out", str(tmp_path / "x")]) == 2
    assert "--pois" in capsys.readouterr().err


def test_build_with_grey_and_all_nodata_imagery(synthcity, tmp_path, capsys):
    import rasterio
    from rasterio.transform import from_origin

    d = synthcity["dir"]
    grey, empty = tmp_path / "grey.tif", tmp_path / "empty.tif"
    for path, count, nodata, value in ((grey, 1, None, None), (empty, 3, 0, 0)):
        data = synthcity["img"][:count] if value is None else np.zeros((count, 512, 768), np.uint8)
        with rasterio.open(path, "w", driver="GTiff", width=768, height=512, count=count, dtype="uint8",
                           crs="EPSG:32650", transform=from_origin(X0, Y0 + 512, 1.0, 1.0), nodata=nodata) as dst:
            dst.write(data)
    base = ["build-dataset", "--pois", str(d / "pois.gpkg"), "--image-size", "64"]
    assert cli_main([*base, "--out", str(tmp_path / "g"), "--imagery", str(grey)]) == 0
    assert "one band: replicated" in capsys.readouterr().out
    s = RegionDataset(tmp_path / "g")[0]
    assert s.image_coverage == 1.0 and np.array_equal(s.image[..., 0], s.image[..., 2])
    # Nodata everywhere: a valid POI-only dataset (cells without POIs or imagery are left out).
    assert cli_main([*base, "--out", str(tmp_path / "e"), "--imagery", str(empty), "--quiet"]) == 0
    ds = RegionDataset(tmp_path / "e")
    assert (ds.image_coverage == 0).all() and ds[0].image is None and ds.poi_count.sum() == 80
