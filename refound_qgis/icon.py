"""The plugin icon, drawn with QPainter (no binary file in git; the zip builder saves icon.png).

A 3 x 3 grid of region cells coloured along the population ramp, with a POI pin on top:
the plugin's idea in one glyph (POIs + imagery -> a value per grid cell).
"""
from qgis.PyQt.QtCore import QPointF, QRectF, Qt
import os

from qgis.PyQt.QtGui import QBrush, QColor, QIcon, QImage, QPainter, QPainterPath, QPen, QPixmap

from .settings import plugin_dir

_RAMP = ((255, 255, 178), (254, 204, 92), (253, 141, 60), (240, 59, 32), (189, 0, 38))
_CELLS = ((0, 1, 2), (1, 3, 2), (2, 4, 3))  # ramp index per cell, rows north to south


def draw_icon(size: int = 64) -> QImage:
    img = QImage(size, size, QImage.Format.Format_ARGB32)
    img.fill(Qt.GlobalColor.transparent)
    p = QPainter(img)
    p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
    s = size / 64.0
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QBrush(QColor(32, 56, 84)))
    p.drawRoundedRect(QRectF(1 * s, 1 * s, 62 * s, 62 * s), 10 * s, 10 * s)
    cell, gap, x0, y0 = 16 * s, 2 * s, 7 * s, 9 * s
    for r, row in enumerate(_CELLS):
        for c, k in enumerate(row):
            p.setBrush(QBrush(QColor(*_RAMP[k])))
            p.drawRect(QRectF(x0 + c * (cell + gap), y0 + r * (cell + gap), cell, cell))
    # POI pin
    path = QPainterPath()
    cx, top = 40 * s, 6 * s
    path.moveTo(QPointF(cx, top + 30 * s))
    path.cubicTo(QPointF(cx - 4 * s, top + 20 * s), QPointF(cx - 11 * s, top + 16 * s), QPointF(cx - 11 * s, top + 9 * s))
    path.arcTo(QRectF(cx - 11 * s, top - 2 * s, 22 * s, 22 * s), 180, -180)
    path.cubicTo(QPointF(cx + 11 * s, top + 16 * s), QPointF(cx + 4 * s, top + 20 * s), QPointF(cx, top + 30 * s))
    p.setPen(QPen(QColor(255, 255, 255), 2 * s))
    p.setBrush(QBrush(QColor(44, 123, 182)))
    p.drawPath(path)
    p.setBrush(QBrush(QColor(255, 255, 255)))
    p.setPen(Qt.PenStyle.NoPen)
    p.drawEllipse(QPointF(cx, top + 9 * s), 4 * s, 4 * s)
    p.end()
    return img


def plugin_icon() -> QIcon:
    """The plugin icon: icon.png next to the package (zip build) or drawn on the fly (working
    tree). Here, not in plugin.py, so the Processing provider and algorithms need not import the
    plugin that imports them."""
    for cand in (os.path.join(plugin_dir(), "icon.png"), os.path.join(os.path.dirname(plugin_dir()), "icon.png")):
        if os.path.isfile(cand):
            return QIcon(cand)
    return QIcon(QPixmap.fromImage(draw_icon(64)))


if __name__ == "__main__":  # python -m refound_qgis.icon OUT.png
    import sys

    from qgis.PyQt.QtGui import QGuiApplication

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    out = sys.argv[1] if len(sys.argv) > 1 else "icon.png"
    if not draw_icon(64).save(out, "PNG"):
        sys.exit(f"could not write {out}")
    print(out)
