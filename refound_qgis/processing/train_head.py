"""``refound:train_task_head``: a few-shot task head on a frozen backbone from labelled polygons.
"""
from __future__ import annotations

import math
import os
import shutil

from qgis.core import (
    QgsFeatureRequest,
    QgsGeometry,
    QgsPointXY,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsRectangle,
    QgsSpatialIndex,
)

from refound_core.errors import InputError

from .. import layer_io, settings
from ..settings import DEVICES, task_label, tr
from ..task import resolve_checkpoint
from .common import RefoundAlgorithm, _advanced, _plain

class TrainTaskHead(RefoundAlgorithm):
    """Few-shot task head on a frozen backbone, trained in QGIS's Python.

    The cells and their samples come from the core grid and blocks (``collect_samples``); the
    fitting is ``refound_core.model.head_fit.fit_frozen_head`` (frozen-backbone embeddings, a
    small ``TaskHead``, paper 4.3 "feature-based prediction"). It needs PyTorch in QGIS's Python
    (the backend protocol has no training endpoint).
    """

    POIS, NAME_FIELD, CATEGORY_FIELD, IMAGERY = "POIS", "NAME_FIELD", "CATEGORY_FIELD", "IMAGERY"
    CHECKPOINT, LABELS, LABEL_FIELD, TASK, CELL_SIZE = "CHECKPOINT", "LABELS", "LABEL_FIELD", "TASK", "CELL_SIZE"
    EPOCHS, DEVICE, SEED, OUTPUT = "EPOCHS", "DEVICE", "SEED", "OUTPUT"
    TASKS = ("urban_village", "population", "commercial")

    def name(self):
        return "train_task_head"

    def displayName(self):  # noqa: N802
        return tr("Train task head from labelled polygons")

    def shortHelpString(self):  # noqa: N802
        return tr("Few-shot head on a frozen ReFound backbone. Cells whose centre lies in a label polygon take "
                  "that polygon's LABEL_FIELD value; without a label field, cells inside any polygon are "
                  "positives (1) and the other cells of the polygons' extent negatives (0). Region embeddings "
                  "come from the frozen backbone; a small fusion + MLP head is trained in QGIS (needs PyTorch "
                  "in QGIS's Python) and saved with the backbone as a new checkpoint.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFeatureSource(self.POIS, tr("POI layer (points)"),
                                                              [QgsProcessing.TypeVectorPoint]))
        self.addParameter(QgsProcessingParameterField(self.NAME_FIELD, tr("POI name field"), "name", self.POIS))
        self.addParameter(QgsProcessingParameterField(self.CATEGORY_FIELD, tr("POI category field"), "category",
                                                      self.POIS))
        self.addParameter(QgsProcessingParameterRasterLayer(self.IMAGERY, tr("Imagery layer"), optional=True))
        self.addParameter(QgsProcessingParameterFile(self.CHECKPOINT, tr("Backbone checkpoint folder"),
                                                     QgsProcessingParameterFile.Folder,
                                                     defaultValue=settings.default_checkpoint_dir() or None))
        self.addParameter(QgsProcessingParameterFeatureSource(self.LABELS, tr("Label polygons"),
                                                              [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(self.LABEL_FIELD, tr("Label field (empty: inside = 1)"),
                                                      None, self.LABELS, QgsProcessingParameterField.Numeric,
                                                      optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.TASK, tr("Task"), [task_label(t) for t in self.TASKS],
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.CELL_SIZE, tr("Cell size (m)"),
                                                       QgsProcessingParameterNumber.Double, 256.0, minValue=1.0))
        self.addParameter(QgsProcessingParameterNumber(self.EPOCHS, tr("Epochs"), QgsProcessingParameterNumber.Integer,
                                                       200, minValue=1, maxValue=100000))
        self.addParameter(QgsProcessingParameterEnum(self.DEVICE, tr("Device"), list(DEVICES), defaultValue=0))
        self.addParameter(_advanced(QgsProcessingParameterNumber(self.SEED, tr("Random seed"),
                                                                 QgsProcessingParameterNumber.Integer, 0)))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, tr("New checkpoint folder")))
        self.addOutput(QgsProcessingOutputNumber("LABELLED_CELLS", tr("Labelled cells used")))
        self.addOutput(QgsProcessingOutputNumber("TRAIN_METRIC", tr("Training accuracy (binary) or R² (regression)")))

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 - main thread
        raster = self.parameterAsRasterLayer(parameters, self.IMAGERY, context)
        try:
            self._imagery = layer_io.ImageryInput.from_layer(raster) if raster is not None else None
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        return True

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        from ..backend import torch_in_qgis

        ok, why = torch_in_qgis()
        if not ok:
            raise QgsProcessingException(tr("Training a head needs PyTorch in QGIS's Python ({why}); run QGIS with "
                                            "the refound environment on PYTHONPATH (docs/PLUGIN.md).").format(why=why))
        task = self.TASKS[self.parameterAsEnum(parameters, self.TASK, context)]
        kind = "binary" if task == "urban_village" else "regression"
        labels = self.parameterAsSource(parameters, self.LABELS, context)
        label_field = self.parameterAsString(parameters, self.LABEL_FIELD, context) or ""
        source = self.parameterAsSource(parameters, self.POIS, context)
        if labels is None or source is None:
            raise QgsProcessingException(tr("Both a POI layer and a label polygon layer are needed."))
        try:
            pois = layer_io.PoiInput.from_source(
                source, source.sourceCrs(), source.fields(), self.parameterAsString(parameters, self.NAME_FIELD, context),
                self.parameterAsString(parameters, self.CATEGORY_FIELD, context), source.sourceName())
            checkpoint, meta = resolve_checkpoint(self.parameterAsFile(parameters, self.CHECKPOINT, context), "embedding")
            ctx = context.transformContext()
            cell_size = self.parameterAsDouble(parameters, self.CELL_SIZE, context)
            plan = layer_io.plan_grid(labels.sourceExtent(), labels.sourceCrs(), cell_size, ctx, 200_000)
            targets = label_cells(plan, labels, label_field, ctx)
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        if len(targets) < 2:
            raise QgsProcessingException(tr("Only {n} cells got a label; draw more or larger label polygons "
                                            "(cells count when their centre is inside).").format(n=len(targets)))
        if kind == "binary" and len({1.0 if v > 0 else 0.0 for v in targets.values()}) < 2:
            raise QgsProcessingException(tr("A binary head needs positive and negative cells; the labels give only "
                                            "one class (without a label field, the polygons' extent must hold "
                                            "cells outside the polygons)."))
        from refound_core.inference.pipeline import AnalysisRequest, collect_samples
        from refound_core.model.head_fit import fit_frozen_head
        from refound_core.inference.predictor import AnalysisCanceled

        from ..sources import QgisCellSource

        chip = int((meta.get("model") or {}).get("image_size") or 256)
        source = QgisCellSource(pois, self._imagery, labels.sourceExtent(), labels.sourceCrs(), ctx,
                                keep=lambda c: c.id in targets)
        try:
            samples = collect_samples(AnalysisRequest(cell_size=cell_size, max_cells=200_000), source, chip,
                                      feedback.isCanceled)
        except AnalysisCanceled:
            samples = None
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        feedback.setProgress(30.0)
        if samples is None or feedback.isCanceled():
            raise QgsProcessingException(tr("Canceled; no checkpoint was written."))
        out = self.parameterAsString(parameters, self.OUTPUT, context)
        device = DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)]
        try:
            metric, used = fit_frozen_head(checkpoint, meta, samples, targets, task, kind, out, device,
                                           self.parameterAsInt(parameters, self.EPOCHS, context),
                                           self.parameterAsInt(parameters, self.SEED, context),
                                           feedback.setProgress, feedback.isCanceled)
        except AnalysisCanceled:
            raise QgsProcessingException(tr("Canceled; no checkpoint was written.")) from None
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        feedback.pushInfo(tr("Head for {task} trained on {n} cells; training metric {m:.3f}; saved to {out}")
                          .format(task=task, n=used, m=metric, out=out))
        return {self.OUTPUT: out, "LABELLED_CELLS": used, "TRAIN_METRIC": metric}


