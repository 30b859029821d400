"""Whole regions (issue 17): polygon AOIs, resumable sharded run directories, GDAL/STAC imagery,
torchrun ranks taking shards from the manifest."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from refound_core.errors import InputError
from refound_core.inference.pipeline import AnalysisRequest
from refound_core.inference.region import run_region as run_analysis
from tests.inference._inference_fixtures import CELL, CRS, EXTENT, build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _req(ckpt, city, out, **kw):
    base = dict(checkpoint=str(ckpt), task="urban_village", out=str(out), extent=EXTENT, extent_crs=CRS,
                pois=str(city["gpkg"]), imagery=str(city["tif"]), device="cpu", batch_size=4,
                run_dir=True, overwrite=False)
    base.update(kw)
    return AnalysisRequest(**base)


def _cells(path):
    import geopandas as gpd

    return gpd.read_file(path).set_index("cell_id").sort_index()


def _same(a, b):
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(a.prediction.to_numpy(float), b.prediction.to_numpy(float), atol=1e-4)
    np.testing.assert_allclose(a.image_coverage.to_numpy(float), b.image_coverage.to_numpy(float), atol=1e-6)
    assert list(a.poi_count) == list(b.poi_count)


def _cli(*args, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return [sys.executable, "-m", "training.cli", *map(str, args)], e


def test_polygon_aoi_gives_exactly_the_cells_inside(uv_checkpoint, uv_predictor, city, tmp_path):
    import geopandas as gpd
    import shapely

    x0, y0 = EXTENT[0], EXTENT[1]
    tri = shapely.Polygon([(x0, y0), (x0 + 1000, y0), (x0, y0 + 1000)])        # lower-left triangle
    two = shapely.MultiPolygon([shapely.box(x0 + 700, y0 + 700, x0 + 1000, y0 + 1000),
                                shapely.box(x0 + 900, y0, x0 + 1000, y0 + 100)])  # two parts, upper right
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame({"aoi_id": ["west", "east"]}, geometry=[tri, two], crs=CRS).to_file(aoi)
    res = run_analysis(_req(uv_checkpoint, city, tmp_path / "aoi_out.gpkg", extent=None, extent_crs=None,
                            aoi=str(aoi), predictor=uv_predictor, shard_cells=8))
    cells = _cells(res.out)
    expected = {}
    for col in range(1950, 1960):
        for row in range(11715, 11725):
            c = shapely.Point((col + 0.5) * CELL, (row + 0.5) * CELL)
            for name, g in (("west", tri), ("east", two)):
                if g.intersects(c):
                    expected.setdefault(f"{CRS}/256/{col}_{row}", name)
    assert expected and dict(zip(cells.index, cells.aoi_id)) == expected
    assert not (tmp_path / "aoi_out.gpkg.run").exists()  # the default run dir is removed when done


def test_changed_model_is_refused_and_fresh_starts_over(uv_checkpoint, uv_predictor, city, tmp_path):
    rd = tmp_path / "rd"
    out = tmp_path / "a.gpkg"
    run_analysis(_req(uv_checkpoint, city, out, run_dir=str(rd), predictor=uv_predictor, shard_cells=5))
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["shards"]) == 5
    other = build_tiny_checkpoint(tmp_path / "uv2", seed=1)
    with pytest.raises(InputError, match="model_hash"):
        run_analysis(_req(other, city, tmp_path / "b.gpkg", run_dir=str(rd), shard_cells=5))
    res = run_analysis(_req(other, city, tmp_path / "b.gpkg", run_dir=str(rd), shard_cells=5, fresh=True))
    assert res.cells == 25
    # a complete run dir re-assembles without computing (same model): --overwrite
    before = {p.name: p.stat().st_mtime_ns for p in (rd / "shards").iterdir()}
    run_analysis(_req(other, city, tmp_path / "b.gpkg", run_dir=str(rd), shard_cells=5, overwrite=True))
    assert {p.name: p.stat().st_mtime_ns for p in (rd / "shards").iterdir()} == before


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_uninterrupted_and_skips_finished(uv_checkpoint, city, tmp_path):
    common = ["predict", "--quiet", "--checkpoint", uv_checkpoint, "--pois", city["gpkg"], "--imagery",
              city["tif"], "--extent", ",".join(map(str, EXTENT)) + "," + CRS, "--cell-size", "64",
              "--shard-cells", "16", "--device", "cpu", "--batch-size", "1"]
    rd = tmp_path / "rd"
    out = tmp_path / "killed.gpkg"
    cmd, env = _cli(*common, "--run-dir", rd, "--out", out)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list((rd / "shards").glob("s*.parquet"))) < 3:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = {p.name: p.stat().st_mtime_ns for p in (rd / "shards").glob("s*.parquet")}
    assert 3 <= len(finished) < 16 and not out.exists()
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (rd / "shards").glob("s*.parquet")
            if p.name in finished} == finished  # finished shards were not recomputed
    cmd2, _ = _cli(*common, "--out", tmp_path / "straight.gpkg")
    ref = subprocess.run(cmd2, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    _same(_cells(out), _cells(tmp_path / "straight.gpkg"))
    assert len(_cells(out)) == 17 * 16  # 1 km at 64 m, the grid snapped to the CRS origin


def _cog(src, dst):
    import rasterio
    from rasterio.shutil import copy

    with rasterio.open(src):
        pass
    copy(str(src), str(dst), driver="COG", blocksize=64)
    return dst


def test_cog_over_http_range_requests_through_vsicurl(uv_checkpoint, uv_predictor, city, tmp_path):
    from tests.region._range_server import serve

    cog = _cog(city["tif"], tmp_path / "city_cog.tif")
    ref = run_analysis(_req(uv_checkpoint, city, tmp_path / "local.gpkg", imagery=str(cog), predictor=uv_predictor))
    with serve(tmp_path) as (port, log):
        os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] = "EMPTY_DIR"
        try:
            res = run_analysis(_req(uv_checkpoint, city, tmp_path / "remote.gpkg", predictor=uv_predictor,
                                    imagery=f"/vsicurl/http://127.0.0.1:{port}/city_cog.tif"))
        finally:
            os.environ.pop("GDAL_DISABLE_READDIR_ON_OPEN", None)
    assert any(r == 206 for _, r in log)  # windows were read with HTTP range requests
    _same(_cells(res.out), _cells(ref.out))
    with pytest.raises(InputError, match="cannot be opened"):
        run_analysis(_req(uv_checkpoint, city, tmp_path / "x.gpkg", predictor=uv_predictor,
                          imagery="/vsicurl/http://127.0.0.1:9/nothing.tif"))


def _item(folder, name, href, bounds):
    item = {"type": "Feature", "stac_version": "1.0.0", "id": name, "bbox": list(bounds), "properties": {
        "datetime": "2024-01-01T00:00:00Z"}, "geometry": None, "links": [],
        "assets": {"visual": {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized"}}}
    (folder / f"{name}.json").write_text(json.dumps(item))
    return {"rel": "item", "href": f"./{name}.json"}


def test_local_stac_catalog_single_item_and_mosaic(uv_checkpoint, uv_predictor, city, tmp_path):
    import rasterio
    from rasterio.windows import Window

    ref = run_analysis(_req(uv_checkpoint, city, tmp_path / "local.gpkg", predictor=uv_predictor))
    one = [_item(tmp_path, "scene", str(city["tif"]), EXTENT)]
    (tmp_path / "catalog.json").write_text(json.dumps({"type": "Catalog", "id": "c", "stac_version": "1.0.0",
                                                       "description": "test", "links": one}))
    res = run_analysis(_req(uv_checkpoint, city, tmp_path / "stac.gpkg", predictor=uv_predictor,
                            imagery=f"stac:{tmp_path / 'catalog.json'}"))
    _same(_cells(res.out), _cells(ref.out))
    # the raster cut in two overlapping halves, two items: the VRT mosaic gives the same chips
    with rasterio.open(city["tif"]) as src:
        w, h = src.width, src.height
        for name, win in (("west", Window(0, 0, w // 2 + 8, h)), ("east", Window(w // 2 - 8, 0, w - w // 2 + 8, h))):
            prof = dict(src.profile, width=win.width, height=win.height, transform=src.window_transform(win))
            with rasterio.open(tmp_path / f"{name}.tif", "w", **prof) as dst:
                dst.write(src.read(window=win))
    two = [_item(tmp_path, n, f"{n}.tif", EXTENT) for n in ("west", "east")]
    (tmp_path / "two.json").write_text(json.dumps({"type": "Catalog", "id": "c2", "stac_version": "1.0.0",
                                                   "description": "test", "links": two}))
    res2 = run_analysis(_req(uv_checkpoint, city, tmp_path / "mosaic.gpkg", predictor=uv_predictor,
                             imagery=f"stac:{tmp_path / 'two.json'}"))
    _same(_cells(res2.out), _cells(ref.out))


@pytest.mark.slow
def test_torchrun_two_ranks_take_shards_from_the_manifest(uv_checkpoint, city, tmp_path):
    common = ["predict", "--checkpoint", uv_checkpoint, "--pois", city["gpkg"], "--imagery", city["tif"],
              "--extent", ",".join(map(str, EXTENT)) + "," + CRS, "--shard-cells", "5", "--device", "cpu"]
    cmd, env = _cli(*common, "--out", tmp_path / "single.gpkg")
    single = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    env.pop("WORLD_SIZE", None)
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "training.cli", *map(str, common), "--run-dir", tmp_path / "rd",
                           "--out", tmp_path / "dist.gpkg"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert dist.returncode == 0, dist.stdout[-2000:] + dist.stderr[-4000:]
    assert dist.stderr.count("this process: about") == 2  # both ranks got shards (3 and 2 of the 5)
    _same(_cells(tmp_path / "dist.gpkg"), _cells(tmp_path / "single.gpkg"))


def test_aoi_refusals_and_extent_exclusive(city, tmp_path):
    import argparse

    from refound_core.data.aoi import read_aoi
    from refound_core.inference.commands import predict

    with pytest.raises(InputError, match="no polygon features"):
        read_aoi(city["gpkg"])  # the POI points are no area
    with pytest.raises(InputError, match="does not exist"):
        read_aoi(tmp_path / "nope.gpkg")
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "c", "--out", "o.gpkg", "--extent", "0,0,1,1", "--aoi", "a.gpkg"])
    args = parser.parse_args(["--checkpoint", "c", "--out", "o.gpkg", "--aoi", "a.gpkg", "--run-dir", "rd"])
    req = predict.request_from_args(args, "urban_village")
    assert req.aoi == "a.gpkg" and req.extent is None and req.run_dir == "rd" and not req.fresh
