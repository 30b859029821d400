"""The analysis the dock and the Processing algorithms share, and the QgsTask that runs it.

:func:`execute` calls ``refound_core.inference.pipeline.run_analysis``, the function behind
``refound predict`` / ``refound embed``: the grid, its blocks, prefetch, batching, per-cell
seeding and cancellation are the core's, so the same cell gets the same value from every entry
point. The plugin brings only its ends: a :class:`~refound_qgis.sources.QgisCellSource` (QGIS
layers) and a :class:`~refound_qgis.sinks.QgisLayerSink`; the model is the session's in-process
``Predictor`` or, where :mod:`refound_qgis.backend` says, a ``RemotePredictor`` (same protocol)
for a backend process. The result layer is written by QGIS, not by the core writers: those use
the shapely / pyogrio wheels, which inside the QGIS executables get QGIS's GEOS / GDAL symbols
(measured: ``shapely.to_wkb`` fails in ``qgis_process``), and QGIS 3.22's GDAL cannot open GeoParquet.

:class:`AnalysisTask` wraps it in a QgsTask: ``run()`` never touches a widget or a project layer
(only the snapshots taken on the main thread), reports progress with ``setProgress``, stops within
one batch on cancel, and only ``finished()`` (main thread) creates a layer, so a canceled or failed
run leaves no partial layer and no file.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsProject,
    QgsRectangle,
    QgsTask,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import pyqtSignal

from refound_core.errors import InputError

from . import auth, layer_io, results
from .settings import task_label, tr

CORE_TASK = {"urban_village": "urban_village", "population": "population", "commercial": "commercial",
             "embedding": "embed"}


class Canceled(Exception):
    """The user canceled; nothing is produced."""


@dataclass
class AnalysisParams:
    """What one run needs; built on the main thread (dock or Processing)."""

    task: str
    extent: QgsRectangle
    extent_crs: QgsCoordinateReferenceSystem
    checkpoint_dir: str = ""
    cell_size: float = 256.0
    batch_size: int = 16
    device: str = "auto"
    backend: str = "auto"
    backend_python: str = ""
    backend_url: str = ""
    backend_authcfg: str = ""  # auth config of the server token; the token itself is read in execute()
    output_path: str = ""
    max_cells: int = 20000
    pois: Optional[layer_io.PoiInput] = None
    imagery: Optional[layer_io.ImageryInput] = None
    input_layer_ids: list = field(default_factory=list)
    input_names: dict = field(default_factory=dict)
    transform_context: Optional[QgsCoordinateTransformContext] = None
    min_image_coverage: Optional[float] = None  # None = the core default (featurize.DEFAULT_MIN_IMAGE_COVERAGE)


@dataclass
class AnalysisOutcome:
    """What :func:`execute` produced: the cell results (CellResult, or backend dicts with bounds)."""

    task: str
    crs_authid: str
    n_cells: int
    model_name: str
    checkpoint: str
    backend: str
    kind: Optional[str] = None
    classes: Optional[list] = None  # class names of a multiclass head (legend of the style)
    cells: list = field(default_factory=list)
    summary: str = ""
    notices: list = field(default_factory=list)


# ------------------------------------------------------------------------------------ checkpoints
def read_checkpoint_meta(folder: str) -> dict:
    """config.json of a checkpoint folder (JSON only: no torch needed)."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def resolve_checkpoint(folder: str, task: str) -> tuple:
    """``(checkpoint folder, config.json dict)`` for ``task``.

    ``folder`` is a checkpoint, or a folder of checkpoints (one per task, like the bundled demo):
    then the one fine-tuned for ``task`` is taken (any one for embeddings).
    """
    folder = (folder or "").strip()
    if not folder:
        raise InputError(tr("No checkpoint folder is chosen; pick a ReFound checkpoint folder in the panel "
                            "(or the bundled demo checkpoint)."))
    if not os.path.isdir(folder):
        raise InputError(tr("The checkpoint folder {path} does not exist.").format(path=folder))
    candidates = []
    if os.path.isfile(os.path.join(folder, "config.json")):
        candidates = [folder]
    else:
        for name in sorted(os.listdir(folder)):
            sub = os.path.join(folder, name)
            if os.path.isfile(os.path.join(sub, "config.json")):
                candidates.append(sub)
    if not candidates:
        raise InputError(tr("{path} is not a ReFound checkpoint (no config.json); pick the folder written by "
                            "`refound` training or conversion.").format(path=folder))
    metas = []
    for c in candidates:
        try:
            metas.append((c, read_checkpoint_meta(c)))
        except (OSError, ValueError) as exc:
            raise InputError(tr("{path}/config.json cannot be read ({err}).").format(path=c, err=exc)) from None
    if task == "embedding":
        metas.sort(key=lambda cm: bool(cm[1].get("head")))  # a bare backbone first
        return metas[0]
    tasks_found = []
    for c, meta in metas:
        own = (meta.get("task") or {}).get("name") if meta.get("head") else None
        tasks_found.append(own or tr("no head"))
        if own == task:
            return c, meta
    raise InputError(tr("The checkpoint {path} has no head for '{task}' (it has: {found}); pick a checkpoint "
                        "fine-tuned for this task, train one with 'Train task head', or choose 'Region "
                        "embeddings'.").format(path=folder, task=task_label(task), found=", ".join(tasks_found)))