def label_cells(plan, labels, label_field: str, transform_context) -> dict:
    """``{cell_id: target}`` from label polygons: the polygon holding the cell centre gives the
    value (its ``label_field``, or 1 without a field); without a field, cells outside every
    polygon are 0."""
    req = QgsFeatureRequest()
    req.setDestinationCrs(plan.crs, transform_context)
    idx = labels.fields().indexOf(label_field) if label_field else -1
    if label_field and idx < 0:
        raise InputError(tr("The label layer has no field '{f}'.").format(f=label_field))
    polys, index = {}, QgsSpatialIndex()
    for f in labels.getFeatures(req):
        g = f.geometry()
        if g is None or g.isEmpty():
            continue
        value = 1.0
        if idx >= 0:
            v = _plain(f.attribute(idx))
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value):
                continue
        polys[f.id()] = (g, value)
        index.addFeature(f)
    out = {}
    for cell in plan.cells:
        x0, y0, x1, y1 = cell.bounds
        centre = QgsPointXY((x0 + x1) / 2.0, (y0 + y1) / 2.0)
        hit = None
        for fid in index.intersects(QgsRectangle(centre.x(), centre.y(), centre.x(), centre.y())):
            g, value = polys[fid]
            if g.contains(QgsGeometry.fromPointXY(centre)):
                hit = value
                break
        if hit is not None:
            out[cell.id] = hit
        elif idx < 0:
            out[cell.id] = 0.0
    return out
