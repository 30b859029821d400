"""A region run's plan: the area (extent or AOI polygons) on the grid, cut into shards, and the
cell source of one shard, whose reads are bounded by the shard.

* The grid is the rule of ``refound_core.data.grid`` (the area's own metric CRS, else the UTM zone
  of its centre); an AOI's bounding box picks it, and only cells whose centre lies inside an AOI
  polygon are analysed (``refound_core.data.aoi``), tagged with ``aoi_id``.
* Shards are the grid's rectangular blocks of about ``shard_cells`` cells (default 1024, e.g. 32 x 32
  cells = 8 x 8 km at 256 m), in the grid's north-west-first order; a shard without a cell in the
  AOI is left out.
* :class:`ShardSource` reads only the shard: POIs with a bounding-box filter (GDAL's spatial
  filter, through the layer's spatial index when it has one: GeoPackage, Shapefile .qix) and
  imagery as windows (``ChipReader``). So peak memory does not grow with the area's size.
  An ``.osm.pbf`` extract has no spatial filter: it is read once and shared by the shards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from refound_core.errors import InputError
from refound_core.inference.sources import FileCellSource, GridFrame

SHARD_CELLS = 1024
PROBE_FEATURES = 2000  # features read up front to check a POI file (fields, CRS, names)


@dataclass
class RegionPlan:
    grid: object
    ranges: tuple
    shards: list                      # [{"index", "ranges", "cells"}]
    aoi: object = None                # refound_core.data.aoi.Aoi in the grid CRS, or None
    poi_crs: Optional[str] = None
    osm_pois: object = None           # an OSM extract's PoiTable (read once), else None
    notices: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(s["cells"] for s in self.shards)


def _has_named_feature(path, layer, name_field) -> bool:
    import pyogrio

    try:
        res = pyogrio.raw.read(str(path), layer=layer, columns=[name_field], read_geometry=False, max_features=1,
                               where=f"\"{name_field}\" IS NOT NULL AND \"{name_field}\" <> ''")
        return len(res[3][0]) > 0
    except Exception:  # noqa: BLE001 - a driver without SQL filters: fall back to the sample's verdict
        return False


def check_poi_file(request) -> tuple:
    """``(crs, notices, osm table or None)`` of the POI file, checked on a bounded sample (fields,
    CRS, features, names) as ``validate.check_pois`` checks a whole table."""
    import logging

    from refound_core.data.poi_sources import is_osm, read_pois
    from refound_core.data.validate import check_pois, geometry_notice

    path = request.pois
    osm = is_osm(path)
    sample = read_pois(path, name_field=request.name_field, category_field=request.category_field,
                       layer=request.poi_layer, max_features=None if osm else PROBE_FEATURES)
    if not (len(sample) and not any(str(s).strip() for s in sample.names)
            and _has_named_feature(path, request.poi_layer, request.name_field)):
        check_pois(sample, path, request.name_field)
    notices = [n for n in [geometry_notice(path, request.poi_layer)] if n]
    for n in notices:
        logging.getLogger("refound.inference").warning("%s", n)
    return sample.crs, notices, (sample if osm else None)


def _centres(grid, ranges) -> tuple:
    """Cell columns, rows and centre coordinates of ``ranges`` in the grid's cell order."""
    col0, col1, row0, row1 = ranges
    rows, cols = np.meshgrid(np.arange(row1 - 1, row0 - 1, -1), np.arange(col0, col1), indexing="ij")
    cols, rows = cols.ravel(), rows.ravel()
    s = grid.cell_size
    return cols, rows, (cols + 0.5) * s, (rows + 0.5) * s


def shard_tags(plan: RegionPlan, ranges) -> Optional[dict]:
    """``{cell_id: aoi_id}`` of the shard's cells inside an AOI; None without AOI (all cells)."""
    if plan.aoi is None:
        return None
    cols, rows, x, y = _centres(plan.grid, ranges)
    which = plan.aoi.assign(x, y)
    return {plan.grid.cell_id(c, r): plan.aoi.ids[w] for c, r, w in zip(cols, rows, which) if w >= 0}


