"""POI sources: vector files and OpenStreetMap extracts -> one :class:`PoiTable` (paper 5.1.1).

A POI is a textual name, a category and a location (paper 5.1.1: "a POI's textual name, a
category-id ... and coordinates"); the commercial-activeness label adds a numeric value per POI
(paper 5.1.2: number of map users' comments). Readers:

* :func:`read_vector_pois` - GeoPackage / Shapefile / GeoJSON / anything OGR reads, via pyogrio,
  with configurable name / category / value fields;
* :func:`read_osm_pois` - ``.osm.pbf`` / ``.osm`` via GDAL's OSM driver (pyogrio), ``points``
  layer; the category is the first of the ``amenity``, ``shop``, ``tourism``, ``leisure`` tags,
  written ``key=value`` (``"amenity=cafe"``) so equal values under different keys stay apart.

POIs are joined to grid cells by floor division of their coordinates (:func:`assign_to_cells`), one
vectorised pass, never one spatial query per cell.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from refound_core.errors import InputError

OSM_CATEGORY_KEYS = ("amenity", "shop", "tourism", "leisure")
OSM_SUFFIXES = (".osm.pbf", ".pbf", ".osm")

# One "key"=>"value" pair of GDAL's hstore-formatted other_tags (quotes inside are backslash-escaped).
_HSTORE_PAIR = re.compile(r'"((?:[^"\\]|\\.)*)"=>"((?:[^"\\]|\\.)*)"')


@dataclass
class PoiTable:
    """POIs as column arrays, all of length N, located in ``crs``.

    Attributes:
        names: object array of str (missing names are ``""``).
        categories: object array of str raw category labels (missing are ``""``).
        x, y: float64 coordinates in ``crs``.
        values: numeric per-POI fields (float64, NaN when missing), by field name.
        crs: authority string (``"EPSG:4326"``) or WKT.
        source: the file the POIs came from (provenance).
    """

    names: np.ndarray
    categories: np.ndarray
    x: np.ndarray
    y: np.ndarray
    crs: str
    values: dict = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index) -> "PoiTable":
        index = np.asarray(index)
        return PoiTable(self.names[index], self.categories[index], self.x[index], self.y[index], self.crs,
                        {k: v[index] for k, v in self.values.items()}, self.source)

    def to_crs(self, crs) -> "PoiTable":
        """The same POIs reprojected to ``crs`` (vectorised pyproj transform)."""
        import pyproj

        from refound_core.data.grid import parse_crs

        src, dst = parse_crs(self.crs, f"CRS of POIs {self.source}"), parse_crs(crs, "target CRS")
        if src == dst:
            return PoiTable(self.names, self.categories, self.x, self.y, _crs_text(dst), self.values, self.source)
        t = pyproj.Transformer.from_crs(src, dst, always_xy=True)
        x, y = t.transform(self.x, self.y)
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        out = PoiTable(self.names, self.categories, x, y, _crs_text(dst), self.values, self.source)
        return out if ok.all() else out.take(np.flatnonzero(ok))

    def bounds(self) -> Optional[tuple]:
        if len(self) == 0:
            return None
        return float(self.x.min()), float(self.y.min()), float(self.x.max()), float(self.y.max())


def _crs_text(c) -> str:
    code = c.to_epsg()
    return f"EPSG:{code}" if code is not None else c.to_wkt()


def _as_str_array(values) -> np.ndarray:
    """Object array of str: None/NaN -> "", bytes decoded leniently (a broken encoding never aborts)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out[i] = ""
        elif isinstance(v, bytes):
            out[i] = v.decode("utf-8", errors="replace")
        else:
            out[i] = str(v)
    return out


def _as_float_array(values, field_name: str, path) -> np.ndarray:
    try:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"value field {field_name!r} of {path} is not numeric; choose a numeric field "
                         "(e.g. a review count) for --value-field") from None


def _point_xy(geometry_wkb, path) -> tuple:
    """x, y of each feature: the point itself, or a point on the surface of another geometry."""
    import shapely

    # Broken geometries (rings cut by an extract's edge) become missing, not an error.
    geoms = shapely.from_wkb(np.asarray(geometry_wkb, dtype=object), on_invalid="ignore")
    missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    kinds = shapely.get_type_id(geoms)
    pts = geoms.copy()
    other = ~missing & (kinds != 0)
    if other.any():  # lines/polygons as POIs: a point guaranteed inside them
        pts[other] = shapely.point_on_surface(geoms[other])
    x = np.full(len(geoms), np.nan)
    y = np.full(len(geoms), np.nan)
    x[~missing] = shapely.get_x(pts[~missing])
    y[~missing] = shapely.get_y(pts[~missing])
    return x, y


def is_osm(path) -> bool:
    return str(path).lower().endswith(OSM_SUFFIXES)


