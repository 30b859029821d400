"""The prediction algorithms: one :class:`PredictAlgorithm` parameterised by the task table
:data:`PREDICT_TASKS` (algorithm id, task, title). Each runs :func:`refound_qgis.task.execute`,
the dock's function, which calls ``refound_core.inference.pipeline.run_analysis`` (the CLI's).
"""
from __future__ import annotations

import datetime as _dt

from qgis.core import (
    QgsFeatureSink,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterAuthConfig,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsWkbTypes,
)

# module level on purpose: the plugin zip ships the modules imported here (featurize needs only numpy at import)
from refound_core.data.featurize import DEFAULT_MIN_IMAGE_COVERAGE
from refound_core.errors import InputError

from .. import layer_io, results, settings
from ..settings import BACKENDS, DEVICES, task_label, tr
from ..task import AnalysisParams, Canceled, execute
from .common import RefoundAlgorithm, ResultStyler, _advanced, _keep, _style_file_output

class PredictAlgorithm(RefoundAlgorithm):
    """One prediction algorithm; ``ALG_ID``, ``TASK`` and ``TITLE`` come from :data:`PREDICT_TASKS`."""

    ALG_ID, TASK, TITLE, HELP = "predict_population", "population", "Predict population", ""
    EXTENT, POIS, NAME_FIELD, CATEGORY_FIELD, IMAGERY = "EXTENT", "POIS", "NAME_FIELD", "CATEGORY_FIELD", "IMAGERY"
    CHECKPOINT, BACKEND, DEVICE, CELL_SIZE, BATCH_SIZE = "CHECKPOINT", "BACKEND", "DEVICE", "CELL_SIZE", "BATCH_SIZE"
    BACKEND_PYTHON, BACKEND_URL, BACKEND_AUTHCFG, MAX_CELLS = "BACKEND_PYTHON", "BACKEND_URL", "BACKEND_AUTHCFG", "MAX_CELLS"
    MIN_IMAGE_COVERAGE = "MIN_IMAGE_COVERAGE"
    OUTPUT = "OUTPUT"

    def initAlgorithm(self, config=None):  # noqa: N802

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
        # An auth config id, not the token: the token stays in QGIS's encrypted authentication
        # database and never enters the Processing history or a saved model.
        self.addParameter(_advanced(QgsProcessingParameterAuthConfig(
            self.BACKEND_AUTHCFG, tr("Server token (authentication configuration)"),
            defaultValue=settings.value("backend_authcfg") or None, optional=True)))
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

    def name(self):
        return self.ALG_ID

    def displayName(self):  # noqa: N802
        return tr(self.TITLE)

    def shortHelpString(self):  # noqa: N802
        if self.HELP:
            return tr(self.HELP)
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
            backend_authcfg=self.parameterAsString(parameters, self.BACKEND_AUTHCFG, context) or "",
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


# The task table: algorithm id (stable: scripts and models use it), plugin task, title, help.
PREDICT_TASKS = (
    ("predict_urban_villages", "urban_village", "Predict urban villages", ""),
    ("predict_population", "population", "Predict population", ""),
    ("predict_commercial_activeness", "commercial", "Predict commercial activeness", ""),
    ("compute_region_embeddings", "embedding", "Compute region embeddings",
     "Region representations (paper 4.3): the fused [P]/[S] embedding of each cell as fields emb_000..., for "
     "clustering, joins or your own models; 'prediction' holds their first principal component so the map shows "
     "structure. Any checkpoint works (no head needed)."),
)


def _algorithm_class(alg_id: str, task: str, title: str, help_text: str) -> type:
    name = "".join(part.capitalize() for part in alg_id.split("_"))
    return type(name, (PredictAlgorithm,), {"ALG_ID": alg_id, "TASK": task, "TITLE": title, "HELP": help_text})


PREDICT_ALGORITHMS = tuple(_algorithm_class(*row) for row in PREDICT_TASKS)
