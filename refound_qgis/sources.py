"""QGIS layers as a :class:`refound_core.inference.sources.CellSource`.

:class:`QgisCellSource` answers the core's three questions with QGIS: where the extent lies in
the grid (QGIS's transforms pick and reach the grid CRS), and, block by block of cells handed
over by ``run_analysis``, which POIs fall in each cell (one spatial feature request per block,
reprojected by QGIS) and what the imagery looks like there (rendered through QGIS's own
renderer: band choice, stretch, nodata and transparency as the user sees them; coverage = share
of opaque pixels). The grid, the blocks and their order are the core's.

Thread rule: only the snapshots of :mod:`refound_qgis.layer_io` (taken on the main thread) are
read here; ``read_block`` runs in the pipeline's prefetch thread and makes its own raster layer.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsFeatureRequest,
    QgsMapRendererCustomPainterJob,
    QgsMapSettings,
    QgsProject,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter

from refound_core.data.sample import RegionSample
from refound_core.errors import InputError
from refound_core.inference.sources import CellSource, GridFrame

from . import layer_io
from .settings import tr

# Pixels rendered at once: bounds the memory of one render (2048 x 2048 RGBA = 16 MiB).
MAX_BLOCK_PIXELS = 2048


def qimage_to_rgba(img: QImage) -> np.ndarray:
    """``uint8 [H, W, 4]`` RGBA copy of a QImage (non-premultiplied)."""
    img = img.convertToFormat(QImage.Format.Format_RGBA8888)
    w, h, bpl = img.width(), img.height(), img.bytesPerLine()
    ptr = img.constBits()
    ptr.setsize(h * bpl)
    arr = np.frombuffer(ptr, dtype=np.uint8).reshape(h, bpl)[:, : w * 4].reshape(h, w, 4)
    return arr.copy()


def render_block(layer, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, width: int, height: int,
                 transform_context: QgsCoordinateTransformContext) -> np.ndarray:
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
    settings.setOutputImageFormat(QImage.Format.Format_ARGB32)
    settings.setFlag(QgsMapSettings.Flag.Antialiasing, False)
    settings.setFlag(QgsMapSettings.Flag.DrawLabeling, False)
    image = QImage(width, height, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    try:
        QgsMapRendererCustomPainterJob(settings, painter).renderSynchronously()
    finally:
        painter.end()
    return qimage_to_rgba(image)


def _union(cells) -> QgsRectangle:
    b = np.array([c.bounds for c in cells], dtype=np.float64)
    return QgsRectangle(b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())


def _tiles(cells: list, per: int):
    """The block's cells in tiles of at most ``per`` x ``per`` cells: ``(tile cells by (col, row),
    cols west first, rows north first)``, so one render covers whole cells (no seams, no
    resampling twice)."""
    cols = list(range(min(c.col for c in cells), max(c.col for c in cells) + 1))
    rows = list(range(max(c.row for c in cells), min(c.row for c in cells) - 1, -1))
    by_index = {(c.col, c.row): c for c in cells}
    for r in range(0, len(rows), per):
        for k in range(0, len(cols), per):
            tc, tr_ = cols[k:k + per], rows[r:r + per]
            tile = {ij: by_index[ij] for ij in ((i, j) for j in tr_ for i in tc) if ij in by_index}
            if tile:
                yield tile, tc, tr_


class QgisCellSource(CellSource):
    """POIs from a :class:`~refound_qgis.layer_io.PoiInput`, imagery from an
    :class:`~refound_qgis.layer_io.ImageryInput` (or none), over a QGIS extent.

    ``keep``: optional ``keep(cell) -> bool``; only those cells are analysed (the seam a polygon
    AOI uses; ``train_task_head`` keeps the labelled cells).
    """

    def __init__(self, pois: Optional[layer_io.PoiInput], imagery: Optional[layer_io.ImageryInput],
                 extent: QgsRectangle, extent_crs: QgsCoordinateReferenceSystem,
                 transform_context: Optional[QgsCoordinateTransformContext] = None,
                 keep: Optional[Callable] = None):
        self.pois, self.imagery = pois, imagery
        self.extent, self.extent_crs = QgsRectangle(extent) if extent is not None else None, extent_crs
        self.ctx = transform_context or QgsProject.instance().transformContext()
        self.keep = keep
        self.grid = None
        self.crs = None
        self.chip = 256
        self._cover: Optional[QgsRectangle] = None

    def locate(self, request) -> GridFrame:
        crs_authid, bounds = layer_io.locate_extent(self.extent, self.extent_crs, request.cell_size, self.ctx)
        return GridFrame(crs_authid, bounds, keep=self.keep)

    def prepare(self, grid, ranges: tuple, image_size: int) -> None:
        self.grid, self.chip = grid, int(image_size)
        self.crs = QgsCoordinateReferenceSystem(grid.crs)
        if self.imagery is None:
            return
        area = QgsRectangle(*grid.bounds_of_ranges(ranges))
        self._cover = layer_io.imagery_extent_in(self.imagery, self.crs, self.ctx)
        if self._cover is None or not self._cover.intersects(area) or self._cover.intersect(area).isEmpty():
            raise InputError(tr("The imagery layer '{name}' does not cover the extent to analyse; pan the map to the "
                                "imagery, or pick another imagery layer (or none for a POI-only analysis).")
                             .format(name=self.imagery.layer_name))

    # ------------------------------------------------------------------ one block
    def read_block(self, cells: list) -> list:
        pois = self._block_pois(cells) if self.pois is not None else {}
        chips = self._block_chips(cells) if self.imagery is not None else {}
        out = []
        for cell in cells:
            names, cats, xy = pois.get(cell.id, ([], [], []))
            rgb, cov, valid = chips.get(cell.id, (None, 0.0, None))
            out.append(RegionSample(cell_id=cell.id, bounds=tuple(float(v) for v in cell.bounds), crs=cell.crs,
                                    poi_names=names, poi_categories=cats,
                                    poi_xy=np.asarray(xy, dtype=np.float64).reshape(-1, 2),
                                    image=rgb, image_coverage=float(cov),
                                    image_valid=valid))
        return out

    def _block_pois(self, cells: list) -> dict:
        """``{cell_id: (names, categories, xy)}``: one feature request over the block, points in
        the grid CRS (QGIS reprojects; the filter rectangle is in the destination CRS)."""
        p = self.pois
        name_idx, cat_idx = p.field_names.index(p.name_field), p.field_names.index(p.category_field)
        req = QgsFeatureRequest()
        req.setDestinationCrs(self.crs, self.ctx)
        req.setFilterRect(_union(cells))
        req.setSubsetOfAttributes([name_idx, cat_idx])
        ids = {(c.col, c.row): c.id for c in cells}
        names, cats, pts = [], [], []
        for feat in p.source.getFeatures(req):
            name, cat = layer_io.text_of(feat.attribute(name_idx)), layer_io.text_of(feat.attribute(cat_idx))
            for x, y in layer_io.points_of(feat.geometry()):
                names.append(name)
                cats.append(cat)
                pts.append((x, y))
        out: dict = {}
        if not pts:
            return out
        xy = np.asarray(pts, dtype=np.float64)
        cols, rows = self.grid.cell_indices(xy[:, 0], xy[:, 1])
        for k, ij in enumerate(zip(cols.tolist(), rows.tolist())):
            cid = ids.get(ij)
            if cid is None:  # on the block's edge, in a neighbouring block's cell
                continue
            entry = out.setdefault(cid, ([], [], []))
            entry[0].append(names[k])
            entry[1].append(cats[k])
            entry[2].append(tuple(xy[k]))
        return out

    def _block_chips(self, cells: list) -> dict:
        """``{cell_id: (rgb uint8 [chip, chip, 3], coverage, valid mask or None when all valid)}`` rendered tile by tile."""
        chip = self.chip
        layer = self.imagery.make_layer()  # made and dropped in this thread
        out: dict = {}
        try:
            for tile, cols, rows in _tiles(cells, max(1, MAX_BLOCK_PIXELS // chip)):
                ext = _union([self.grid.cell(cols[0], rows[0]), self.grid.cell(cols[-1], rows[-1])])
                if not (self._cover.intersects(ext) and not self._cover.intersect(ext).isEmpty()):
                    continue
                rgba = render_block(layer, ext, self.crs, len(cols) * chip, len(rows) * chip, self.ctx)
                for (i, j), cell in tile.items():
                    y0, x0 = rows.index(j) * chip, cols.index(i) * chip  # image row 0 = north edge
                    px = rgba[y0:y0 + chip, x0:x0 + chip]
                    valid = px[..., 3] >= 128
                    coverage = float(valid.mean())
                    if coverage > 0.0:
                        rgb = np.where(valid[..., None], px[..., :3], 0).astype(np.uint8)
                        out[cell.id] = (np.ascontiguousarray(rgb), coverage, None if coverage >= 1.0 else valid.copy())
        finally:
            del layer
        return out
