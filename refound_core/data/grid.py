"""The region grid: square cells in a metric CRS, snapped to a fixed origin (paper 5.1.1).

ReFound partitions a city into 256 m x 256 m regions (paper 5.1.1: "partitioning these five cities
into 256m x 256m grids"). Here a cell is ``[col*s, (col+1)*s) x [row*s, (row+1)*s)`` in a metric
CRS with cell size ``s``: the origin is the CRS's own (0, 0), never the requested extent's corner,
so a cell's id and bounds are the same whatever extent asked for it, and the same cell gets the same
prediction twice. Rows grow northwards (``row = floor(y / s)``).

Geographic inputs (lon/lat) get the UTM zone of the extent's centre (WGS 84 / UTM, EPSG:326zz north,
EPSG:327zz south), because cells must have a size in metres.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from refound_core.errors import InputError

DEFAULT_CELL_SIZE = 256.0
DEFAULT_MAX_CELLS = 2_000_000

_ID_RE = re.compile(r"^EPSG:(\d+)/([0-9.]+)/(-?\d+)_(-?\d+)$")


@dataclass(frozen=True)
class Cell:
    """One region of the grid.

    Attributes:
        id: stable id ``"EPSG:<code>/<size>/<col>_<row>"``.
        col, row: integer cell indices (``col = floor(x / size)``, ``row = floor(y / size)``).
        bounds: ``(xmin, ymin, xmax, ymax)`` in ``crs`` (metres).
        crs: authority string of the grid CRS, e.g. ``"EPSG:32650"``.
    """

    id: str
    col: int
    row: int
    bounds: tuple
    crs: str


def parse_crs(crs, what: str = "CRS"):
    """A ``pyproj.CRS`` from any user input (``"EPSG:4326"``, WKT, int, rasterio/pyproj CRS).

    Raises InputError naming ``what`` when the CRS is missing or unknown.
    """
    import pyproj

    if crs is None or (isinstance(crs, str) and not crs.strip()):
        raise InputError(f"{what} is missing: give a CRS such as 'EPSG:4326' or 'EPSG:32650'")
    if hasattr(crs, "to_wkt") and not isinstance(crs, pyproj.CRS):  # rasterio.crs.CRS
        crs = crs.to_wkt()
    try:
        return pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError as exc:
        raise InputError(f"{what} {crs!r} is not a known CRS ({exc}); use an authority code such as "
                         "'EPSG:32650'") from None


def crs_string(crs) -> str:
    """``"EPSG:<code>"`` of a CRS, or InputError when it has no EPSG code (ids need one)."""
    c = parse_crs(crs)
    code = c.to_epsg()
    if code is None:
        raise InputError(f"CRS {c.name!r} has no EPSG code; reproject the input to an EPSG CRS "
                         "(e.g. its UTM zone) so cell ids stay stable")
    return f"EPSG:{code}"


def looks_like_lonlat(xmin, ymin, xmax, ymax) -> bool:
    """True when all four numbers fit longitude/latitude ranges."""
    return all(-180.0 <= v <= 180.0 for v in (xmin, xmax)) and all(-90.0 <= v <= 90.0 for v in (ymin, ymax))


def utm_crs_for_lonlat(lon: float, lat: float) -> str:
    """WGS 84 / UTM zone containing (lon, lat): ``EPSG:326zz`` north, ``EPSG:327zz`` south."""
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise InputError(f"centre ({lon}, {lat}) is not a valid longitude/latitude")
    zone = min(int(math.floor((lon + 180.0) / 6.0)) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def _check_extent(extent: Sequence[float], what: str = "extent") -> tuple:
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise InputError(f"{what} {extent!r} must be four numbers XMIN,YMIN,XMAX,YMAX") from None
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
        raise InputError(f"{what} {extent!r} holds a non-finite number; give four finite numbers")
    return xmin, ymin, xmax, ymax


def _check_order(xmin, ymin, xmax, ymax, geographic: bool, what: str = "extent"):
    if geographic and xmin > xmax:
        raise InputError(f"{what} ({xmin}, {ymin}, {xmax}, {ymax}) crosses the antimeridian (XMIN > XMAX in "
                         "longitude); split it into two extents, one on each side of 180 degrees")
    if xmin > xmax or ymin > ymax:
        raise InputError(f"{what} ({xmin}, {ymin}, {xmax}, {ymax}) is inverted; give XMIN,YMIN,XMAX,YMAX "
                         "with XMIN < XMAX and YMIN < YMAX")
    if xmin == xmax or ymin == ymax:
        raise InputError(f"{what} ({xmin}, {ymin}, {xmax}, {ymax}) is empty (zero width or height); "
                         "give an extent with an area")


class CellGrid:
    """The grid arithmetic, once, without pyproj: ids, bounds, point -> cell, extent -> cells, blocks.

    :class:`Grid` adds CRS validation and reprojection (pyproj) on top. Callers that handle the
    CRS themselves use this class directly: inside QGIS the CRS is QGIS's business, and pyproj (a
    second PROJ) crashed when first used from a QgsTask worker thread.

    Args:
        crs: the grid CRS as an authority string (``"EPSG:32650"``), trusted to be metric.
        cell_size: side of a cell in metres (paper: 256).
    """

    def __init__(self, crs: str, cell_size: float = DEFAULT_CELL_SIZE, max_cells: int = DEFAULT_MAX_CELLS):
        try:
            cell_size = float(cell_size)
        except (TypeError, ValueError):
            raise InputError(f"cell size {cell_size!r} must be a number of metres") from None
        if not (cell_size > 0 and math.isfinite(cell_size)):
            raise InputError(f"cell size {cell_size!r} must be a positive number of metres (paper: 256)")
        self.crs = str(crs)
        self.cell_size = cell_size
        self.max_cells = int(max_cells)
        self._size_token = f"{cell_size:g}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crs={self.crs!r}, cell_size={self.cell_size:g})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CellGrid) and other.crs == self.crs and other.cell_size == self.cell_size

    def __hash__(self) -> int:
        return hash((self.crs, self.cell_size))

    # ------------------------------------------------------------------ cells
    def cell_id(self, col: int, row: int) -> str:
        return f"{self.crs}/{self._size_token}/{int(col)}_{int(row)}"

    def cell(self, col: int, row: int) -> Cell:
        s = self.cell_size
        col, row = int(col), int(row)
        return Cell(self.cell_id(col, row), col, row, (col * s, row * s, (col + 1) * s, (row + 1) * s), self.crs)

    def cell_indices(self, x, y) -> tuple:
        """Vectorised ``(col, row)`` int64 arrays of the cells holding points ``(x, y)`` (grid CRS)."""
        s = self.cell_size
        return (np.floor(np.asarray(x, dtype=np.float64) / s).astype(np.int64),
                np.floor(np.asarray(y, dtype=np.float64) / s).astype(np.int64))

    def ranges_of_bounds(self, bounds: Sequence[float]) -> tuple:
        """``(col0, col1, row0, row1)``, half-open, of the cells meeting ``bounds`` (grid CRS) with an area."""
        bx0, by0, bx1, by1 = (float(v) for v in bounds)
        s = self.cell_size
        col0, row0 = math.floor(bx0 / s), math.floor(by0 / s)
        col1, row1 = max(math.ceil(bx1 / s), col0 + 1), max(math.ceil(by1 / s), row0 + 1)
        return col0, col1, row0, row1

    def bounds_of_ranges(self, ranges: tuple) -> tuple:
        """``(xmin, ymin, xmax, ymax)`` covered by the cells of ``ranges``."""
        col0, col1, row0, row1 = ranges
        s = self.cell_size
        return col0 * s, row0 * s, col1 * s, row1 * s

    def check_count(self, ranges: tuple, limit: int = None,
                    hint: str = "use a smaller extent, a larger cell size, or raise max_cells") -> int:
        """Number of cells of ``ranges``; InputError above ``limit`` (default ``max_cells``),
        ending with ``hint`` (what the user can do)."""
        col0, col1, row0, row1 = ranges
        n = (col1 - col0) * (row1 - row0)
        limit = self.max_cells if limit is None else int(limit)
        if n > limit:
            w_km = (col1 - col0) * self.cell_size / 1000
            h_km = (row1 - row0) * self.cell_size / 1000
            raise InputError(f"extent is too large: about {n:,} cells ({col1 - col0:,} x {row1 - row0:,}, "
                             f"{w_km:,.1f} x {h_km:,.1f} km) of {self.cell_size:g} m, more than the limit of "
                             f"{limit:,}; {hint}")
        return n

    def cells_of_ranges(self, ranges: tuple) -> Iterator[Cell]:
        """Cells of ``ranges`` north-west first, row by row (streams; no list built)."""
        col0, col1, row0, row1 = ranges
        for row in range(row1 - 1, row0 - 1, -1):
            for col in range(col0, col1):
                yield self.cell(col, row)

    def blocks(self, ranges: tuple, block_cells: int) -> Iterator[tuple]:
        """``ranges`` cut into rectangular blocks of at most about ``block_cells`` cells.

        A block is ``(col0, col1, row0, row1)``: whole rows (north first) when a row fits in a
        block, else one row cut into runs of ``block_cells`` columns. Either way the blocks' cells,
        read block after block, are in the same north-west, row-by-row order as
        :meth:`cells_of_ranges`, and each block is a rectangle (one bounded read of POIs and of
        imagery per block; the unit of sharding).
        """
        col0, col1, row0, row1 = ranges
        ncols = max(1, col1 - col0)
        per = max(1, int(block_cells))
        rows_per = max(1, per // ncols)
        step = ncols if rows_per > 1 or per >= ncols else per
        for top in range(row1, row0, -rows_per):
            bottom = max(row0, top - rows_per)
            for c in range(col0, col1, step):
                yield c, min(col1, c + step), bottom, top


class Grid(CellGrid):
    """Square cells of ``cell_size`` metres in a metric CRS, snapped to the CRS origin.

    Args:
        crs: the grid's projected, metre-based CRS with an EPSG code (``"EPSG:32650"``).
        cell_size: side of a cell in metres (paper: 256).
        max_cells: an extent that would produce more cells raises InputError (guards against a
            continent-sized extent or a wrong unit).
    """

    def __init__(self, crs="EPSG:32650", cell_size: float = DEFAULT_CELL_SIZE, max_cells: int = DEFAULT_MAX_CELLS):
        c = parse_crs(crs, "grid CRS")
        if not c.is_projected:
            raise InputError(f"grid CRS {c.name!r} is not projected (cells need metres); use "
                             "Grid.for_extent(extent, extent_crs) to pick the UTM zone automatically")
        if not _is_metric(c):
            unit = c.axis_info[0].unit_name if c.axis_info else "unknown"
            raise InputError(f"grid CRS {c.name!r} has units {unit!r}; choose a CRS in metres (e.g. UTM)")
        super().__init__(crs_string(c), cell_size, max_cells)
        self._crs = c
        self.epsg = int(self.crs.split(":")[1])

    @property
    def pyproj_crs(self):
        return self._crs

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_extent(cls, extent: Sequence[float], extent_crs=None, cell_size: float = DEFAULT_CELL_SIZE,
                   max_cells: int = DEFAULT_MAX_CELLS) -> "Grid":
        """The grid for an extent: its own CRS when metric, else the UTM zone of its centre.

        ``extent_crs=None`` is refused: with lon/lat-looking numbers the message says to pass
        ``EPSG:4326``; otherwise it asks for the CRS the numbers are in.
        """
        xmin, ymin, xmax, ymax = _check_extent(extent)
        if extent_crs is None:
            if looks_like_lonlat(xmin, ymin, xmax, ymax):
                raise InputError(f"extent ({xmin}, {ymin}, {xmax}, {ymax}) looks like longitude/latitude but no "
                                 "CRS was given; append the CRS (e.g. ...,EPSG:4326)")
            raise InputError(f"extent ({xmin}, {ymin}, {xmax}, {ymax}) has no CRS; append one "
                             "(e.g. ...,EPSG:32650)")
        c = parse_crs(extent_crs, "extent CRS")
        _check_order(xmin, ymin, xmax, ymax, geographic=c.is_geographic)
        if c.is_projected and c.to_epsg() is not None and _is_metric(c):
            grid = cls(c, cell_size, max_cells)
        else:  # lon/lat, or a projected CRS without EPSG code or metres: the UTM zone of the centre
            lon, lat = _geographic_centre(c, xmin, ymin, xmax, ymax)
            grid = cls(utm_crs_for_lonlat(lon, lat), cell_size, max_cells)
        grid.count_cells(xmin, ymin, xmax, ymax, extent_crs=c)  # validates order and size early
        return grid

    # ------------------------------------------------------------------ cells
    def cell_from_id(self, cell_id: str) -> Cell:
        m = _ID_RE.match(cell_id or "")
        if not m:
            raise InputError(f"cell id {cell_id!r} is not of the form 'EPSG:<code>/<size>/<col>_<row>'")
        code, size, col, row = m.groups()
        if int(code) != self.epsg or float(size) != self.cell_size:
            raise InputError(f"cell id {cell_id!r} belongs to another grid than {self!r}")
        return self.cell(int(col), int(row))

    def to_grid_bounds(self, xmin, ymin, xmax, ymax, extent_crs=None) -> tuple:
        """An extent in ``extent_crs`` (None = the grid CRS) as bounds in the grid CRS."""
        xmin, ymin, xmax, ymax = _check_extent((xmin, ymin, xmax, ymax))
        if extent_crs is None:
            _check_order(xmin, ymin, xmax, ymax, geographic=False)
            # UTM eastings lie within about 160-840 km: numbers within +-180 are degrees by mistake.
            if self._crs.utm_zone and looks_like_lonlat(xmin, ymin, xmax, ymax):
                raise InputError(f"extent ({xmin}, {ymin}, {xmax}, {ymax}) looks like longitude/latitude, not "
                                 f"{self.crs} metres; pass extent_crs='EPSG:4326'")
            return xmin, ymin, xmax, ymax
        c = parse_crs(extent_crs, "extent CRS")
        _check_order(xmin, ymin, xmax, ymax, geographic=c.is_geographic)
        if c == self._crs:
            return xmin, ymin, xmax, ymax
        import pyproj

        t = pyproj.Transformer.from_crs(c, self._crs, always_xy=True)
        b = t.transform_bounds(xmin, ymin, xmax, ymax, densify_pts=21)
        if not all(math.isfinite(v) for v in b):
            raise InputError(f"extent ({xmin}, {ymin}, {xmax}, {ymax}) in {c.name} cannot be projected to "
                             f"{self.crs}; use a smaller extent or another grid CRS")
        return tuple(float(v) for v in b)

    def index_ranges(self, xmin, ymin, xmax, ymax, extent_crs=None) -> tuple:
        """``(col0, col1, row0, row1)``, half-open, of the cells intersecting the extent with an area."""
        return self.ranges_of_bounds(self.to_grid_bounds(xmin, ymin, xmax, ymax, extent_crs))

    def count_cells(self, xmin, ymin, xmax, ymax, extent_crs=None) -> int:
        """Number of cells covering the extent; InputError above ``max_cells``."""
        return self.check_count(self.index_ranges(xmin, ymin, xmax, ymax, extent_crs))

    def iter_cells(self, xmin, ymin, xmax, ymax, extent_crs=None) -> Iterator[Cell]:
        """Cells covering the extent, row by row from the north-west (streams; no list built)."""
        self.count_cells(xmin, ymin, xmax, ymax, extent_crs)
        yield from self.cells_of_ranges(self.index_ranges(xmin, ymin, xmax, ymax, extent_crs))

    def cells_for_extent(self, xmin, ymin, xmax, ymax, extent_crs=None) -> list:
        """All cells that intersect the extent (with an area), north-west first, row by row."""
        return list(self.iter_cells(xmin, ymin, xmax, ymax, extent_crs))


def _is_metric(c) -> bool:
    return bool(c.axis_info) and all(a.unit_name in ("metre", "meter") for a in c.axis_info[:2])


def _geographic_centre(c, xmin, ymin, xmax, ymax) -> tuple:
    """Centre (lon, lat) of an extent in any CRS (``c``'s own datum is converted to WGS 84)."""
    import pyproj

    cx, cy = (xmin + xmax) / 2.0, (ymin + ymax) / 2.0
    wgs84 = pyproj.CRS.from_epsg(4326)
    if c == wgs84:
        return cx, cy
    lon, lat = pyproj.Transformer.from_crs(c, wgs84, always_xy=True).transform(cx, cy)
    return float(lon), float(lat)