def model_name_of(meta: dict) -> str:
    return str((meta.get("model") or {}).get("name") or "refound")


# ------------------------------------------------------------------------------------ execute
_PREDICT_LOCK = threading.Lock()  # one in-process analysis at a time (dock and Processing share the model)


def inprocess_predictor(checkpoint: str, device: str, batch_size: int, min_image_coverage=None):
    """The session's Predictor (``refound_core``'s cache: loaded once, reloaded when the
    checkpoint's config.json changes, one model in memory)."""
    from refound_core.inference.predictor import load_predictor

    return load_predictor(checkpoint, device=device, batch_size=batch_size or None,
                          min_image_coverage=min_image_coverage)


def execute(params: AnalysisParams, progress: Callable[[float], None] = lambda f: None,
            is_canceled: Callable[[], bool] = lambda: False, on_runner: Callable = lambda r: None) -> AnalysisOutcome:
    """Run one analysis (worker thread safe) through ``refound_core.inference.pipeline.run_analysis``
    (the CLI's path) with a :class:`~refound_qgis.sources.QgisCellSource` and a
    :class:`~refound_qgis.sinks.QgisLayerSink`. Raises InputError (bad input), Canceled.

    ``progress`` gets a fraction in [0, 1]; ``on_runner`` receives the backend's predictor (if
    any) so a cancel can also be sent to the backend.
    """
    from refound_core.inference.pipeline import AnalysisRequest, run_analysis
    from refound_core.inference.predictor import AnalysisCanceled

    from .backend import resolve_backend
    from .sinks import QgisLayerSink
    from .sources import QgisCellSource

    if params.task not in CORE_TASK:
        raise InputError(tr("Unknown task '{t}'.").format(t=params.task))
    if params.pois is None:
        raise InputError(tr("No POI layer is selected; add a point layer of POIs to the project and pick it "
                            "in the ReFound panel."))
    ctx = params.transform_context or QgsProject.instance().transformContext()
    source = QgisCellSource(params.pois, params.imagery, params.extent, params.extent_crs, ctx)
    layer_io.locate_extent(params.extent, params.extent_crs, params.cell_size, ctx)  # bad extent: before any load
    checkpoint, meta = "", {}
    if params.backend != "remote":
        checkpoint, meta = resolve_checkpoint(params.checkpoint_dir, params.task)
    token = auth.token_for(params.backend_authcfg) if params.backend == "remote" else ""
    kind_, remote = resolve_backend(params.backend, params.backend_python, params.backend_url, token,
                                    checkpoint, params.device, params.batch_size, embeddings=("fused",))
    on_runner(remote)
    request = AnalysisRequest(checkpoint=checkpoint or None, task=CORE_TASK[params.task], cell_size=params.cell_size,
                              device=params.device, batch_size=params.batch_size or None, embeddings=("fused",),
                              max_cells=params.max_cells, max_cells_hint=tr(layer_io.MAX_CELLS_HINT),
                              min_image_coverage=params.min_image_coverage)
    sink = QgisLayerSink(params.task)
    step = lambda done, total: progress(min(1.0, done / total) if total else 0.0)  # noqa: E731
    if is_canceled():
        raise Canceled()
    try:
        if remote is None:
            with _PREDICT_LOCK:
                model = inprocess_predictor(checkpoint, params.device, params.batch_size, params.min_image_coverage)
                result = run_analysis(request, source, model, sink, step, cancel=is_canceled)
        else:
            result = run_analysis(request, source, remote, sink, step, cancel=is_canceled)
    except AnalysisCanceled:
        raise Canceled() from None
    if is_canceled():
        raise Canceled()
    where = result.device or (remote.description if remote is not None else "")
    if result.precision and remote is None:
        where = f"{where} ({result.precision})"
    return AnalysisOutcome(
        task=params.task, crs_authid=result.crs, n_cells=result.cells,
        model_name=str(result.model.get("model") or (model_name_of(meta) if meta else "refound")),
        checkpoint=checkpoint or params.backend_url, backend=kind_,
        kind=result.kind or (meta.get("head") or {}).get("kind")
        or ("binary" if params.task == "urban_village" else "regression"),
        classes=result.classes or (meta.get("task") or {}).get("classes"), cells=sink.cells,
        summary=tr("{n} cells, {p} predicted, on {where}").format(n=result.cells, p=result.predicted, where=where),
        notices=list(result.notices))


def materialize_outcome(params: AnalysisParams, outcome: AnalysisOutcome) -> QgsVectorLayer:
    """The styled result layer of an outcome (main thread): memory layer, or the GeoPackage at
    ``params.output_path``. Not yet added to the project."""
    when = _dt.datetime.now()
    inputs = dict(params.input_names)
    inputs[tr("cell size")] = f"{params.cell_size:g} m ({outcome.crs_authid})"
    return results.build_result_layer(outcome.cells, outcome.crs_authid, params.task, outcome.model_name,
                                      output_path=params.output_path, checkpoint=outcome.checkpoint, inputs=inputs,
                                      kind=outcome.kind, backend=outcome.backend, when=when,
                                      classes=outcome.classes)


# ------------------------------------------------------------------------------------ QgsTask
class AnalysisTask(QgsTask):
    """Runs :func:`execute` in QGIS's task manager. ``done(layer or None, message, level)`` is
    emitted once on the main thread when the run ends, whatever the reason."""

    done = pyqtSignal(object, str, str)

    def __init__(self, params: AnalysisParams):
        super().__init__(tr("ReFound: {task}").format(task=task_label(params.task)), QgsTask.CanCancel)
        self.params = params
        self.outcome: Optional[AnalysisOutcome] = None
        self.error = ""
        self.error_detail = ""
        self._runner = None

    def _set_runner(self, runner):
        self._runner = runner

    def run(self) -> bool:  # worker thread: no widgets, no project layers
        try:
            self.outcome = execute(self.params, lambda f: self.setProgress(100.0 * f), self.isCanceled,
                                   self._set_runner)
            return not self.isCanceled()
        except Canceled:
            return False
        except InputError as exc:
            self.error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - reported in the panel, never crashes QGIS
            self.error = tr("The analysis failed: {err}").format(err=f"{type(exc).__name__}: {exc}")
            self.error_detail = traceback.format_exc()
            return False

    def cancel(self):
        runner = self._runner
        if runner is not None:  # tell the backend too, without blocking the GUI on the request
            threading.Thread(target=runner.cancel, name="refound-cancel", daemon=True).start()
        super().cancel()

    def finished(self, ok: bool):  # main thread
        if self.isCanceled() or (not ok and not self.error):
            self.outcome = None
            self.done.emit(None, tr("Analysis canceled; no layer was created."), "info")
            return
        if not ok:
            if self.error_detail:
                from qgis.core import Qgis, QgsMessageLog

                QgsMessageLog.logMessage(self.error_detail, "ReFound", Qgis.Critical)
            self.done.emit(None, self.error, "critical" if self.error_detail else "warning")
            return
        try:
            layer = materialize_outcome(self.params, self.outcome)
            results.add_to_project(layer, self.params.input_layer_ids)
        except InputError as exc:
            self.done.emit(None, str(exc), "warning")
            return
        except Exception as exc:  # noqa: BLE001
            self.done.emit(None, tr("The result layer could not be created: {err}").format(err=exc), "critical")
            return
        msg = tr("{task}: {n} cells → layer '{name}'.").format(task=task_label(self.params.task),
                                                              n=self.outcome.n_cells, name=layer.name())
        if self.outcome.notices:
            msg += " " + " ".join(self.outcome.notices)
        self.done.emit(layer, msg, "success")
