"""Styles of the Explore result layers: a graduated ramp for similarity and change distance, a
categorical style (one legend entry per cluster) for typologies, a data-defined fill colour for
embedding colours. Applied in QGIS and stored inside GeoPackage outputs (qgis_process runs)."""
from __future__ import annotations

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsClassificationQuantile,
    QgsFillSymbol,
    QgsGraduatedSymbolRenderer,
    QgsProperty,
    QgsRendererCategory,
    QgsStyle,
    QgsSymbol,
    QgsSymbolLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

# field and colour ramp of each result kind
KINDS = {"similar": ("similarity", "Viridis", False), "compare": ("distance", "Reds", False)}


def _fill(colour="#cccccc"):
    return QgsFillSymbol.createSimple({"color": colour, "outline_style": "no"})


def style_layer(layer: QgsVectorLayer, kind: str) -> None:
    if kind in KINDS:
        field, ramp_name, _ = KINDS[kind]
        r = QgsGraduatedSymbolRenderer(field)
        r.setSourceSymbol(_fill())
        r.setClassificationMethod(QgsClassificationQuantile())
        r.setSourceColorRamp(QgsStyle.defaultStyle().colorRamp(ramp_name))
        r.updateClasses(layer, 7)
    elif kind == "cluster":
        idx = layer.fields().indexOf("cluster")
        values = sorted(v for v in layer.uniqueValues(idx) if v is not None)
        ramp = QgsStyle.defaultStyle().colorRamp("Spectral")
        cats = []
        for i, v in enumerate(values):
            sym = _fill(QColor(ramp.color(i / max(1, len(values) - 1))).name() if v != -1 else "#bbbbbb")
            cats.append(QgsRendererCategory(v, sym, "no embedding / noise" if v == -1 else f"cluster {v}"))
        r = QgsCategorizedSymbolRenderer("cluster", cats)
    elif kind == "colours":
        sym = _fill()
        sym.symbolLayer(0).setDataDefinedProperty(
            QgsSymbolLayer.PropertyFillColor, QgsProperty.fromExpression("coalesce(\"colour\", '#bbbbbb')"))
        from qgis.core import QgsSingleSymbolRenderer

        r = QgsSingleSymbolRenderer(sym)
    else:
        raise ValueError(f"unknown explore result kind {kind!r}")
    layer.setRenderer(r)
    layer.triggerRepaint()


def store_style(path: str, kind: str, title: str) -> None:
    """Save the style as the GeoPackage's default, so the file opens styled anywhere."""
    if not path.lower().endswith(".gpkg"):
        return
    layer = QgsVectorLayer(path, title, "ogr")
    if layer.isValid():
        style_layer(layer, kind)
        layer.saveStyleToDatabase(title, "ReFound explore style", True, "")
    del layer


__all__ = ["style_layer", "store_style", "QgsSymbol"]
