"""Downstream labels of grid cells, built as in paper 5.1.2.

* Population (POP): "a region's population value is contributed by values from several
  statistical units it overlaps with, according to its overlapping areas to each unit":
  ``pop(cell) = sum_u value_u * area(u & cell) / area(u)``. Units are polygons (a census or HSY
  grid) or the pixels of a raster (WorldPop, ~100 m, persons per pixel); see
  :func:`area_weighted_sum`, :func:`population_from_polygons`, :func:`population_from_raster`.
* Urban village detection (UVD): "regions overlapping with ground-truth UV areas by more than 20%
  of their area are labeled as positive": ``uv(cell) = 1 if area(UV & cell) / area(cell) > 0.2``
  (:func:`urban_village_from_polygons`). The paper's five-fold negative sampling is a choice of
  the evaluation split, not of the label, so every cell keeps its label and overlap fraction here.
* Commercial activeness (CAP): the number of comments on all POIs of a region, aggregated "by
  regions according to POI locations": the sum of a per-POI numeric field over the cell's POIs
  (:func:`commercial_activeness`).

All areas are measured in the grid's metric CRS, after projecting the units into it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from refound_core.errors import InputError

UV_THRESHOLD = 0.2  # paper 5.1.2: "by more than 20% of their area"
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".asc", ".nc", ".jp2", ".bil", ".hdr")


# ------------------------------------------------------------------ geometry helpers
def _cells_crs(cells: Sequence) -> str:
    crs = {c.crs for c in cells}
    if len(crs) > 1:
        raise InputError(f"cells come from several grids ({sorted(crs)}); label one grid at a time")
    return crs.pop() if crs else ""


def cell_boxes(cells: Sequence) -> np.ndarray:
    """Shapely boxes of the cells (grid CRS)."""
    import shapely

    b = np.asarray([c.bounds for c in cells], dtype=np.float64).reshape(-1, 4)
    return shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])


def _transformer(src_crs, dst_crs):
    import pyproj

    from refound_core.data.grid import parse_crs

    src, dst = parse_crs(src_crs, "label source CRS"), parse_crs(dst_crs, "grid CRS")
    return None if src == dst else pyproj.Transformer.from_crs(src, dst, always_xy=True)


def _reproject(geoms: np.ndarray, src_crs, dst_crs) -> np.ndarray:
    import shapely

    t = _transformer(src_crs, dst_crs)
    if t is None:
        return geoms
    return shapely.transform(geoms, t.transform, interleaved=False)


def area_weighted_sum(units: np.ndarray, values: np.ndarray, cells: Sequence) -> np.ndarray:
    """``float64 [len(cells)]``: ``sum_u values[u] * area(u & cell) / area(u)`` (paper 5.1.2, POP).

    ``units`` are shapely polygons already in the cells' CRS. Pairs come from one STRtree query
    (vectorised), not one query per cell; zero-area units contribute nothing.
    """
    import shapely

    boxes = cell_boxes(cells)
    out = np.zeros(len(boxes), dtype=np.float64)
    if len(units) == 0 or len(boxes) == 0:
        return out
    units = np.asarray(units, dtype=object)
    values = np.asarray(values, dtype=np.float64)
    unit_area = shapely.area(units)
    keep = (unit_area > 0) & np.isfinite(values) & (values != 0)
    units, values, unit_area = units[keep], values[keep], unit_area[keep]
    if len(units) == 0:
        return out
    cell_idx, unit_idx = shapely.STRtree(units).query(boxes, predicate="intersects")
    overlap = shapely.area(shapely.intersection(boxes[cell_idx], units[unit_idx]))
    np.add.at(out, cell_idx, values[unit_idx] * overlap / unit_area[unit_idx])
    return out


def overlap_fraction(polygons: np.ndarray, cells: Sequence) -> np.ndarray:
    """``float64 [len(cells)]``: area(union(polygons) & cell) / area(cell); overlaps counted once."""
    import shapely

    boxes = cell_boxes(cells)
    out = np.zeros(len(boxes), dtype=np.float64)
    polygons = np.asarray(polygons, dtype=object)
    if len(polygons) == 0 or len(boxes) == 0:
        return out
    union = shapely.union_all(shapely.make_valid(polygons))
    parts = shapely.get_parts(union)  # disjoint pieces: summing their overlaps never double counts
    parts = parts[shapely.area(parts) > 0]
    if len(parts) == 0:
        return out
    cell_idx, part_idx = shapely.STRtree(parts).query(boxes, predicate="intersects")
    np.add.at(out, cell_idx, shapely.area(shapely.intersection(boxes[cell_idx], parts[part_idx])))
    return np.clip(out / shapely.area(boxes), 0.0, 1.0)


# ------------------------------------------------------------------ reading vector layers
POLYGON_TYPES, POINT_TYPES = {3, 6}, {0, 4}  # shapely type ids: (Multi)Polygon, (Multi)Point


def read_vector(path, crs, field: Optional[str] = None, layer=None, what: str = "vector file") -> tuple:
    """Non-empty geometries of a vector layer projected to ``crs`` (polygons made valid), and the
    raw values of ``field`` (an object array, None entries for nulls) or None without a field."""
    import pyogrio
    import shapely

    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist; check the path")
    try:
        info = pyogrio.read_info(p, layer=layer)
    except Exception as exc:
        raise InputError(f"{what} {p} cannot be read as a vector layer ({exc}); give a GeoPackage, "
                         "Shapefile or GeoJSON") from None
    fields = [str(f) for f in info["fields"]]
    if field is not None and field not in fields:
        raise InputError(f"{what} {p} has no field {field!r}; its fields are {fields}; choose the field "
                         "that holds the values")
    if not info.get("crs"):
        raise InputError(f"{what} {p} has no CRS; assign one (e.g. ogr2ogr -a_srs EPSG:4326) and try again")
    _, _, wkb, field_data = pyogrio.raw.read(p, layer=layer, columns=[field] if field else [])[:4]
    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object), on_invalid="ignore")
    ok = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    values = np.asarray(list(field_data[0]), dtype=object)[ok] if field else None
    geoms = _reproject(geoms[ok], info["crs"], crs)
    polygons = np.isin(shapely.get_type_id(geoms), list(POLYGON_TYPES))
    if polygons.any():
        geoms[polygons] = shapely.make_valid(geoms[polygons])
    return geoms, values


def numeric_values(raw: np.ndarray, field: str, path, what: str) -> np.ndarray:
    """float64 values of a field (nulls -> NaN), or one InputError naming the field."""
    try:
        return np.array([np.nan if v is None else v for v in raw], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"field {field!r} of {what} {path} is not numeric; choose a numeric field") from None


def geometry_kind(geoms: np.ndarray, path, what: str) -> str:
    """``"polygon"`` or ``"point"``; one InputError for mixed or other geometry types."""
    import shapely

    kinds = set(shapely.get_type_id(geoms).tolist())
    if kinds and kinds <= POLYGON_TYPES | {7}:  # make_valid may return collections of polygons
        return "polygon"
    if kinds and kinds <= POINT_TYPES:
        return "point"
    raise InputError(f"{what} {path} holds {'no geometries' if not kinds else 'lines or mixed geometries'}; "
                     "give polygons or points")


def read_polygons(path, crs, value_field: Optional[str] = None, layer=None, what: str = "polygon file") -> tuple:
    """Polygons of a vector layer projected to ``crs``, and the numeric ``value_field`` (or None)."""
    geoms, raw = read_vector(path, crs, value_field, layer, what)
    if len(geoms) and geometry_kind(geoms, path, what) != "polygon":
        raise InputError(f"{what} {path} holds non-polygon geometries; give polygons (area weighting and "
                         "overlap need areas)")
    return geoms, (numeric_values(raw, value_field, path, what) if value_field else None)


# ------------------------------------------------------------------ the three labels
def population_from_polygons(path, cells: Sequence, value_field: str = "population", layer=None) -> np.ndarray:
    """POP label from statistical-unit polygons with a population field (area-weighted, paper 5.1.2)."""
    units, values = read_polygons(path, _cells_crs(cells), value_field, layer, what="population polygons")
    return area_weighted_sum(units, values, cells)


def population_from_raster(path, cells: Sequence, band: int = 1, max_window_px: int = 4_000_000) -> np.ndarray:
    """POP label from a persons-per-pixel raster: each pixel is a statistical unit (paper 5.1.2)."""
    return raster_label(path, cells, band=band, stat="sum", max_window_px=max_window_px, what="population raster")


def raster_label(path, cells: Sequence, band: int = 1, stat: str = "sum", max_window_px: int = 4_000_000,
                 what: str = "label raster") -> np.ndarray:
    """Per-cell ``sum`` (counts: each pixel a unit, area-weighted as POP in paper 5.1.2) or ``mean``
    (intensities: the overlap-weighted mean of the valid pixels) of one raster band.

    Cells are processed in square tiles of cells sized so the raster window under a tile holds at
    most about ``max_window_px`` pixels (memory stays bounded for any city and resolution); the
    window's valid pixels become quadrilaterals in the grid CRS and :func:`area_weighted_sum` does
    the rest. Cells that do not overlap the raster (or, for ``mean``, no valid pixel) get NaN.
    """
    if stat not in ("sum", "mean"):
        raise InputError(f"a raster label is a per-cell sum or mean, not {stat!r}")
    import rasterio
    import shapely
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window, from_bounds

    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist; check the path")
    crs = _cells_crs(cells)
    out = np.full(len(cells), np.nan)
    try:
        src = rasterio.open(p)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{what} {p} cannot be opened by GDAL ({exc})") from None
    with src:
        if src.crs is None:
            raise InputError(f"{what} {p} has no CRS; assign one (gdal_edit.py -a_srs ...)")
        if not 1 <= band <= src.count:
            raise InputError(f"{what} {p} has {src.count} band(s); band {band} does not exist")
        t = _transformer(src.crs, crs)
        footprint = _reproject(np.array([shapely.segmentize(shapely.box(*src.bounds),
                                                             max(src.res) * 16)]), src.crs, crs)[0]
        full = Window(0, 0, src.width, src.height)
        if not len(cells):
            return out
        tiles = _cell_tiles(cells, src, crs, max_window_px)
        for idx in tiles:
            block = [cells[i] for i in idx]
            boxes = cell_boxes(block)
            covered = shapely.area(shapely.intersection(boxes, footprint)) > 0
            if not covered.any():
                continue
            b = np.asarray([c.bounds for c in block])
            extent = transform_bounds(crs, src.crs, b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max(),
                                      densify_pts=21)
            fw = from_bounds(*extent, transform=src.transform)
            c0, r0 = int(np.floor(fw.col_off)), int(np.floor(fw.row_off))
            c1, r1 = int(np.ceil(fw.col_off + fw.width)), int(np.ceil(fw.row_off + fw.height))
            try:  # whole pixels under the block, clipped to the raster
                win = Window(c0, r0, c1 - c0, r1 - r0).intersection(full)
            except rasterio.errors.WindowError:
                continue
            data = src.read(band, window=win, masked=True).astype(np.float64).filled(np.nan)
            # a sum only needs the non-zero pixels; a mean needs every valid one for its denominator
            rows, cols = np.nonzero(np.isfinite(data) & ((data != 0) if stat == "sum" else True))
            values = data[rows, cols]
            tr = src.window_transform(win)
            cx = np.stack([cols, cols + 1, cols + 1, cols], axis=1).astype(np.float64)
            cy = np.stack([rows, rows, rows + 1, rows + 1], axis=1).astype(np.float64)
            xs, ys = tr @ (cx, cy)
            xs, ys = np.asarray(xs), np.asarray(ys)
            if t is not None and xs.size:
                xs, ys = (np.asarray(v).reshape(-1, 4) for v in t.transform(xs.ravel(), ys.ravel()))
            units = shapely.polygons(np.stack([xs, ys], axis=-1)) if xs.size else np.zeros(0, dtype=object)
            if stat == "sum":
                out[idx] = np.where(covered, area_weighted_sum(units, values, block), np.nan)
            else:
                out[idx] = area_weighted_mean(units, values, block)
    return out


def area_weighted_mean(units: np.ndarray, values: np.ndarray, cells: Sequence) -> np.ndarray:
    """``float64 [len(cells)]``: ``sum_u v_u * area(u & cell) / sum_u area(u & cell)`` over the
    units with a finite value; NaN where no such unit overlaps the cell."""
    import shapely

    values = np.asarray(values, dtype=np.float64)
    units = np.asarray(units, dtype=object)
    ok = np.isfinite(values)
    units, values = units[ok], values[ok]
    area = shapely.area(units) if len(units) else np.zeros(0)
    # area_weighted_sum divides by the unit's area: weighting by it gives plain overlap areas
    covered = area_weighted_sum(units, area, cells)
    weighted = area_weighted_sum(units, values * area, cells)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(covered > 0, weighted / np.where(covered > 0, covered, 1.0), np.nan)


def _cell_tiles(cells: Sequence, src, crs, max_window_px: int) -> list:
    """Index arrays of square tiles of T x T cells, T chosen from the raster's pixels per cell."""
    from rasterio.warp import transform_bounds

    b = transform_bounds(crs, src.crs, *cells[0].bounds, densify_pts=21)
    px_per_cell = max(1.0, (b[2] - b[0]) / abs(src.res[0]) * (b[3] - b[1]) / abs(src.res[1]))
    side = int(max(1, min(64, np.sqrt(max_window_px / px_per_cell))))
    cols = np.fromiter((c.col for c in cells), np.int64, len(cells)) // side
    rows = np.fromiter((c.row for c in cells), np.int64, len(cells)) // side
    _, inverse = np.unique(np.stack([rows, cols], axis=1), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def is_raster(path) -> bool:
    return str(path).lower().endswith(RASTER_SUFFIXES)


def population(path, cells: Sequence, value_field: str = "population") -> np.ndarray:
    """POP label from a raster (by suffix) or polygons with ``value_field``."""
    if is_raster(path):
        return population_from_raster(path, cells)
    return population_from_polygons(path, cells, value_field)


def urban_village_from_polygons(path, cells: Sequence, threshold: float = UV_THRESHOLD, layer=None) -> tuple:
    """UVD label: ``(int8 labels, float64 overlap fractions)``; 1 where the fraction > threshold."""
    polygons, _ = read_polygons(path, _cells_crs(cells), None, layer, what="urban-village polygons")
    frac = overlap_fraction(polygons, cells)
    return (frac > threshold).astype(np.int8), frac


def commercial_activeness(poi_values: np.ndarray, assignment) -> np.ndarray:
    """CAP label: per cell, the sum of a per-POI numeric field (e.g. review counts) over its POIs.

    ``assignment`` is a :class:`~refound_core.data.poi_sources.CellAssignment`; missing (NaN)
    values count as 0; a cell without POIs gets 0.
    """
    counts = assignment.counts()
    if assignment.order.size == 0:
        return np.zeros(len(counts), dtype=np.float64)
    cell_of = np.repeat(np.arange(len(counts)), counts)
    vals = np.nan_to_num(np.asarray(poi_values, dtype=np.float64)[assignment.order], nan=0.0)
    return np.bincount(cell_of, weights=vals, minlength=len(counts)).astype(np.float64)
