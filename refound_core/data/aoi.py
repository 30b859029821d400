"""Areas of interest (AOIs): polygon layers whose grid cells are analysed (``refound predict --aoi``).

A cell belongs to an AOI when its **centre** lies inside the AOI's (multi)polygon (a centre exactly
on the boundary counts as inside). Several features in one layer are several AOIs in one run:
each cell is tagged with the id of the first feature (in file order) that contains its centre,
so a cell of overlapping AOIs is written once. The id is the feature's ``aoi_id`` (or ``id``,
``name``) attribute when the layer has one, else its 1-based position in the file.

Read with pyogrio/shapely; only the AOI geometries are held in memory (a municipality is a few
thousand vertices), the cell tests are vectorised (``shapely.contains_xy`` on prepared polygons).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from refound_core.errors import InputError

ID_FIELDS = ("aoi_id", "id", "name")  # attribute used as the AOI id, first present wins


@dataclass
class Aoi:
    """Polygons (shapely, one per AOI), their ids (str) and their CRS."""

    geoms: np.ndarray
    ids: list
    crs: str
    source: str = ""

    @property
    def bounds(self) -> tuple:
        import shapely

        return tuple(float(v) for v in shapely.total_bounds(self.geoms))

    def to_crs(self, crs) -> "Aoi":
        import geopandas as gpd

        g = gpd.GeoSeries(self.geoms, crs=self.crs).to_crs(crs)
        return Aoi(np.asarray(g.values, dtype=object), list(self.ids), str(crs), self.source)

    def assign(self, x, y) -> np.ndarray:
        """Index into ``ids`` of the AOI containing each point (``x``, ``y`` in this CRS), -1 outside."""
        import shapely

        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        out = np.full(x.shape, -1, dtype=np.int64)
        for i, g in enumerate(self.geoms):
            todo = out < 0
            if not todo.any():
                break
            shapely.prepare(g)
            inside = shapely.intersects_xy(g, x[todo], y[todo])  # boundary counts as inside
            idx = np.flatnonzero(todo)[inside]
            out[idx] = i
        return out


def read_aoi(path, layer: Optional[str] = None) -> Aoi:
    """The AOI polygons of a vector file (GeoPackage, GeoJSON, Shapefile ...).

    Raises:
        InputError: missing or unreadable file, unknown layer, no CRS, no polygon features.
    """
    import pyogrio
    import shapely

    p = Path(path)
    if not p.exists():
        raise InputError(f"AOI file {p} does not exist; check the --aoi path")
    try:
        info = pyogrio.read_info(str(p), layer=layer)
    except Exception as exc:  # noqa: BLE001 - pyogrio raises its own DataSourceError / DataLayerError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"AOI file {p} cannot be read as a polygon layer{f' {layer!r}' if layer else ''} "
                         f"({first}); give a GeoPackage, GeoJSON or Shapefile (and --aoi-layer NAME for a "
                         "layer other than the first)") from None
    if not info.get("crs"):
        raise InputError(f"AOI file {p} has no CRS; assign one (e.g. ogr2ogr -a_srs EPSG:4326) and try again")
    fields = [str(f) for f in info["fields"]]
    id_field = next((f for f in ID_FIELDS if f in fields), None)
    _, _, wkb, data = pyogrio.raw.read(str(p), layer=layer, columns=[id_field] if id_field else [])[:4]
    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object))
    keep = np.array([g is not None and not g.is_empty and g.geom_type in ("Polygon", "MultiPolygon")
                     for g in geoms], dtype=bool)
    if not keep.any():
        raise InputError(f"AOI file {p} holds no polygon features ({info.get('geometry_type')}); give a layer of "
                         "polygons or multipolygons (the area(s) to analyse)")
    ids = [str(v) for v in data[0]] if id_field else [str(i + 1) for i in range(len(geoms))]
    geoms = shapely.make_valid(geoms[keep])
    return Aoi(np.asarray(geoms, dtype=object), [i for i, k in zip(ids, keep) if k], str(info["crs"]), str(p))
