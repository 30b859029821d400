"""QGIS layers as inputs of the one analysis path: thread-safe snapshots, extent checks, grid CRS.

* :class:`PoiInput` / :class:`ImageryInput`: snapshots of a POI layer (any vector provider) and an
  imagery layer (any raster provider, rendered by QGIS), taken on the main thread, read in a
  worker thread by :class:`refound_qgis.sources.QgisCellSource`.
* :func:`validate_extent`, :func:`grid_crs_for_extent`: an extent the grid can use, and the grid
  CRS by the core rule (the extent's own when it is an EPSG CRS in true metres, else the UTM
  zone of its centre), computed with QGIS's own transforms (pyproj is optional in QGIS).

The grid itself (ids, bounds, blocks) is ``refound_core.data.grid``'s; nothing here repeats it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsCsException,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsUnitTypes,
    QgsVectorLayer,
    QgsVectorLayerFeatureSource,
    QgsWkbTypes,
)

from refound_core.data import grid as core_grid
from refound_core.errors import InputError

from .settings import tr

# Pixels rendered per block: bounds the memory of one render (2048 x 2048 RGBA = 16 MiB).
MAX_BLOCK_PIXELS = 2048
# CRSs in metres whose scale is far from true on the ground: a 256 "m" cell would not be 256 m.
_DISTORTED_PROJECTIONS = ("merc",)
MAX_CELLS_HINT = "zoom in, use larger cells, or raise the cell limit ('Cell limit' in the ReFound panel, MAX_CELLS in Processing)"


# ---------------------------------------------------------------------------------------- grid
def _is_metric_epsg(crs: QgsCoordinateReferenceSystem) -> bool:
    if crs.isGeographic() or crs.mapUnits() != QgsUnitTypes.DistanceUnit.DistanceMeters:
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


def locate_extent(extent: QgsRectangle, extent_crs: QgsCoordinateReferenceSystem, cell_size: float,
                  transform_context: Optional[QgsCoordinateTransformContext] = None) -> tuple:
    """``(grid CRS authid, (xmin, ymin, xmax, ymax) in it)`` of an extent, after validation."""
    crs_authid, box, _ = _grid_box(extent, extent_crs, cell_size, transform_context)
    return crs_authid, (box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())


@dataclass
class CellPlan:
    """The cells of an extent as the core grid (``refound_core.data.grid.CellGrid``) lists them,
    north-west first, row by row; for the region-grid algorithm and the labels of a head."""

    crs_authid: str
    cell_size: float
    cells: list

    @property
    def crs(self) -> QgsCoordinateReferenceSystem:
        return QgsCoordinateReferenceSystem(self.crs_authid)

    def __len__(self) -> int:
        return len(self.cells)


def plan_grid(extent: QgsRectangle, extent_crs: QgsCoordinateReferenceSystem, cell_size: float,
              transform_context: Optional[QgsCoordinateTransformContext] = None,
              max_cells: int = 20000) -> CellPlan:
    """The cells of the core grid meeting ``extent``; InputError for an unusable extent or more
    than ``max_cells`` cells (the message gives the count and what to do)."""
    crs_authid, bounds = locate_extent(extent, extent_crs, cell_size, transform_context)
    grid = core_grid.CellGrid(crs_authid, cell_size)
    ranges = grid.ranges_of_bounds(bounds)
    grid.check_count(ranges, max_cells, tr(MAX_CELLS_HINT))
    return CellPlan(crs_authid, grid.cell_size, list(grid.cells_of_ranges(ranges)))


def count_cells(extent: QgsRectangle, extent_crs: QgsCoordinateReferenceSystem, cell_size: float,
                transform_context: Optional[QgsCoordinateTransformContext] = None) -> tuple:
    """``(number of cells, grid CRS authid)`` of an extent, without building the cells."""
    crs_authid, bounds = locate_extent(extent, extent_crs, cell_size, transform_context)
    grid = core_grid.CellGrid(crs_authid, cell_size)
    return grid.check_count(grid.ranges_of_bounds(bounds), limit=2 ** 62), crs_authid


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
        if layer.geometryType() != QgsWkbTypes.GeometryType.PointGeometry:
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


def text_of(value) -> str:
    if value is None:
        return ""
    try:  # QVariant NULL (PyQGIS 3.22 hands it back for missing attributes)
        if hasattr(value, "isNull") and value.isNull():
            return ""
    except TypeError:
        pass
    text = str(value)
    return "" if text == "NULL" else text


def points_of(geom) -> list:
    if geom is None or geom.isNull() or geom.isEmpty():
        return []
    if geom.type() != QgsWkbTypes.GeometryType.PointGeometry:
        p = geom.centroid().asPoint()
        return [(p.x(), p.y())]
    if geom.isMultipart():
        return [(p.x(), p.y()) for p in geom.asMultiPoint()]
    p = geom.asPoint()
    return [(p.x(), p.y())]


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