def _check_exists(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist; check the path")
    return p


def read_pois(path, *, name_field: str = "name", category_field: str = "category",
              value_fields: Sequence[str] = (), layer=None, crs=None, encoding=None, bbox=None,
              max_features=None) -> PoiTable:
    """Read POIs from an OSM extract (by suffix) or any OGR vector file; see the module docstring.
    ``bbox`` (in the file's CRS) and ``max_features`` bound the read of a vector file (GDAL's
    spatial filter, using the layer's spatial index where it has one); an OSM extract is read whole."""
    if is_osm(path):
        return read_osm_pois(path)
    return read_vector_pois(path, name_field=name_field, category_field=category_field,
                            value_fields=value_fields, layer=layer, crs=crs, encoding=encoding, bbox=bbox,
                            max_features=max_features)


def read_vector_pois(path, *, name_field: str = "name", category_field: str = "category",
                     value_fields: Sequence[str] = (), layer=None, crs=None, encoding=None, bbox=None,
                     max_features=None) -> PoiTable:
    """POIs from a GeoPackage / Shapefile / GeoJSON layer (pyogrio).

    Args:
        name_field, category_field: attribute names of the POI name and raw category.
        value_fields: numeric attributes to keep per POI (e.g. ``("reviews",)``).
        layer: layer name or index (default: the first layer).
        crs: CRS to assume when the file has none (otherwise refused).
        encoding: text encoding of the attributes when the file does not declare it (Shapefile
            without ``.cpg``); default: GDAL's own detection.
        bbox: ``(xmin, ymin, xmax, ymax)`` in the file's CRS: only features meeting it are read.
        max_features: read at most this many features (None: all).

    Raises:
        InputError: missing file, unreadable file, missing field (the message lists the fields
            the layer has), no CRS.
    """
    import pyogrio

    p = _check_exists(path, "POI file")
    value_fields = tuple(f for f in (value_fields or ()) if f)
    try:
        info = pyogrio.read_info(p, layer=layer, encoding=encoding)
    except Exception as exc:  # pyogrio raises its own DataSourceError / DataLayerError types
        raise InputError(f"POI file {p} cannot be read as a vector layer ({exc}); give a GeoPackage, "
                         "Shapefile, GeoJSON or .osm.pbf file") from None
    available = [str(f) for f in info["fields"]]
    wanted = {"name": name_field, "category": category_field}
    wanted.update({f"value {v!r}": v for v in value_fields})
    for role, fname in wanted.items():
        if fname not in available:
            flag = {"name": "--name-field", "category": "--category-field"}.get(role, "--value-field")
            raise InputError(f"POI file {p} has no {role} field {fname!r}; its fields are {available}; "
                             f"choose one with {flag}")
    file_crs = info.get("crs")
    if not file_crs and crs is None:
        raise InputError(f"POI file {p} has no CRS; assign one to the file (e.g. ogr2ogr -a_srs EPSG:4326) "
                         "or pass the CRS of its coordinates")
    columns = list(dict.fromkeys([name_field, category_field, *value_fields]))
    bounded = {"bbox": tuple(float(v) for v in bbox)} if bbox is not None else {}
    if max_features is not None:
        bounded["max_features"] = int(max_features)
    _, _, geometry, field_data = pyogrio.raw.read(p, layer=layer, columns=columns, encoding=encoding,
                                                  **bounded)[:4]
    cols = dict(zip(columns, field_data))
    x, y = _point_xy(geometry, p)
    table = PoiTable(
        names=_as_str_array(cols[name_field]),
        categories=_as_str_array(cols[category_field]),
        x=x, y=y,
        crs=str(crs) if crs is not None else file_crs,
        values={v: _as_float_array(cols[v], v, p) for v in value_fields},
        source=str(p),
    )
    ok = np.isfinite(table.x) & np.isfinite(table.y)
    return table if ok.all() else table.take(np.flatnonzero(ok))


def parse_other_tags(text) -> dict:
    """GDAL's hstore ``"k"=>"v","k2"=>"v2"`` string as a dict (escaped quotes unescaped)."""
    if not text:
        return {}
    unescape = lambda s: s.replace('\\"', '"').replace("\\\\", "\\")  # noqa: E731
    return {unescape(k): unescape(v) for k, v in _HSTORE_PAIR.findall(str(text))}


def osm_category(tags: dict) -> str:
    """``key=value`` of the first category key present, else ``""`` (paper: raw category label)."""
    for key in OSM_CATEGORY_KEYS:
        value = tags.get(key)
        if value:
            return f"{key}={value}"
    return ""


def read_osm_pois(path, *, require_category: bool = True, include_areas: bool = True) -> PoiTable:
    """POIs from an OpenStreetMap ``.osm.pbf`` / ``.osm`` file (GDAL's OSM driver via pyogrio).

    A POI is a node (``points`` layer) or, with ``include_areas``, a closed way / relation
    (``multipolygons`` layer, located at a point on its surface) whose ``amenity``, ``shop``,
    ``tourism`` or ``leisure`` tag is set; ``require_category=False`` keeps every tagged node too,
    with category ``""``. The name is the ``name`` tag (``""`` when absent). Coordinates are WGS 84.
    Tags that GDAL's osmconf does not give a column of its own are parsed from ``other_tags``.
    """
    p = _check_exists(path, "OSM file")
    layers = ["points"] + (["multipolygons"] if include_areas else [])
    parts = [_read_osm_layer(p, layer, require_category) for layer in layers]
    cat = lambda i: np.concatenate([part[i] for part in parts])  # noqa: E731
    return PoiTable(cat(0), cat(1), cat(2).astype(np.float64), cat(3).astype(np.float64), "EPSG:4326", {}, str(p))


def _read_osm_layer(p: Path, layer: str, require_category: bool) -> tuple:
    import warnings

    import pyogrio

    try:
        with warnings.catch_warnings():  # the OSM driver warns about interleaved layer reading
            warnings.simplefilter("ignore")
            fields = set(pyogrio.read_info(p, layer=layer)["fields"])
            columns = [c for c in ("name", *OSM_CATEGORY_KEYS, "other_tags") if c in fields]
            _, _, geometry, field_data = pyogrio.raw.read(p, layer=layer, columns=columns)[:4]
    except Exception as exc:
        raise InputError(f"OSM file {p} cannot be read with GDAL's OSM driver ({exc}); give an .osm.pbf "
                         "extract (e.g. from Geofabrik) or convert it to a GeoPackage first") from None
    cols = dict(zip(columns, field_data))
    n = len(geometry)
    names = _as_str_array(cols["name"]) if "name" in cols else np.full(n, "", dtype=object)
    other = cols.get("other_tags", [None] * n)
    categories = np.empty(n, dtype=object)
    for i in range(n):
        tags = parse_other_tags(other[i])
        for key in OSM_CATEGORY_KEYS:  # keys with their own column (multipolygons) win over other_tags
            if key in cols and cols[key][i]:
                tags[key] = cols[key][i]
        categories[i] = osm_category(tags)
    x, y = _point_xy(geometry, p)
    keep = np.isfinite(x) & np.isfinite(y)
    if require_category:
        keep &= categories != ""
    idx = np.flatnonzero(keep)
    return names[idx], categories[idx], x[idx], y[idx]


@dataclass
class CellAssignment:
    """POIs grouped by cell, CSR-style: POIs of cell ``i`` are ``order[offsets[i]:offsets[i+1]]``.

    ``outside`` counts POIs that fell in none of the requested cells.
    """

    order: np.ndarray
    offsets: np.ndarray
    outside: int

    def indices(self, i: int) -> np.ndarray:
        return self.order[self.offsets[i]:self.offsets[i + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def assign_to_cells(x, y, grid, cells: Sequence) -> CellAssignment:
    """Join points (in the grid CRS) to ``cells`` of ``grid`` by floor division (vectorised).

    A point on a shared edge belongs to the cell to its east/north (half-open cells), so each POI
    lands in exactly one cell.
    """
    col, row = grid.cell_indices(x, y)
    n_cells = len(cells)
    if n_cells == 0 or col.size == 0:
        return CellAssignment(np.zeros(0, np.int64), np.zeros(n_cells + 1, np.int64), int(col.size))
    cell_cols = np.fromiter((c.col for c in cells), dtype=np.int64, count=n_cells)
    cell_rows = np.fromiter((c.row for c in cells), dtype=np.int64, count=n_cells)
    # One int64 key per (col, row): shift to non-negative, then mix with a stride wider than any column.
    c0, r0 = min(cell_cols.min(), col.min()), min(cell_rows.min(), row.min())
    stride = int(max(cell_cols.max(), col.max()) - c0 + 1)
    cell_keys = (cell_rows - r0) * stride + (cell_cols - c0)
    poi_keys = (row - r0) * stride + (col - c0)
    sorter = np.argsort(cell_keys, kind="stable")
    pos = np.searchsorted(cell_keys, poi_keys, sorter=sorter)
    pos = np.minimum(pos, n_cells - 1)
    hit = cell_keys[sorter[pos]] == poi_keys
    cell_of_poi = np.where(hit, sorter[pos], -1)
    inside = np.flatnonzero(hit)
    order = inside[np.argsort(cell_of_poi[inside], kind="stable")]
    counts = np.bincount(cell_of_poi[inside], minlength=n_cells)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return CellAssignment(order.astype(np.int64), offsets, int(col.size - inside.size))
