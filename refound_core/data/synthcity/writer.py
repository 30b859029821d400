"""Byte-stable, atomic writers for the synthetic city's files.

Determinism: the GeoTIFFs have fixed creation options and no timestamp tags; GeoPackages get
their ``last_change`` timestamps pinned through GDAL's ``OGR_CURRENT_DATE``; JSON is written with
sorted keys. Each file is written under a temporary name in the target folder and moved into
place with ``os.replace``, so a reader never sees half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

FIXED_DATE = "2000-01-01T00:00:00.000Z"  # GeoPackage last_change: a constant, not the clock

RGB_PROFILE = dict(driver="GTiff", dtype="uint8", count=3, tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", predictor=2, zlevel=6, photometric="RGB", interleave="pixel")
FLOAT_PROFILE = dict(driver="GTiff", dtype="float32", count=1, compress="deflate", predictor=3, zlevel=6)


@contextlib.contextmanager
def atomic(path: Path):
    """Yield a temporary sibling path; on success move it onto ``path``, else remove it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(p: Path):
    for q in (p, Path(str(p) + "-journal"), Path(str(p) + "-wal"), Path(str(p) + "-shm"),
              Path(str(p) + ".aux.xml")):
        with contextlib.suppress(FileNotFoundError):
            q.unlink()


def write_rgb(path, strips, size_px: int, transform, crs, on_strip=None):
    """Write ``(row0, row1, uint8 [rows, cols, 3])`` strips into a tiled RGB GeoTIFF."""
    import rasterio
    from rasterio.windows import Window

    with atomic(path) as tmp, rasterio.Env(GDAL_PAM_ENABLED="NO"):
        with rasterio.open(tmp, "w", width=size_px, height=size_px, crs=crs, transform=transform,
                           **RGB_PROFILE) as dst:
            for r0, r1, arr in strips:
                dst.write(np.moveaxis(arr, 2, 0), window=Window(0, r0, size_px, r1 - r0))
                if on_strip is not None:
                    on_strip(r0, r1)


def write_float(path, array: np.ndarray, transform, crs):
    """Write one float32 band (population persons per pixel)."""
    import rasterio

    h, w = array.shape
    with atomic(path) as tmp, rasterio.Env(GDAL_PAM_ENABLED="NO"):
        with rasterio.open(tmp, "w", width=w, height=h, crs=crs, transform=transform, **FLOAT_PROFILE) as dst:
            dst.write(array.astype(np.float32), 1)


def write_gpkg(path, layer: str, columns: dict, geometry, crs):
    """Write a GeoPackage 1.2 layer (QGIS 3.22 warns about 1.4) with a pinned timestamp."""
    import geopandas as gpd
    import pyogrio

    gdf = gpd.GeoDataFrame(columns, geometry=geometry, crs=crs)
    old = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": FIXED_DATE})
    try:
        with atomic(path) as tmp:
            pyogrio.write_dataframe(gdf, tmp, layer=layer, driver="GPKG",
                                    dataset_options={"VERSION": "1.2"})
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": old})


def write_json(path, obj: dict):
    with atomic(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                             encoding="utf-8")
