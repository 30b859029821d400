"""Styles of the Explore result layers: a graduated ramp for similarity and change distance, a
categorical style (one legend entry per cluster) for typologies, a data-defined fill colour for
embedding colours. Applied in QGIS and stored inside GeoPackage outputs (qgis_process runs)."""
from __future__ import annotations

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsClassificationJenks,
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

# field, colour ramp and classification of each result kind: natural breaks for change, since most
# cells of two snapshots are unchanged (distance ~0) and quantiles would split those zeros
KINDS = {"similar": ("similarity", "Viridis", QgsClassificationQuantile),
         "compare": ("distance", "Reds", QgsClassificationJenks)}


def _fill(colour="#cccccc"):
    return QgsFillSymbol.createSimple({"color": colour, "outline_style": "no"})


def _legend_precision(r) -> None:
    """Enough decimals that neighbouring class bounds differ in the legend: the embeddings of
    one model are often all within 1e-3 of each other in cosine ("0 - 0" otherwise)."""
    import math

    bounds = sorted({b for rng in r.ranges() for b in (rng.lowerValue(), rng.upperValue())})
    gaps = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
    digits = min(8, max(2, math.ceil(-math.log10(min(gaps))) + 1)) if gaps else 3
    fmt = r.labelFormat()
    fmt.setPrecision(digits)
    fmt.setTrimTrailingZeroes(True)
    r.setLabelFormat(fmt, True)


def style_layer(layer: QgsVectorLayer, kind: str) -> None:
    if kind in KINDS:
        field, ramp_name, method = KINDS[kind]
        r = QgsGraduatedSymbolRenderer(field)
        r.setSourceSymbol(_fill())
        r.setClassificationMethod(method())
        r.setSourceColorRamp(QgsStyle.defaultStyle().colorRamp(ramp_name))
        r.updateClasses(layer, 7)
        _legend_precision(r)
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