def plan_region(request, imagery, shard_cells: int = SHARD_CELLS) -> RegionPlan:
    """Locate the request's area (``aoi`` or ``extent``) on the grid and cut it into shards."""
    from refound_core.data.grid import Grid
    from refound_core.inference.pipeline import plan_grid

    notices, poi_crs, osm = [], None, None
    if request.pois is not None:
        poi_crs, notices, osm = check_poi_file(request)
    aoi = None
    if getattr(request, "aoi", None):
        from refound_core.data.aoi import read_aoi

        aoi = read_aoi(request.aoi, getattr(request, "aoi_layer", None))
        extent, extent_crs = aoi.bounds, aoi.crs
    else:
        extent, extent_crs = request.extent, request.extent_crs
        if extent_crs is None and poi_crs is not None:
            extent_crs = poi_crs
            notices.append(f"extent taken to be in the POI file's CRS {poi_crs}")
        elif extent_crs is None:
            from refound_core.data.imagery import ChipReader

            with ChipReader(imagery) as r:
                extent_crs = r.crs.to_wkt()
    g = Grid.for_extent(extent, extent_crs, request.cell_size)
    bounds = g.to_grid_bounds(*extent, extent_crs=extent_crs)
    grid, ranges, _ = plan_grid(GridFrame(g.crs, tuple(bounds)), request)
    plan = RegionPlan(grid, ranges, [], aoi.to_crs(grid.crs) if aoi is not None else None, poi_crs, osm, notices)
    for i, b in enumerate(grid.blocks(ranges, shard_cells)):
        n = (b[1] - b[0]) * (b[3] - b[2]) if plan.aoi is None else len(shard_tags(plan, b))
        if n:
            plan.shards.append({"index": i, "ranges": [int(v) for v in b], "cells": int(n)})
    if not plan.shards:
        raise InputError(f"AOI {request.aoi} contains no cell centre of the {request.cell_size:g} m grid; use a "
                         "smaller --cell-size or check the AOI layer")
    return plan


class ShardSource(FileCellSource):
    """The cells of one shard: POIs read with the shard's bounding box, imagery as windows, only
    the AOI's cells kept (``tags``). The whole-area checks (imagery overlap, POI file) were done
    once by the run, so an empty shard is no error."""

    def __init__(self, request, imagery, plan: RegionPlan, ranges, tags: Optional[dict]):
        super().__init__(request.pois, imagery, request.poi_layer, request.name_field, request.category_field)
        self.plan, self.ranges, self.tags = plan, tuple(ranges), tags

    def locate(self, request) -> GridFrame:
        g = self.plan.grid
        col0, col1, row0, row1 = self.ranges
        s = g.cell_size
        e = s * 1e-6  # inset: the grid's ranges of these bounds are exactly the shard's
        bounds = (col0 * s + e, row0 * s + e, col1 * s - e, row1 * s - e)
        if self.poi_path is not None:
            t0 = time.perf_counter()
            if self.plan.osm_pois is not None:
                self.pois = self.plan.osm_pois
            else:
                import pyproj

                from refound_core.data.poi_sources import read_pois

                t = pyproj.Transformer.from_crs(g.crs, self.plan.poi_crs, always_xy=True)
                bbox = t.transform_bounds(col0 * s, row0 * s, col1 * s, row1 * s, densify_pts=21)
                self.pois = read_pois(self.poi_path, name_field=self.name_field, category_field=self.category_field,
                                      layer=self.poi_layer, bbox=bbox)
            self.timer("poi_join", time.perf_counter() - t0)
        keep = None if self.tags is None else (lambda cell, tags=self.tags: cell.id in tags)
        return GridFrame(g.crs, bounds, [], keep)

    def _check_imagery(self, grid, ranges: tuple) -> None:
        """Done once for the whole area by the run (a shard far from the raster is no error)."""
