"""Render result layers to a PNG map with QGIS's own renderer: imagery underneath, the styled
prediction cells on top, a legend and a title (used by `make demo` and for documentation).

Runs headless (QT_QPA_PLATFORM=offscreen): a print layout with one map item and one legend item,
exported with QgsLayoutExporter. Layers keep the style they carry (the GeoPackage's default
style from ``layer_styles``, or the plugin's styling).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence


def export_map_png(out_png, layers: Sequence, title: str, subtitle: str = "", extent=None,
                   width_mm: float = 270.0, height_mm: float = 190.0, dpi: int = 110,
                   legend_layers: Optional[Sequence] = None, crs=None) -> Path:
    """Write ``out_png`` (atomically) showing ``layers`` (top first) with a legend of ``legend_layers``.

    ``layers`` must already belong to ``QgsProject.instance()``; ``extent`` is a QgsRectangle in
    ``crs`` (default: the first layer's CRS and extent); other layers are reprojected on the fly.
    """
    from qgis.core import (QgsLayoutExporter, QgsLayoutItemLabel, QgsLayoutItemLegend, QgsLayoutItemPicture,
                           QgsLayoutPoint, QgsLayoutSize, QgsLegendStyle, QgsPrintLayout, QgsProject,
                           QgsUnitTypes, QgsLayerTree)
    from qgis.PyQt.QtGui import QFont

    project = QgsProject.instance()
    layout = QgsPrintLayout(project)
    layout.initializeDefaults()
    page = layout.pageCollection().page(0)
    page.setPageSize(QgsLayoutSize(width_mm, height_mm, QgsUnitTypes.LayoutMillimeters))

    title_item = QgsLayoutItemLabel(layout)
    title_item.setText(title + (f"\n{subtitle}" if subtitle else ""))
    title_item.setFont(QFont("DejaVu Sans", 11))
    title_item.attemptMove(QgsLayoutPoint(5, 3, QgsUnitTypes.LayoutMillimeters))
    title_item.attemptResize(QgsLayoutSize(width_mm - 10, 14, QgsUnitTypes.LayoutMillimeters))
    layout.addLayoutItem(title_item)

    legend_w = 80.0
    map_w, map_h = width_mm - legend_w - 12, height_mm - 23
    # The map is rendered by a QgsMapRendererParallelJob (the canvas's own renderer) and placed as
    # a picture: a QgsLayoutItemMap renders nothing in a headless layout export on QGIS 3.22.
    ext = extent or layers[0].extent()
    map_png = _render_map_image(layers, ext, crs or layers[0].crs(), map_w, map_h, dpi, out_png)
    picture = QgsLayoutItemPicture(layout)
    picture.setPicturePath(str(map_png))
    picture.setResizeMode(QgsLayoutItemPicture.Zoom)
    picture.attemptMove(QgsLayoutPoint(5, 18, QgsUnitTypes.LayoutMillimeters))
    picture.attemptResize(QgsLayoutSize(map_w, map_h, QgsUnitTypes.LayoutMillimeters))
    picture.setFrameEnabled(True)
    layout.addLayoutItem(picture)

    legend = QgsLayoutItemLegend(layout)
    legend.setTitle("Legend")
    legend.setAutoUpdateModel(False)
    root = QgsLayerTree()
    for lyr in (legend_layers if legend_layers is not None else layers[:1]):
        root.addLayer(lyr)
    legend.model().setRootGroup(root)
    legend.setStyleFont(QgsLegendStyle.Style.Title, QFont("DejaVu Sans", 10, QFont.Weight.Bold))
    legend.attemptMove(QgsLayoutPoint(width_mm - legend_w - 4, 18, QgsUnitTypes.LayoutMillimeters))
    layout.addLayoutItem(legend)

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.{os.getpid()}.tmp.png")
    settings = QgsLayoutExporter.ImageExportSettings()
    settings.dpi = dpi
    layout.refresh()
    result = QgsLayoutExporter(layout).exportToImage(str(tmp), settings)
    if result != QgsLayoutExporter.Success:
        raise RuntimeError(f"QGIS could not export the map to {out_png} (exporter status {result})")
    os.replace(tmp, out_png)
    map_png.unlink(missing_ok=True)
    legend.model().setRootGroup(QgsLayerTree())  # detach before the temporary tree is deleted
    return out_png


def _render_map_image(layers, extent, crs, width_mm: float, height_mm: float, dpi: int, out_png: Path) -> Path:
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings, QgsProject
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    px_w, px_h = int(width_mm / 25.4 * dpi), int(height_mm / 25.4 * dpi)
    ms = QgsMapSettings()
    ms.setLayers(list(layers))
    ms.setDestinationCrs(crs)
    ms.setTransformContext(QgsProject.instance().transformContext())
    ms.setOutputSize(QSize(px_w, px_h))
    ms.setOutputDpi(dpi)
    ms.setBackgroundColor(QColor(255, 255, 255))
    ms.setExtent(extent)
    job = QgsMapRendererParallelJob(ms)
    job.start()
    job.waitForFinished()
    out_png = Path(out_png)
    path = out_png.with_name(f".{out_png.stem}.{os.getpid()}.map.png")
    if not job.renderedImage().save(str(path), "PNG"):
        raise RuntimeError(f"QGIS could not render the map image for {out_png}")
    return path
