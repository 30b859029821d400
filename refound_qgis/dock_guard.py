"""The panel's guards before a run: the obvious input layers preselected, the cell limit and the
confirmation threshold as controls (both kept in QgsSettings), and the cost question.

Why: a new analyst found the pickers empty with one point layer and one raster in the project, a
4,402-cell run started without a question although the README promises one, and the cell-limit
message pointed to a setting no control exposed (issue "Robustness and the analyst's first hour").
"""
from __future__ import annotations

from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer, QgsWkbTypes
from qgis.PyQt.QtCore import QObject
from qgis.PyQt.QtWidgets import QMessageBox, QSpinBox

from . import settings
from .settings import tr

# seconds per cell on 2 CPU cores after model load (docs/BENCHMARKS.md, refound_small, bf16): the
# question's rough time; a GPU is far faster, so it is an upper guide, not a promise
CPU_SECONDS_PER_CELL = 0.05


def _points(layer) -> bool:
    return isinstance(layer, QgsVectorLayer) and layer.geometryType() == QgsWkbTypes.GeometryType.PointGeometry


def obvious_layers(project=None) -> tuple:
    """``(POI layer or None, raster or None)``: the project's only point layer (or the only one
    named like POIs among several), and its only raster layer."""
    layers = list((project or QgsProject.instance()).mapLayers().values())
    points = [lyr for lyr in layers if _points(lyr)]
    if len(points) > 1:
        points = [lyr for lyr in points if "poi" in lyr.name().lower()]
    rasters = [lyr for lyr in layers if isinstance(lyr, QgsRasterLayer)]
    return (points[0] if len(points) == 1 else None), (rasters[0] if len(rasters) == 1 else None)


def preselect_layers(dock) -> None:
    """Fill empty pickers with the obvious layers (a choice the user made is kept)."""
    poi, raster = obvious_layers()
    if dock.poi_combo.currentLayer() is None and poi is not None:
        dock.poi_combo.setLayer(poi)
    if dock.imagery_combo.currentLayer() is None and raster is not None:
        dock.imagery_combo.setLayer(raster)


class _Preselector(QObject):
    """Preselects when layers arrive: the panel usually exists before a project's layers are
    loaded, which is how the pickers stayed empty. A child of the dock, so Qt drops the
    connection with it."""

    def __init__(self, dock):
        super().__init__(dock)
        self.dock = dock
        QgsProject.instance().layersAdded.connect(self.layers_added)

    def layers_added(self, *_):
        preselect_layers(self.dock)


def _setting_spin(dock, form, key: str, label: str, minimum: int, step: int, tip: str) -> QSpinBox:
    """A form row whose spin box is the QgsSettings value ``key`` (read now, written on change)."""
    spin = QSpinBox(dock)
    spin.setRange(minimum, 5_000_000)
    spin.setSingleStep(step)
    spin.setValue(int(settings.value(key)))
    spin.setToolTip(tip)
    spin.valueChanged.connect(lambda v: settings.set_value(key, int(v)))
    form.addRow(label, spin)
    return spin


def add_limits(dock, form) -> tuple:
    """The "Cell limit" and "Ask above" rows of the model form; ``(limit spin, ask spin)``.
    Also preselects the obvious layers, now and whenever layers are added to the project."""
    limit = _setting_spin(dock, form, "max_cells", tr("Cell limit"), 1, 1000,
                          tr("Runs over more cells than this are refused (zoom in or use larger cells)"))
    ask = _setting_spin(dock, form, "confirm_cells", tr("Ask above (cells)"), 0, 500,
                        tr("Ask before analysing more cells than this (0: never ask)"))
    preselect_layers(dock)
    dock._preselector = _Preselector(dock)
    return limit, ask


def confirm_cost(dock, params) -> bool:
    """True to go on: at most ``confirm_cells`` cells, or the user said yes to the cost question."""
    from refound_core.errors import InputError

    from .layer_io import count_cells

    threshold = int(settings.value("confirm_cells"))
    if threshold <= 0:
        return True
    try:
        n, _ = count_cells(params.extent, params.extent_crs, params.cell_size, params.transform_context)
    except InputError:
        return True  # the run itself reports the bad extent, with its message
    if n <= threshold:
        return True
    minutes = n * CPU_SECONDS_PER_CELL / 60.0
    text = tr("The current extent has {n} cells of {size:g} m. On a CPU this takes about {m:.0f} minute(s) "
              "after the model loads (much less on a GPU). Analyse them?").format(
        n=f"{n:,}", size=params.cell_size, m=max(1.0, minutes))
    answer = QMessageBox.question(dock, tr("ReFound: large analysis"), text,
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes
