"""Top POI categories per cluster, for the typology summary of ``cluster_regions``.

An embedding layer's cells are cells of one ReFound grid (``CRS/size/col_row``, refound_core.data
.grid), so a POI's cell follows from its coordinates by arithmetic: no polygon join, hence no
shapely (whose GEOS clashes with QGIS's inside ``qgis_process``; see refound_qgis.explore_layers).
POIs are given as coordinates already in the layer's CRS; the CLI reads a file with
:func:`read_poi_points`, the plugin passes its layer's points.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from refound_core.errors import InputError

TOP_N = 3  # categories named per cluster


def _grid_of(table) -> tuple:
    grids = {str(c).rsplit("/", 1)[0] for c in table.cell_ids}
    if len(grids) != 1:
        raise InputError(f"{table.source}: cells of {len(grids)} grids ({sorted(grids)[:3]}); "
                         "POI categories need one grid")
    crs, size = next(iter(grids)).rsplit("/", 1)
    try:
        return crs, float(size)
    except ValueError:
        raise InputError(f"{table.source}: cell ids such as {table.cell_ids[0]!r} are not ReFound grid ids "
                         "(CRS/size/col_row); POI categories need them") from None


def poi_rows(table, xy: np.ndarray) -> np.ndarray:
    """Row of ``table`` holding each POI (x, y in the table's CRS), -1 when its cell is not a row."""
    _, size = _grid_of(table)
    index = {str(c).rsplit("/", 1)[1]: i for i, c in enumerate(table.cell_ids)}
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    cols = np.floor(xy[:, 0] / size).astype(np.int64)
    rows = np.floor(xy[:, 1] / size).astype(np.int64)
    return np.array([index.get(f"{c}_{r}", -1) for c, r in zip(cols.tolist(), rows.tolist())], dtype=np.int64)


def top_categories(labels: np.ndarray, rows: np.ndarray, categories, top: int = TOP_N) -> dict:
    """``{cluster: [(category, count), ...]}``: the ``top`` most frequent categories of the POIs
    in each cluster's cells (POIs outside the layer, with no category, or in noise are left out)."""
    counts: dict = {}
    for r, cat in zip(np.asarray(rows).tolist(), categories):
        if r < 0 or cat is None or str(cat).strip() == "":
            continue
        c = int(labels[r])
        if c < 0:
            continue
        counts.setdefault(c, Counter())[str(cat)] += 1
    return {c: cnt.most_common(top) for c, cnt in counts.items()}


def read_poi_points(path: str, crs: str, category_field: str = "category", layer: Optional[str] = None) -> tuple:
    """``(xy in crs, categories)`` of a POI file (GeoPackage, Shapefile, GeoJSON...)."""
    import geopandas as gpd

    from refound_core.data.grid import parse_crs

    try:
        gdf = gpd.read_file(path, layer=layer)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise InputError(f"POI file {path} cannot be read ({exc}); give a GeoPackage, Shapefile or GeoJSON") from None
    if category_field not in gdf.columns:
        raise InputError(f"POI file {path} has no field {category_field!r}; its fields are "
                         f"{[c for c in gdf.columns if c != 'geometry']} (set --category-field)")
    if gdf.crs is None:
        raise InputError(f"POI file {path} has no CRS; assign one (e.g. in QGIS) and retry")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty].to_crs(parse_crs(crs, "embedding layer CRS"))
    pts = gdf.geometry.representative_point()
    return np.column_stack([pts.x.to_numpy(), pts.y.to_numpy()]), gdf[category_field].tolist()
