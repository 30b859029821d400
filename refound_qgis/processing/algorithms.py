"""Processing algorithms of the ``refound`` provider. Ids are stable (scripts and models use them):

``refound:create_region_grid``, ``refound:predict_urban_villages``, ``refound:predict_population``,
``refound:predict_commercial_activeness``, ``refound:compute_region_embeddings``,
``refound:train_task_head``.

The prediction algorithms are thin wrappers over :func:`refound_qgis.task.execute`, the function
the dock runs; outputs are styled by a layer post-processor (kept alive by a module-level
reference, as QGIS only holds a raw pointer to it) and, for GeoPackage outputs, the style is
also stored in the file so ``qgis_process`` results open styled.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import shutil

from qgis.core import (
    QgsFeature,
    QgsFeatureRequest,
    QgsFeatureSink,
    QgsFields,
    QgsField,
    QgsGeometry,
    QgsPointXY,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsRectangle,
    QgsSpatialIndex,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from refound_core.errors import InputError

from .. import layer_io, results, settings
from ..settings import BACKENDS, DEVICES, task_label, tr
from ..task import AnalysisParams, Canceled, execute, resolve_checkpoint

# Post-processors must outlive processAlgorithm (QGIS keeps a raw pointer): keep references here.
_POST_PROCESSORS: list = []
_KEEP = 64


def _keep(pp):
    _POST_PROCESSORS.append(pp)
    del _POST_PROCESSORS[:-_KEEP]
    return pp


class ResultStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles a loaded result layer (task ramp, hatched insufficient cells) and names it."""

    def __init__(self, task: str, kind, title: str, model_name: str, checkpoint: str, inputs: dict, classes=None):
        super().__init__()
        self.task, self.kind, self.title, self.classes = task, kind, title, classes
        self.model_name, self.checkpoint, self.inputs = model_name, checkpoint, inputs

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - QGIS's name
        if not isinstance(layer, QgsVectorLayer):
            return
        results.apply_style(layer, self.task, self.kind, self.classes)
        layer.setName(self.title)
        results.set_provenance(layer, self.task, self.model_name, self.checkpoint, self.inputs)


class RefoundAlgorithm(QgsProcessingAlgorithm):
    """Shared boilerplate: group, translation, instance creation."""

    def group(self):
        return tr("ReFound")

    def groupId(self):  # noqa: N802
        return "refound"

    def createInstance(self):  # noqa: N802
        return type(self)()

    def tr(self, text):
        return tr(text)

    def icon(self):
        from ..icon import plugin_icon

        return plugin_icon()


def _advanced(param):
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


# ---------------------------------------------------------------------------------------- grid
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
        fields.append(QgsField("cell_id", QVariant.String, "string", 80))
        fields.append(QgsField("col", QVariant.LongLong))
        fields.append(QgsField("row", QVariant.LongLong))
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


