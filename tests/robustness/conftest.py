"""One tiny city for the whole bad-input suite (session-scoped, built once): the inference tests'
checkpoint and city, plus the broken variants of each input the cases feed to the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.inference._inference_fixtures import CRS, EXTENT, RASTER_BOUNDS, build_tiny_checkpoint, make_city

REPO = Path(__file__).resolve().parents[2]


def _raster(path, count=3, dtype="uint8", crs=CRS, bounds=RASTER_BOUNDS, px=64):
    import rasterio
    from rasterio.transform import from_bounds

    rng = np.random.default_rng(1)
    data = (rng.random((count, px, px)) * (200 if dtype == "uint8" else 3000)).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", width=px, height=px, count=count, dtype=dtype, crs=crs,
                       transform=from_bounds(*bounds, px, px)) as dst:
        dst.write(data)
    return path


def _pois(path, rows, crs=CRS):
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(rows, crs=crs) if rows else gpd.GeoDataFrame(
        {"name": [], "category": []}, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    gdf.to_file(path, driver="GPKG")
    return path


@pytest.fixture(scope="session")
def bad(tmp_path_factory):
    """Paths of the good city and of each broken input."""
    import shapely

    d = tmp_path_factory.mktemp("robust")
    city = make_city(d)
    f = {"tif": city["tif"], "gpkg": city["gpkg"], "dir": d}
    f["ckpt"] = build_tiny_checkpoint(d / "uv")
    f["backbone"] = build_tiny_checkpoint(d / "backbone", task=None)
    raw = Path(city["tif"]).read_bytes()
    f["truncated"] = d / "truncated.tif"
    f["truncated"].write_bytes(raw[: len(raw) // 2])
    f["one_band"] = _raster(d / "one_band.tif", count=1)
    f["uint16"] = _raster(d / "uint16.tif", dtype="uint16")
    f["float32"] = _raster(d / "float32.tif", dtype="float32")
    f["two_band"] = _raster(d / "two_band.tif", count=2)
    f["no_crs"] = _raster(d / "no_crs.tif", crs=None)
    x0, y0, x1, y1 = RASTER_BOUNDS
    f["far"] = _raster(d / "far.tif", bounds=(x0 + 100_000, y0, x1 + 100_000, y1))  # 100 km east
    f["not_raster"] = d / "notes.tif"
    f["not_raster"].write_text("this is not a raster\n")
    f["not_vector"] = d / "notes.gpkg"
    f["not_vector"].write_text("this is not a GeoPackage\n")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    f["empty_pois"] = _pois(d / "empty.gpkg", [])
    f["null_names"] = _pois(d / "null_names.gpkg", [{"name": None, "category": "amenity=cafe",
                                                     "geometry": shapely.Point(cx + i, cy)} for i in range(5)])
    f["polygons"] = _pois(d / "polygons.gpkg", [{"name": "market hall", "category": "amenity=cafe",
                                                 "geometry": shapely.box(cx, cy, cx + 20, cy + 20)}])
    f["other_fields"] = _pois(d / "other_fields.gpkg", [{"title": "cafe", "kind": "amenity=cafe",
                                                         "geometry": shapely.Point(cx, cy)}])
    f["extent"] = ",".join(str(v) for v in EXTENT)
    return f


def refound(*args, timeout=300, env=None):
    """Run the CLI as a user would: a subprocess. Returns the CompletedProcess (text)."""
    e = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    e.pop("REFOUND_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "training.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=str(REPO))


def leftovers(folder) -> list:
    """Temp files and locks a run must not leave behind."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith((".tmp", ".lock")) or ".probe-" in p.name)
