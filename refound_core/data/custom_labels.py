"""User labels: any raster or vector layer turned into one label column of a region dataset.

The paper's three tasks (5.1.2) are not the only questions planners ask: green share, night
lights, land use, crime counts. A task is a head + a label source (training/finetune/tasks.py), so
adding one is a matter of aggregating a layer to the grid cells, the same way the paper builds its
labels:

================  ===========  =============================================================
source            stat         per cell
================  ===========  =============================================================
raster            ``mean``     overlap-weighted mean of the valid pixels (intensities; default)
raster            ``sum``      area-weighted sum, each pixel a unit (counts, as POP in 5.1.2)
polygons          ``fraction`` share of the cell covered (default without a field); with a
                               threshold, 1 where the share is above it (as UVD in 5.1.2)
polygons + field  ``sum``      area-weighted sum of a numeric field (default; as POP)
polygons + field  ``mean``     overlap-weighted mean of a numeric field
polygons + field  ``majority`` the class (text field) covering most of the cell (multiclass)
points            ``count``    number of points in the cell (default without a field)
points + field    ``sum``      sum of a numeric field over the cell's points (as CAP in 5.1.2)
points + field    ``mean``     mean of a numeric field over the cell's points
================  ===========  =============================================================

Cells a source says nothing about get NaN (unknown), so the evaluation leaves them out; for sums
and counts a cell inside the source's coverage but without a unit or point is 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from refound_core.data import labels as L
from refound_core.errors import InputError

STATS = ("mean", "sum", "fraction", "majority", "count")


@dataclass
class LabelColumn:
    """One aggregated label: per-cell values, the task kind they suit, and how they were made."""

    values: np.ndarray                 # float64 [N]; NaN = unknown; class index for multiclass
    kind: str                          # "regression", "binary" or "multiclass"
    stat: str
    classes: Optional[list] = None     # class names of a multiclass label, index = value
    info: dict = dc_field(default_factory=dict)


def label_from_source(path, cells: Sequence, *, field: Optional[str] = None, stat: Optional[str] = None,
                      threshold: Optional[float] = None, band: int = 1, layer=None) -> LabelColumn:
    """Aggregate ``path`` (raster by suffix, else a vector layer) to ``cells`` (grid CRS)."""
    if stat is not None and stat not in STATS:
        raise InputError(f"--stat {stat!r} is not one of {', '.join(STATS)}")
    path = Path(path)
    info = {"source": str(path), "field": field, "band": band if L.is_raster(path) else None, "threshold": threshold}
    if L.is_raster(path):
        if field:
            raise InputError(f"{path} is a raster: it has bands, not fields; drop --field (use --band)")
        stat = stat or "mean"
        if stat not in ("mean", "sum"):
            raise InputError(f"a raster label is a per-cell mean or sum; --stat {stat} needs a vector layer")
        return _thresholded(L.raster_label(path, cells, band=band, stat=stat), stat, threshold, info)
    crs = L._cells_crs(cells)
    geoms, raw = L.read_vector(path, crs, field, layer, what="label layer")
    kind = L.geometry_kind(geoms, path, "label layer")
    if kind == "point":
        return _thresholded(*_from_points(geoms, raw, field, stat, cells, path), threshold, info)
    if field is None:
        stat = stat or "fraction"
        if stat != "fraction":
            raise InputError(f"--stat {stat} needs --field: polygons without a field only give the covered fraction")
        return _thresholded(L.overlap_fraction(geoms, cells), stat, threshold, info)
    numeric = _is_numeric(raw)
    stat = stat or ("sum" if numeric else "majority")
    if stat == "majority":
        classes, values = _majority(geoms, raw, cells)
        return LabelColumn(values, "multiclass", stat, classes, info)
    if stat not in ("sum", "mean"):
        raise InputError(f"--stat {stat} does not apply to polygons with a field; use sum, mean or majority")
    if not numeric:
        raise InputError(f"field {field!r} of {path} is not numeric; --stat {stat} needs numbers "
                         "(use --stat majority for classes)")
    values = L.numeric_values(raw, field, path, "label layer")
    agg = L.area_weighted_sum(geoms, values, cells) if stat == "sum" else L.area_weighted_mean(geoms, values, cells)
    return _thresholded(agg, stat, threshold, info)


def _thresholded(values: np.ndarray, stat: str, threshold: Optional[float], info: dict) -> LabelColumn:
    """A regression label, or a binary one (1 where value > threshold) when a threshold is given."""
    values = np.asarray(values, dtype=np.float64)
    if threshold is None:
        return LabelColumn(values, "regression", stat, None, info)
    return LabelColumn(np.where(np.isnan(values), np.nan, (values > threshold).astype(np.float64)),
                       "binary", stat, None, info)


def _is_numeric(raw: np.ndarray) -> bool:
    return all(v is None or isinstance(v, (int, float, np.integer, np.floating, bool)) for v in raw)


def _majority(geoms: np.ndarray, raw: np.ndarray, cells: Sequence) -> tuple:
    """Class names (sorted) and per cell the index of the class with the largest overlap (NaN: none)."""
    import shapely

    names = np.asarray(["" if v is None else str(v) for v in raw], dtype=object)
    keep = names != ""
    classes = sorted(set(names[keep].tolist()))
    if not classes:
        raise InputError("the label layer's class field is empty everywhere; choose another field")
    area = shapely.area(geoms)
    overlap = np.stack([L.area_weighted_sum(geoms[keep & (names == c)], area[keep & (names == c)], cells)
                        for c in classes], axis=1)
    values = np.argmax(overlap, axis=1).astype(np.float64)
    values[overlap.max(axis=1) <= 0] = np.nan
    return classes, values


def _from_points(geoms: np.ndarray, raw, field: Optional[str], stat: Optional[str], cells: Sequence, path) -> tuple:
    """``(values, stat)`` of point sources: count, or sum / mean of a numeric field per cell."""
    import shapely

    stat = stat or ("sum" if field else "count")
    if stat not in ("count", "sum", "mean"):
        raise InputError(f"--stat {stat} does not apply to points; use count, or sum / mean with --field")
    if stat != "count" and field is None:
        raise InputError(f"--stat {stat} of points needs --field (the numeric attribute to aggregate)")
    xy = shapely.get_coordinates(geoms) if shapely.get_type_id(geoms).max(initial=0) == 0 else None
    if xy is None:  # multipoints: one row per part, its value repeated
        parts, index = shapely.get_parts(geoms, return_index=True)
        xy, raw = shapely.get_coordinates(parts), (None if raw is None else raw[index])
    values = np.ones(len(xy)) if stat == "count" else L.numeric_values(raw, field, path, "label layer")
    # a point belongs to the one cell whose half-open square [xmin, xmax) x [ymin, ymax) holds it
    b = np.asarray([c.bounds for c in cells], dtype=np.float64).reshape(-1, 4)
    size = b[0, 2] - b[0, 0] if len(b) else 1.0
    lookup = {(int(c.col), int(c.row)): i for i, c in enumerate(cells)}
    cols, rows = np.floor(xy[:, 0] / size).astype(np.int64), np.floor(xy[:, 1] / size).astype(np.int64)
    cell_of = np.array([lookup.get((c, r), -1) for c, r in zip(cols.tolist(), rows.tolist())], dtype=np.int64)
    inside = (cell_of >= 0) & np.isfinite(values)
    total = np.bincount(cell_of[inside], weights=values[inside], minlength=len(cells))
    if stat != "mean":
        return total, stat
    count = np.bincount(cell_of[inside], minlength=len(cells))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), stat