# ---------------------------------------------------------------------------------------- predict
class _PredictBase(RefoundAlgorithm):
    TASK = "population"
    EXTENT, POIS, NAME_FIELD, CATEGORY_FIELD, IMAGERY = "EXTENT", "POIS", "NAME_FIELD", "CATEGORY_FIELD", "IMAGERY"
    CHECKPOINT, BACKEND, DEVICE, CELL_SIZE, BATCH_SIZE = "CHECKPOINT", "BACKEND", "DEVICE", "CELL_SIZE", "BATCH_SIZE"
    BACKEND_PYTHON, BACKEND_URL, BACKEND_TOKEN, MAX_CELLS = "BACKEND_PYTHON", "BACKEND_URL", "BACKEND_TOKEN", "MAX_CELLS"
    MIN_IMAGE_COVERAGE = "MIN_IMAGE_COVERAGE"
    OUTPUT = "OUTPUT"

    def initAlgorithm(self, config=None):  # noqa: N802
        from refound_core.data.featurize import DEFAULT_MIN_IMAGE_COVERAGE

        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, tr("Extent to analyse")))
        self.addParameter(QgsProcessingParameterFeatureSource(self.POIS, tr("POI layer (points)"),
                                                              [QgsProcessing.TypeVectorPoint]))
        self.addParameter(QgsProcessingParameterField(self.NAME_FIELD, tr("POI name field"), "name", self.POIS))
        self.addParameter(QgsProcessingParameterField(self.CATEGORY_FIELD, tr("POI category field"), "category",
                                                      self.POIS))
        self.addParameter(QgsProcessingParameterRasterLayer(self.IMAGERY, tr("Imagery layer"), optional=True))
        self.addParameter(QgsProcessingParameterFile(self.CHECKPOINT, tr("Checkpoint folder"),
                                                     QgsProcessingParameterFile.Folder,
                                                     defaultValue=settings.default_checkpoint_dir() or None,
                                                     optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.BACKEND, tr("Backend"), [tr(label) for _, label in BACKENDS],
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterEnum(self.DEVICE, tr("Device"), list(DEVICES), defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.CELL_SIZE, tr("Cell size (m)"),
                                                       QgsProcessingParameterNumber.Double, 256.0, minValue=1.0))
        self.addParameter(QgsProcessingParameterNumber(self.BATCH_SIZE, tr("Batch size"),
                                                       QgsProcessingParameterNumber.Integer, 16, minValue=1))
        self.addParameter(_advanced(QgsProcessingParameterFile(
            self.BACKEND_PYTHON, tr("Backend Python environment (venv folder)"), QgsProcessingParameterFile.Folder,
            defaultValue=settings.value("backend_python") or None, optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterString(self.BACKEND_URL, tr("Server URL"), optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterString(self.BACKEND_TOKEN, tr("Server token"), optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.MAX_CELLS, tr("Maximum number of cells"), QgsProcessingParameterNumber.Integer,
            int(settings.value("max_cells")), minValue=1)))
        self.addParameter(_advanced(QgsProcessingParameterNumber(  # refound --min-image-coverage
            self.MIN_IMAGE_COVERAGE, tr("Minimum share of valid imagery pixels for the image to be used"),
            QgsProcessingParameterNumber.Double, DEFAULT_MIN_IMAGE_COVERAGE, minValue=0.0, maxValue=1.0)))
        self.addParameter(QgsProcessingParameterFeatureSink(self.OUTPUT, self.output_name(),
                                                            QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("CELLS", tr("Number of cells")))
        self.addOutput(QgsProcessingOutputNumber("PREDICTED", tr("Cells predicted (sufficient data)")))
        self.addOutput(QgsProcessingOutputString("MODEL", tr("Model")))

    def output_name(self):
        return task_label(self.TASK)

    def displayName(self):  # noqa: N802
        return tr("Predict {task}").format(task=task_label(self.TASK).lower())

    def shortHelpString(self):  # noqa: N802
        return tr("Grids the extent into stable cells, reads the POI layer (name and category fields) and the "
                  "imagery layer as QGIS renders it, and runs ReFound (Xiao et al., KDD 2024) with the "
                  "checkpoint's task head. Cells without POIs and without imagery are kept with "
                  "sufficient = 0 and no prediction. The model runs in QGIS when PyTorch imports, else in a "
                  "local backend process (advanced parameters) or a running `refound serve`.")

    def prepareAlgorithm(self, parameters, context, feedback):  # noqa: N802 - main thread
        raster = self.parameterAsRasterLayer(parameters, self.IMAGERY, context)
        try:
            self._imagery = layer_io.ImageryInput.from_layer(raster) if raster is not None else None
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        self._imagery_name = raster.name() if raster is not None else tr("none")
        return True

    def _params(self, parameters, context) -> AnalysisParams:
        source = self.parameterAsSource(parameters, self.POIS, context)
        if source is None:
            raise QgsProcessingException(tr("No POI layer is given; pass a point layer of POIs (POIS)."))
        name_field = self.parameterAsString(parameters, self.NAME_FIELD, context)
        category_field = self.parameterAsString(parameters, self.CATEGORY_FIELD, context)
        try:
            pois = layer_io.PoiInput.from_source(source, source.sourceCrs(), source.fields(), name_field,
                                                 category_field, source.sourceName())
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        return AnalysisParams(
            task=self.TASK,
            extent=self.parameterAsExtent(parameters, self.EXTENT, context),
            extent_crs=self.parameterAsExtentCrs(parameters, self.EXTENT, context),
            checkpoint_dir=self.parameterAsFile(parameters, self.CHECKPOINT, context) or "",
            cell_size=self.parameterAsDouble(parameters, self.CELL_SIZE, context),
            batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            backend=BACKENDS[self.parameterAsEnum(parameters, self.BACKEND, context)][0],
            backend_python=self.parameterAsFile(parameters, self.BACKEND_PYTHON, context) or "",
            backend_url=self.parameterAsString(parameters, self.BACKEND_URL, context) or "",
            backend_token=self.parameterAsString(parameters, self.BACKEND_TOKEN, context) or "",
            max_cells=self.parameterAsInt(parameters, self.MAX_CELLS, context),
            min_image_coverage=self.parameterAsDouble(parameters, self.MIN_IMAGE_COVERAGE, context),
            pois=pois,
            imagery=getattr(self, "_imagery", None),
            input_names={"POIs": source.sourceName(), "imagery": getattr(self, "_imagery_name", "")},
            transform_context=context.transformContext(),
        )

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        params = self._params(parameters, context)
        try:
            outcome = execute(params, lambda f: feedback.setProgress(100.0 * f), feedback.isCanceled,
                              lambda runner: None)
        except Canceled:
            raise QgsProcessingException(tr("Canceled; no output was written.")) from None
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None
        embed_dim = results.embedding_dim_of(outcome.cells) if self.TASK == "embedding" else 0
        extras = results.extra_fields_of(outcome.cells)
        fields = results.result_fields(embed_dim, extras)
        sink, dest_id = self.parameterAsSink(parameters, self.OUTPUT, context, fields, QgsWkbTypes.Polygon,
                                             results.crs_of(outcome.crs_authid))
        if sink is None:
            raise QgsProcessingException(self.invalidSinkError(parameters, self.OUTPUT))
        predicted = 0
        for f in results.make_features(outcome.cells, fields, embed_dim, extras):
            predicted += int(f.attribute(results.SUFFICIENT) or 0)
            sink.addFeature(f, QgsFeatureSink.FastInsert)
        del sink  # flush and close a file output before its style is stored in it
        when = _dt.datetime.now()
        title = results.layer_title(self.TASK, outcome.model_name, when)
        styler = _keep(ResultStyler(self.TASK, outcome.kind, title, outcome.model_name, outcome.checkpoint,
                                    params.input_names, outcome.classes))
        if context.willLoadLayerOnCompletion(dest_id):
            context.layerToLoadOnCompletionDetails(dest_id).setPostProcessor(styler)
        _style_file_output(dest_id, self.TASK, outcome.kind, title, feedback, outcome.classes)
        feedback.pushInfo(outcome.summary or tr("{n} cells").format(n=outcome.n_cells))
        for note in outcome.notices:
            feedback.pushInfo(note)
        return {self.OUTPUT: dest_id, "CELLS": outcome.n_cells, "PREDICTED": predicted, "MODEL": outcome.model_name}


def _plain(v):
    if v is None or (hasattr(v, "isNull") and v.isNull()):
        return None
    if isinstance(v, bool):
        return int(v)
    return v


def _style_file_output(dest_id: str, task: str, kind, title: str, feedback, classes=None) -> None:
    """Store the style inside a GeoPackage output so the file opens styled (qgis_process runs)."""
    path = dest_id.split("|")[0]
    if not path.lower().endswith(".gpkg") or not os.path.isfile(path):
        return
    layer = QgsVectorLayer(dest_id, title, "ogr")
    if not layer.isValid():
        return
    try:
        results.apply_style(layer, task, kind, classes)
        layer.saveStyleToDatabase(title, "ReFound default style", True, "")
    except Exception as exc:  # noqa: BLE001 - a style is a nicety; the data is written
        feedback.reportError(tr("The style could not be stored in {p}: {e}").format(p=path, e=exc))


class PredictUrbanVillages(_PredictBase):
    TASK = "urban_village"

    def name(self):
        return "predict_urban_villages"

    def displayName(self):  # noqa: N802
        return tr("Predict urban villages")


class PredictPopulation(_PredictBase):
    TASK = "population"

    def name(self):
        return "predict_population"

    def displayName(self):  # noqa: N802
        return tr("Predict population")


class PredictCommercialActiveness(_PredictBase):
    TASK = "commercial"

    def name(self):
        return "predict_commercial_activeness"

    def displayName(self):  # noqa: N802
        return tr("Predict commercial activeness")


class ComputeRegionEmbeddings(_PredictBase):
    TASK = "embedding"

    def name(self):
        return "compute_region_embeddings"

    def displayName(self):  # noqa: N802
        return tr("Compute region embeddings")

    def shortHelpString(self):  # noqa: N802
        return tr("Region representations (paper 4.3): the fused [P]/[S] embedding of each cell as fields "
                  "emb_000..., for clustering, joins or your own models; 'prediction' holds their first "
                  "principal component so the map shows structure. Any checkpoint works (no head needed).")


# ---------------------------------------------------------------------------------------- train
class TrainTaskHead(RefoundAlgorithm):
    """Few-shot task head on a frozen backbone, trained in QGIS's Python.

    NOTE (implemented here, not in refound_core): the core has no fine-tune API the plugin can
    call yet, so this algorithm computes frozen-backbone region embeddings with
    ``Predictor.embed_samples`` and trains a small ``TaskHead`` (fusion + 2-layer MLP, paper 4.3
    "feature-based prediction") in-process with torch, then saves backbone + head as a normal
    checkpoint. It needs PyTorch in QGIS's Python (the backend protocol has no training endpoint).
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
            metric, used = train_head(checkpoint, meta, samples, targets, task, kind, out, device,
                                      self.parameterAsInt(parameters, self.EPOCHS, context),
                                      self.parameterAsInt(parameters, self.SEED, context), feedback)
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


def train_head(checkpoint: str, meta: dict, samples: list, targets: dict, task: str, kind: str, out: str,
               device: str, epochs: int, seed: int, feedback) -> tuple:
    """Frozen-backbone embeddings -> small TaskHead trained full-batch -> checkpoint at ``out``.

    Returns ``(training metric, cells used)``: accuracy at 0.5 (binary) or R² (regression).
    """
    import numpy as np
    import torch

    from refound_core.inference.predictor import AnalysisCanceled, Predictor
    from refound_core.model.checkpoint import save_checkpoint
    from refound_core.model.heads import TaskHead

    torch.manual_seed(int(seed))
    pred = Predictor(checkpoint, device=device)
    try:
        emb = list(pred.embed_samples(samples, is_canceled=feedback.isCanceled,
                                      progress=lambda done, _t: feedback.setProgress(30.0 + 40.0 * done / max(1, len(samples)))))
    except AnalysisCanceled:
        raise QgsProcessingException(tr("Canceled; no checkpoint was written.")) from None
    rows = [(r.h_P, r.h_S, targets[r.cell_id]) for r in emb if r.sufficient]
    if len(rows) < 2:
        raise InputError(tr("Only {n} labelled cells have POIs or imagery; a head needs at least 2.").format(n=len(rows)))
    h = pred.config.hidden_size
    z = np.stack([np.stack([np.nan_to_num(p, nan=0.0), np.nan_to_num(s, nan=0.0)]) for p, s, _ in rows]).astype(np.float32)
    presence = np.array([[np.isfinite(p).all(), np.isfinite(s).all()] for p, s, _ in rows])
    y = np.array([t for _, _, t in rows], dtype=np.float32)
    target_meta = None
    if kind == "binary":
        y = (y > 0).astype(np.float32)
        if len(set(y.tolist())) < 2:
            raise InputError(tr("After dropping cells without data only one class is left; add labels elsewhere."))
        y_train = y
    else:
        mean, std = float(y.mean()), float(y.std()) or 1.0
        y_train = (y - mean) / std
        target_meta = {"mean": mean, "std": std}
    dev = pred.device
    head = TaskHead(h, kind=kind, fusion="average", dropout=0.1).to(dev)
    zt, pt = torch.from_numpy(z).to(dev), torch.from_numpy(presence).to(dev)
    yt = torch.from_numpy(y_train).to(dev)
    # Few labels and embeddings of a frozen backbone that differ little between nearby regions:
    # standardise the fused embedding for training, then fold the scaling into the first layer
    # (W' = W / sigma, b' = b - W' mu), so the saved head is a plain TaskHead on raw embeddings.
    # sigma has a floor of 5 % of the embedding's RMS: dimensions that barely vary would otherwise
    # get huge weights, which bf16 inference (the Predictor's default on capable hardware) cannot
    # reproduce.
    with torch.no_grad():
        fused = head.fuse(zt, pt)
        floor = 0.05 * fused.pow(2).mean().sqrt().clamp_min(1e-6)
        mu, sigma = fused.mean(0), torch.sqrt(fused.var(0, unbiased=False) + floor ** 2)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    if kind == "binary":
        pos = float(y.sum())
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - pos) / max(pos, 1.0), device=dev))
    else:
        loss_fn = torch.nn.MSELoss()
    head.train()
    for epoch in range(int(epochs)):
        if feedback.isCanceled():
            raise QgsProcessingException(tr("Canceled; no checkpoint was written."))
        opt.zero_grad()
        loss = loss_fn(head.mlp((head.fuse(zt, pt) - mu) / sigma).squeeze(-1), yt)
        loss.backward()
        opt.step()
        feedback.setProgress(70.0 + 25.0 * (epoch + 1) / epochs)
    head.eval()
    with torch.no_grad():
        fc1 = head.mlp.fc1
        fc1.weight.div_(sigma)
        fc1.bias.sub_(fc1.weight @ mu)
        out_t = head.predict(zt, pt).squeeze(-1).cpu().numpy()
    if kind == "binary":
        metric = float(((out_t >= 0.5) == (y >= 0.5)).mean())
    else:
        fit = out_t * target_meta["std"] + target_meta["mean"]
        ss_res, ss_tot = float(((fit - y) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
        metric = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    src_task = dict(meta.get("task") or {})
    task_meta = {"name": task, "kind": kind, "trained_by": "refound_qgis train_task_head (frozen backbone)",
                 "labelled_cells": len(rows)}
    if target_meta:  # the Predictor undoes it (refound_core.inference.predictor._inverse_target)
        task_meta["target_scaler"] = target_meta
        task_meta["log_target"] = False
    if src_task.get("featurizer"):
        task_meta["featurizer"] = src_task["featurizer"]
    files = {}
    for role, rel in (meta.get("files") or {}).items():
        p = os.path.join(checkpoint, rel)
        if os.path.exists(p):
            files[role] = p
    if os.path.isdir(out) and not os.listdir(out):
        shutil.rmtree(out)  # Processing may pre-create the destination folder
    save_checkpoint(out, pred.model.cpu(), head.cpu(), task=task_meta, tokenizer_dir=files.get("tokenizer"),
                    category_vocab=files.get("category_vocab"),
                    extra_files={k: v for k, v in files.items() if k not in ("tokenizer", "category_vocab", "codebook")},
                    provenance={"backbone": checkpoint, "training_data": "labelled polygons in QGIS",
                                "epochs": int(epochs), "train_metric": metric},
                    overwrite=os.path.isdir(out))
    return metric, len(rows)


ALGORITHMS = (CreateRegionGrid, PredictUrbanVillages, PredictPopulation, PredictCommercialActiveness,
              ComputeRegionEmbeddings, TrainTaskHead)
