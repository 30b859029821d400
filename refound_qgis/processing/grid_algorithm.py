"""``refound:create_region_grid``: the core grid's cells of an extent as a polygon layer.
"""
from __future__ import annotations

from qgis.core import (
    QgsFeature,
    QgsFeatureSink,
    QgsFields,
    QgsField,
    QgsGeometry,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterNumber,
    QgsRectangle,
    QgsWkbTypes,
)

from refound_core.errors import InputError

from .. import layer_io
from ..features import LONGLONG, STRING
from ..settings import tr
from .common import RefoundAlgorithm, _advanced

class CreateRegionGrid(RefoundAlgorithm):
    EXTENT, CELL_SIZE, MAX_CELLS, OUTPUT = "EXTENT", "CELL_SIZE", "MAX_CELLS", "OUTPUT"

    def name(self):
        return "create_region_grid"

    def displayName(self):  # noqa: N802
        return tr("Create region grid")

    def shortHelpString(self):  # noqa: N802
        return tr("Square cells of CELL_SIZE metres covering the extent, snapped to the metric CRS's origin "
                  "(the extent's own CRS when it is metric, else the UTM zone of its centre), with the stable "
                  "cell ids every ReFound output uses (paper 5.1.1: 256 m regions).")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, tr("Extent")))
        self.addParameter(QgsProcessingParameterNumber(self.CELL_SIZE, tr("Cell size (m)"),
                                                       QgsProcessingParameterNumber.Double, 256.0, minValue=1.0))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.MAX_CELLS, tr("Maximum number of cells"), QgsProcessingParameterNumber.Integer, 1_000_000, minValue=1)))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, tr("Region grid"),
                                                            QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("CELLS", tr("Number of cells")))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        extent = self.parameterAsExtent(parameters, self.EXTENT, context)
        crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        size = self.parameterAsDouble(parameters, self.CELL_SIZE, context)
        max_cells = self.parameterAsInt(parameters, self.MAX_CELLS, context)
        try:
            plan = layer_io.plan_grid(extent, crs, size, context.transformContext(), max_cells)
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        fields = QgsFields()
        fields.append(QgsField("cell_id", STRING, "string", 80))
        fields.append(QgsField("col", LONGLONG))
        fields.append(QgsField("row", LONGLONG))
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.Polygon, plan.crs)
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        total = max(1, len(plan))
        for i, cell in enumerate(plan.cells):
            if feedback.isCanceled():
                break
            f = QgsFeature(fields)
            f.setGeometry(QgsGeometry.fromRect(QgsRectangle(*cell.bounds)))
            f.setAttributes([cell.id, cell.col, cell.row])
            sink.addFeature(f, QgsFeatureSink.FastInsert)
            if i % 1000 == 0:
                feedback.setProgress(100.0 * i / total)
        feedback.pushInfo(tr("{n} cells of {size:g} m in {crs}").format(n=len(plan), size=size, crs=plan.crs_authid))
        return {self.OUTPUT: dest_id, "CELLS": len(plan)}
