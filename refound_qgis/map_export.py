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
                   width_mm: float = 240.0, height_mm: float = 190.0, dpi: int = 110,
                   legend_layers: Optional[Sequence] = None) -> Path:
    """Write ``out_png`` (atomically) showing ``layers`` (top first) with a legend of ``legend_layers``.

    ``layers`` must already belong to ``QgsProject.instance()`` (or another project passed via
    their ``project()``); ``extent`` is a QgsRectangle in the project CRS (default: the first layer's).
    """
    from qgis.core import (QgsLayoutExporter, QgsLayoutItemLabel, QgsLayoutItemLegend, QgsLayoutItemMap,
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

    legend_w = 62.0
    map_item = QgsLayoutItemMap(layout)
    map_item.attemptMove(QgsLayoutPoint(5, 18, QgsUnitTypes.LayoutMillimeters))
    map_item.attemptResize(QgsLayoutSize(width_mm - legend_w - 12, height_mm - 23, QgsUnitTypes.LayoutMillimeters))
    map_item.setLayers(list(layers))
    map_item.setCrs(layers[0].crs())
    ext = extent or layers[0].extent()
    map_item.zoomToExtent(ext)
    map_item.setFrameEnabled(True)
    layout.addLayoutItem(map_item)

    legend = QgsLayoutItemLegend(layout)
    legend.setTitle("Legend")
    legend.setAutoUpdateModel(False)
    root = QgsLayerTree()
    for lyr in (legend_layers if legend_layers is not None else layers[:1]):
        root.addLayer(lyr)
    legend.model().setRootGroup(root)
    legend.setLinkedMap(map_item)
    legend.setStyleFont(QgsLegendStyle.Title, QFont("DejaVu Sans", 10, QFont.Bold))
    legend.attemptMove(QgsLayoutPoint(width_mm - legend_w - 4, 18, QgsUnitTypes.LayoutMillimeters))
    layout.addLayoutItem(legend)

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.{os.getpid()}.tmp.png")
    settings = QgsLayoutExporter.ImageExportSettings()
    settings.dpi = dpi
    result = QgsLayoutExporter(layout).exportToImage(str(tmp), settings)
    if result != QgsLayoutExporter.Success:
        raise RuntimeError(f"QGIS could not export the map to {out_png} (exporter status {result})")
    os.replace(tmp, out_png)
    legend.model().setRootGroup(QgsLayerTree())  # detach before the temporary tree is deleted
    return out_png
