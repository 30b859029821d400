"""QGIS layers -> :class:`refound_core.data.sample.RegionSample` (the only data contract).

Three steps, each usable from the dock's QgsTask and from the Processing algorithms:

1. :func:`plan_grid` turns an extent (the map canvas extent in the project CRS, or a Processing
   extent parameter) into the cells of the core grid (``refound_core.data.grid``): square cells of
   ``cell_size`` metres snapped to the metric CRS's own origin, so ids and bounds never depend on
   where the user panned (paper 5.1.1: 256 m regions). The reprojection uses QGIS's own
   QgsCoordinateTransform; the snapping arithmetic is the core's (pyproj is optional in QGIS).
2. :func:`read_pois` reads the POI layer with one spatial feature request, reprojected to the
   grid CRS by QGIS, and bins the POIs into cells.
3. :func:`read_image_chips` renders the imagery layer through QGIS's own renderer (what the user
   sees: band choice, stretch, nodata and transparency) for blocks of cells in the grid CRS, at
   ``chip_size`` pixels per cell, and cuts one chip per cell; coverage = share of opaque pixels.

Thread rule: everything that touches a *project* layer happens in :meth:`PoiInput.from_layer` /
:meth:`ImageryInput.from_layer` on the main thread (a feature source snapshot, a renderer clone);
the readers then run in a worker thread on those snapshots only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsCsException,
    QgsFeatureRequest,
    QgsMapRendererCustomPainterJob,
    QgsMapSettings,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsUnitTypes,
    QgsVectorLayer,
    QgsVectorLayerFeatureSource,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter

from refound_core.data import grid as core_grid
from refound_core.data.sample import RegionSample
from refound_core.errors import InputError

from .settings import tr

# Pixels rendered per block: bounds the memory of one render (2048 x 2048 RGBA = 16 MiB).
MAX_BLOCK_PIXELS = 2048
# CRSs in metres whose scale is far from true on the ground: a 256 "m" cell would not be 256 m.
_DISTORTED_PROJECTIONS = ("merc",)


# ---------------------------------------------------------------------------------------- grid
@dataclass
class GridPlan:
    """The cells to analyse: ids and bounds from the core grid, in one metric CRS."""

    crs_authid: str
    cell_size: float
    cells: list  # list[refound_core.data.grid.Cell], north-west first, row by row
    col_range: tuple  # (col0, col1) half-open
    row_range: tuple  # (row0, row1) half-open

    @property
    def crs(self) -> QgsCoordinateReferenceSystem:
        return QgsCoordinateReferenceSystem(self.crs_authid)

    @property
    def extent(self) -> QgsRectangle:
        s = self.cell_size
        return QgsRectangle(self.col_range[0] * s, self.row_range[0] * s, self.col_range[1] * s, self.row_range[1] * s)

    def __len__(self) -> int:
        return len(self.cells)

    def row_blocks(self, max_cells: int) -> Iterator["GridPlan"]:
        """The plan cut into sub-plans of whole rows (north first), about ``max_cells`` cells each."""
        ncols = max(1, self.col_range[1] - self.col_range[0])
        rows_per = max(1, int(max_cells) // ncols)
        row0, row1 = self.row_range
        for top in range(row1, row0, -rows_per):
            bottom = max(row0, top - rows_per)
            cells = [c for c in self.cells if bottom <= c.row < top]
            yield GridPlan(self.crs_authid, self.cell_size, cells, self.col_range, (bottom, top))


class _GridArithmetic:
    """The core grid's cells (``refound_core.data.grid.Grid``) by its own arithmetic, without pyproj.

    ``Grid`` validates its CRS with pyproj; inside QGIS the CRS is QGIS's business, and pyproj
    (a second PROJ) crashed when first used from a QgsTask worker thread. The arithmetic is the
    core's: ``col = floor(x / s)``, bounds ``col * s ...``, id ``"<crs>/<s:g>/<col>_<row>"``; a
    test checks ids and bounds are identical to ``Grid``'s.
    """

    def __init__(self, crs_authid: str, cell_size: float):
        self.crs = crs_authid
        self.cell_size = float(cell_size)
        self._size_token = f"{self.cell_size:g}"

    def cell_id(self, col: int, row: int) -> str:
        return f"{self.crs}/{self._size_token}/{int(col)}_{int(row)}"

    def cell(self, col: int, row: int):
        s = self.cell_size
        col, row = int(col), int(row)
        return core_grid.Cell(self.cell_id(col, row), col, row, (col * s, row * s, (col + 1) * s, (row + 1) * s), self.crs)


def make_grid(crs_authid: str, cell_size: float) -> _GridArithmetic:
    return _GridArithmetic(crs_authid, cell_size)


def _is_metric_epsg(crs: QgsCoordinateReferenceSystem) -> bool:
    if crs.isGeographic() or crs.mapUnits() != QgsUnitTypes.DistanceMeters:
        return False
    if not crs.authid().upper().startswith("EPSG:"):
        return False
    proj = crs.toProj() or ""
    return not any(f"+proj={p} " in proj + " " for p in _DISTORTED_PROJECTIONS)


def grid_crs_for_extent(extent: QgsRectangle, extent_crs: QgsCoordinateReferenceSystem,
                        transform_context: QgsCoordinateTransformContext) -> str:
    """The grid CRS: the extent's own when it is an EPSG CRS in true metres, else the UTM zone
    of the extent's centre (the core rule, ``Grid.for_extent``). Mercator-type CRSs (web maps'
    EPSG:3857) are in metres only at the equator, so they get UTM too (docs/PLUGIN.md)."""
    if _is_metric_epsg(extent_crs):
        return extent_crs.authid()
    centre = extent.center()
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    try:
        lonlat = QgsCoordinateTransform(extent_crs, wgs84, transform_context).transform(centre)
    except QgsCsException:
        raise InputError(tr("The centre of the extent cannot be converted to longitude/latitude; "
                            "set a valid project CRS.")) from None
    return core_grid.utm_crs_for_lonlat(lonlat.x(), lonlat.y())


def validate_extent(extent: QgsRectangle, extent_crs: QgsCoordinateReferenceSystem) -> None:
    """One actionable InputError for an extent the grid cannot use."""
    if extent is None or extent.isNull() or extent.isEmpty() or not (extent.width() > 0 and extent.height() > 0):
        raise InputError(tr("The extent to analyse is empty; zoom the map to an area (or give an extent "
                            "with a width and a height)."))
    vals = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
    if not all(math.isfinite(v) for v in vals):
        raise InputError(tr("The extent to analyse is not finite; zoom the map to an area."))
    if not extent_crs.isValid():
        raise InputError(tr("The extent has no valid CRS; set the project CRS (Project > Properties > CRS)."))
    if extent_crs.isGeographic():
        if extent.xMinimum() < -180.0 or extent.xMaximum() > 180.0:
            raise InputError(tr("The extent crosses the antimeridian (longitude beyond +/-180 degrees); "
                                "analyse each side of 180 degrees separately."))
        if extent.yMinimum() < -90.0 or extent.yMaximum() > 90.0:
            raise InputError(tr("The extent reaches beyond the poles (latitude beyond +/-90 degrees); "
                                "zoom in to a city."))


def _grid_box(extent, extent_crs, cell_size, transform_context):
    """(grid CRS authid, extent in the grid CRS, cell size) after validation."""
    validate_extent(extent, extent_crs)
    try:
        cell_size = float(cell_size)
    except (TypeError, ValueError):
        cell_size = float("nan")
    if not (cell_size > 0 and math.isfinite(cell_size)):
        raise InputError(tr("The cell size must be a positive number of metres (paper: 256)."))
    ctx = transform_context or QgsProject.instance().transformContext()
    crs_authid = grid_crs_for_extent(extent, extent_crs, ctx)
    grid_crs = QgsCoordinateReferenceSystem(crs_authid)
    if grid_crs == extent_crs:
        box = QgsRectangle(extent)
    else:
        try:
            box = QgsCoordinateTransform(extent_crs, grid_crs, ctx).transformBoundingBox(extent)
        except QgsCsException:
            box = QgsRectangle()
    if box.isEmpty() or not all(math.isfinite(v) for v in (box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())):
        raise InputError(tr("The extent cannot be projected to {crs}; zoom in to a smaller area.").format(crs=crs_authid))
    return crs_authid, box, cell_size


def _index_ranges(box: QgsRectangle, s: float) -> tuple:
    # Same half-open index ranges as Grid.index_ranges (floor / ceil on the CRS origin).
    col0, row0 = math.floor(box.xMinimum() / s), math.floor(box.yMinimum() / s)
    col1 = max(math.ceil(box.xMaximum() / s), col0 + 1)
    row1 = max(math.ceil(box.yMaximum() / s), row0 + 1)
    return col0, col1, row0, row1


def count_cells(extent: QgsRectangle, extent_crs: QgsCoordinateReferenceSystem, cell_size: float,
                transform_context: Optional[QgsCoordinateTransformContext] = None) -> tuple:
    """``(number of cells, grid CRS authid)`` of an extent, without building the cells."""
    crs_authid, box, s = _grid_box(extent, extent_crs, cell_size, transform_context)
    col0, col1, row0, row1 = _index_ranges(box, s)
    return (col1 - col0) * (row1 - row0), crs_authid


def plan_grid(extent: QgsRectangle, extent_crs: QgsCoordinateReferenceSystem, cell_size: float,
              transform_context: Optional[QgsCoordinateTransformContext] = None,
              max_cells: int = 20000) -> GridPlan:
    """The cells of the fixed grid that intersect ``extent`` (given in ``extent_crs``).

    Raises InputError for an empty extent, one across the antimeridian, a bad cell size, or more
    than ``max_cells`` cells (the message gives the count, so the user can zoom or enlarge cells).
    """
    crs_authid, box, s = _grid_box(extent, extent_crs, cell_size, transform_context)
    col0, col1, row0, row1 = _index_ranges(box, s)
    n = (col1 - col0) * (row1 - row0)
    if n > max_cells:
        raise InputError(tr("The extent holds {n} cells of {size} m ({w} x {h}), more than the limit of {limit}; "
                            "zoom in, use a larger cell size, or raise the limit in the settings.")
                         .format(n=f"{n:,}", size=f"{s:g}", w=col1 - col0, h=row1 - row0, limit=f"{max_cells:,}"))
    grid = make_grid(crs_authid, s)
    cells = [grid.cell(c, r) for r in range(row1 - 1, row0 - 1, -1) for c in range(col0, col1)]
    return GridPlan(crs_authid, s, cells, (col0, col1), (row0, row1))


# ---------------------------------------------------------------------------------------- POIs
@dataclass
class PoiInput:
    """A thread-safe snapshot of a POI layer and its field mapping.

    ``source`` is a QgsAbstractFeatureSource (QgsVectorLayerFeatureSource of a layer, or the
    QgsProcessingFeatureSource Processing hands over): safe to iterate in a worker thread.
    """

    source: object
    crs: QgsCoordinateReferenceSystem
    name_field: str
    category_field: str
    field_names: list
    layer_name: str = "POIs"

    @classmethod
    def from_layer(cls, layer: QgsVectorLayer, name_field: str, category_field: str) -> "PoiInput":
        """Snapshot of a project layer (main thread). InputError when it is not a usable POI layer."""
        if layer is None or not isinstance(layer, QgsVectorLayer) or not layer.isValid():
            raise InputError(tr("No POI layer is selected; add a point layer of POIs to the project and pick it "
                                "in the ReFound panel."))
        if layer.geometryType() != QgsWkbTypes.PointGeometry:
            raise InputError(tr("The POI layer '{name}' is not a point layer; pick a layer of POI points.")
                             .format(name=layer.name()))
        return cls.from_source(QgsVectorLayerFeatureSource(layer), layer.crs(), layer.fields(),
                               name_field, category_field, layer.name())

    @classmethod
    def from_source(cls, source, crs, fields, name_field: str, category_field: str, layer_name: str = "POIs"):
        names = [f.name() for f in fields]
        for role, fname in ((tr("name"), name_field), (tr("category"), category_field)):
            if not fname:
                raise InputError(tr("No {role} field is chosen for the POI layer '{layer}'; pick one of: {fields}.")
                                 .format(role=role, layer=layer_name, fields=", ".join(names)))
            if fname not in names:
                raise InputError(tr("The POI layer '{layer}' has no field '{field}'; pick one of: {fields}.")
                                 .format(layer=layer_name, field=fname, fields=", ".join(names)))
        return cls(source, QgsCoordinateReferenceSystem(crs), name_field, category_field, names, layer_name)


def _text(value) -> str:
    if value is None:
        return ""
    try:  # QVariant NULL (PyQGIS 3.22 hands it back for missing attributes)
        if hasattr(value, "isNull") and value.isNull():
            return ""
    except TypeError:
        pass
    text = str(value)
    return "" if text == "NULL" else text


def _points(geom) -> list:
    if geom is None or geom.isNull() or geom.isEmpty():
        return []
    if geom.type() != QgsWkbTypes.PointGeometry:
        p = geom.centroid().asPoint()
        return [(p.x(), p.y())]
    if geom.isMultipart():
        return [(p.x(), p.y()) for p in geom.asMultiPoint()]
    p = geom.asPoint()
    return [(p.x(), p.y())]


@dataclass
class CellPois:
    names: list = field(default_factory=list)
    categories: list = field(default_factory=list)
    xy: list = field(default_factory=list)


def read_pois(pois: PoiInput, plan: GridPlan, transform_context: Optional[QgsCoordinateTransformContext] = None,
              is_canceled: Callable[[], bool] = lambda: False) -> dict:
    """POIs binned into the plan's cells: ``{cell_id: CellPois}`` with coordinates in the grid CRS.

    One feature request with a spatial filter; QGIS reprojects geometries to the grid CRS (the
    filter rectangle is then in the grid CRS too, QgsFeatureRequest.setDestinationCrs).
    """
    ctx = transform_context or QgsProject.instance().transformContext()
    name_idx = pois.field_names.index(pois.name_field)
    cat_idx = pois.field_names.index(pois.category_field)
    req = QgsFeatureRequest()
    req.setDestinationCrs(plan.crs, ctx)
    req.setFilterRect(plan.extent)
    req.setSubsetOfAttributes([name_idx, cat_idx])
    grid = make_grid(plan.crs_authid, plan.cell_size)
    s = plan.cell_size
    col0, col1 = plan.col_range
    row0, row1 = plan.row_range
    out: dict = {}
    for i, feat in enumerate(pois.source.getFeatures(req)):
        if i % 2048 == 0 and is_canceled():
            break
        name, cat = _text(feat.attribute(name_idx)), _text(feat.attribute(cat_idx))
        for x, y in _points(feat.geometry()):
            col, row = math.floor(x / s), math.floor(y / s)  # the core grid's cell_indices
            if not (col0 <= col < col1 and row0 <= row < row1):
                continue
            cp = out.setdefault(grid.cell_id(col, row), CellPois())
            cp.names.append(name)
            cp.categories.append(cat)
            cp.xy.append((x, y))
    return out


# ---------------------------------------------------------------------------------------- imagery
@dataclass
class ImageryInput:
    """A thread-safe description of an imagery layer: source, provider, CRS and a renderer clone.

    The worker builds its own QgsRasterLayer from these (never touching the project's layer).
    """

    source: str
    provider: str
    crs: QgsCoordinateReferenceSystem
    extent: QgsRectangle
    renderer: object  # QgsRasterRenderer clone, or None for the provider's default
    layer_name: str = "imagery"

    @classmethod
    def from_layer(cls, layer: QgsRasterLayer) -> "ImageryInput":
        if layer is None or not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            raise InputError(tr("The imagery layer is not a valid raster layer; pick another layer or none."))
        renderer = layer.renderer().clone() if layer.renderer() is not None else None
        return cls(layer.source(), layer.providerType(), QgsCoordinateReferenceSystem(layer.crs()),
                   QgsRectangle(layer.extent()), renderer, layer.name())

    def make_layer(self) -> QgsRasterLayer:
        layer = QgsRasterLayer(self.source, self.layer_name, self.provider)
        if not layer.isValid():
            raise InputError(tr("The imagery layer '{name}' cannot be opened from {src}.")
                             .format(name=self.layer_name, src=self.source))
        if self.renderer is not None:
            layer.setRenderer(self.renderer.clone())
        return layer


def imagery_extent_in(imagery: ImageryInput, crs: QgsCoordinateReferenceSystem,
                      transform_context: QgsCoordinateTransformContext) -> Optional[QgsRectangle]:
    if imagery.crs == crs:
        return QgsRectangle(imagery.extent)
    try:
        return QgsCoordinateTransform(imagery.crs, crs, transform_context).transformBoundingBox(imagery.extent)
    except QgsCsException:
        return None


def check_imagery_covers(imagery: ImageryInput, plan: GridPlan,
                         transform_context: Optional[QgsCoordinateTransformContext] = None) -> None:
    """InputError when the imagery does not overlap the analysed extent at all.

    Partial cover is fine: uncovered cells get ``image_coverage`` 0 and are flagged insufficient.
    """
    ctx = transform_context or QgsProject.instance().transformContext()
    ext = imagery_extent_in(imagery, plan.crs, ctx)
    if ext is None or not ext.intersects(plan.extent) or ext.intersect(plan.extent).isEmpty():
        raise InputError(tr("The imagery layer '{name}' does not cover the extent to analyse; pan the map to the "
                            "imagery, or pick another imagery layer (or none for a POI-only analysis).")
                         .format(name=imagery.layer_name))


def qimage_to_rgba(img: QImage) -> np.ndarray:
    """``uint8 [H, W, 4]`` RGBA copy of a QImage (non-premultiplied)."""
    img = img.convertToFormat(QImage.Format_RGBA8888)
    w, h, bpl = img.width(), img.height(), img.bytesPerLine()
    ptr = img.constBits()
    ptr.setsize(h * bpl)
    arr = np.frombuffer(ptr, dtype=np.uint8).reshape(h, bpl)[:, : w * 4].reshape(h, w, 4)
    return arr.copy()


def render_block(layer: QgsRasterLayer, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                 width: int, height: int, transform_context: QgsCoordinateTransformContext) -> np.ndarray:
    """Render ``layer`` over ``extent`` (in ``crs``) to ``uint8 [height, width, 4]`` RGBA.

    Transparent pixels = no data (outside the raster, nodata values, transparent renderer output).
    """
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(crs)
    settings.setTransformContext(transform_context)
    settings.setOutputSize(QSize(width, height))
    settings.setExtent(extent)
    settings.setBackgroundColor(QColor(0, 0, 0, 0))
    settings.setOutputImageFormat(QImage.Format_ARGB32)
    settings.setFlag(QgsMapSettings.Antialiasing, False)
    settings.setFlag(QgsMapSettings.DrawLabeling, False)
    image = QImage(width, height, QImage.Format_ARGB32)
    image.fill(Qt.transparent)
    painter = QPainter(image)
    try:
        job = QgsMapRendererCustomPainterJob(settings, painter)
        job.renderSynchronously()
    finally:
        painter.end()
    return qimage_to_rgba(image)


def read_image_chips(imagery: ImageryInput, plan: GridPlan, chip_size: int,
                     transform_context: Optional[QgsCoordinateTransformContext] = None,
                     is_canceled: Callable[[], bool] = lambda: False,
                     progress: Callable[[float], None] = lambda p: None) -> Iterator[tuple]:
    """Yield ``(cell_id, rgb uint8 [chip, chip, 3] or None, coverage)`` for every cell of the plan.

    Cells are rendered in blocks of whole cells (at most MAX_BLOCK_PIXELS a side) so a pixel of a
    chip is exactly the cell's share of the rendered block: no seams, no resampling twice.
    """
    ctx = transform_context or QgsProject.instance().transformContext()
    chip = int(chip_size)
    s = plan.cell_size
    per_block = max(1, MAX_BLOCK_PIXELS // chip)
    col0, col1 = plan.col_range
    row0, row1 = plan.row_range
    cover = imagery_extent_in(imagery, plan.crs, ctx)
    grid = make_grid(plan.crs_authid, s)
    layer = imagery.make_layer()
    try:
        total = max(1, len(plan))
        done = 0
        for br1 in range(row1, row0, -per_block):  # north first, like the plan's cells
            br0 = max(row0, br1 - per_block)
            for bc0 in range(col0, col1, per_block):
                if is_canceled():
                    return
                bc1 = min(col1, bc0 + per_block)
                ext = QgsRectangle(bc0 * s, br0 * s, bc1 * s, br1 * s)
                ncols, nrows = bc1 - bc0, br1 - br0
                rgba = None
                if cover is not None and cover.intersects(ext) and not cover.intersect(ext).isEmpty():
                    rgba = render_block(layer, ext, plan.crs, ncols * chip, nrows * chip, ctx)
                for r in range(br1 - 1, br0 - 1, -1):
                    y0 = (br1 - 1 - r) * chip  # image row 0 = north edge
                    for c in range(bc0, bc1):
                        cid = grid.cell_id(c, r)
                        if rgba is None:
                            yield cid, None, 0.0
                            continue
                        x0 = (c - bc0) * chip
                        px = rgba[y0:y0 + chip, x0:x0 + chip]
                        valid = px[..., 3] >= 128
                        coverage = float(valid.mean())
                        if coverage <= 0.0:
                            yield cid, None, 0.0
                            continue
                        rgb = np.where(valid[..., None], px[..., :3], 0).astype(np.uint8)
                        yield cid, np.ascontiguousarray(rgb), coverage
                done += ncols * nrows
                progress(done / total)
    finally:
        del layer


# ---------------------------------------------------------------------------------------- samples
def build_samples(plan: GridPlan, pois: Optional[PoiInput], imagery: Optional[ImageryInput], chip_size: int,
                  transform_context: Optional[QgsCoordinateTransformContext] = None,
                  is_canceled: Callable[[], bool] = lambda: False,
                  progress: Callable[[float], None] = lambda p: None, binned: Optional[dict] = None) -> list:
    """One RegionSample per planned cell (same order as ``plan.cells``); [] when canceled.

    ``binned``: POIs already read with :func:`read_pois` (then ``pois`` is not read again).
    """
    ctx = transform_context or QgsProject.instance().transformContext()
    if binned is None:
        binned = read_pois(pois, plan, ctx, is_canceled) if pois is not None else {}
    if is_canceled():
        return []
    progress(0.1)
    images: dict = {}
    if imagery is not None:  # (coverage of the whole extent is checked by the caller: check_imagery_covers)
        for cid, rgb, cov in read_image_chips(imagery, plan, chip_size, ctx, is_canceled,
                                              lambda f: progress(0.1 + 0.9 * f)):
            images[cid] = (rgb, cov)
        if is_canceled():
            return []
    samples = []
    for cell in plan.cells:
        cp = binned.get(cell.id)
        rgb, cov = images.get(cell.id, (None, 0.0))
        samples.append(RegionSample(
            cell_id=cell.id, bounds=tuple(float(v) for v in cell.bounds), crs=plan.crs_authid,
            poi_names=list(cp.names) if cp else [],
            poi_categories=list(cp.categories) if cp else [],
            poi_xy=np.asarray(cp.xy, dtype=np.float64).reshape(-1, 2) if cp else np.zeros((0, 2), np.float64),
            image=rgb, image_coverage=float(cov)))
    progress(1.0)
    return samples
