"""The QGIS end of the one analysis path: a :class:`refound_core.inference.sinks.ResultSink`
that becomes a QGIS layer.

``run_analysis`` runs in a worker thread (QgsTask, or Processing's), where no project layer may
be touched; :class:`QgisLayerSink` therefore keeps the cells' results (a QGIS extent is bounded
by the ``max_cells`` setting) and turns them into features afterwards, in one place for both
targets: a styled memory / GeoPackage layer for the dock (:meth:`QgisLayerSink.layer`, main
thread) or a Processing feature sink (:meth:`QgisLayerSink.write_features`). The fields are the
core writers' (plus every extra per-cell output the model returned); embeddings become
``emb_000...`` with their first principal component as ``prediction``.
"""
from __future__ import annotations

import datetime as _dt
from typing import Optional

from qgis.core import QgsFeatureSink

from refound_core.inference.sinks import ResultSink, RunInfo

from . import results


class QgisLayerSink(ResultSink):
    """Collects one run's results; ``task`` is the plugin's task name (``embedding`` for embeddings)."""

    def __init__(self, task: str):
        self.task = task
        self.info: Optional[RunInfo] = None
        self.cells: list = []

    def open(self, info: RunInfo) -> None:
        self.info = info
        self.cells = []

    def write(self, result) -> None:
        self.cells.append(result)

    def close(self) -> "QgisLayerSink":
        return self

    def abort(self) -> None:
        self.cells = []

    # ------------------------------------------------------------------ targets
    def fields(self):
        """``(QgsFields, embedding dim, extras)`` of the collected cells."""
        dim = results.embedding_dim_of(self.cells) if self.task == "embedding" else 0
        extras = results.extra_fields_of(self.cells)
        return results.result_fields(dim, extras), dim, extras

    def write_features(self, feature_sink) -> int:
        """Add every cell to a Processing feature sink (made with :meth:`fields`); returns the
        number of cells predicted (sufficient)."""
        fields, dim, extras = self.fields()
        predicted = 0
        for f in results.make_features(self.cells, fields, dim, extras):
            predicted += int(f.attribute(results.SUFFICIENT) or 0)
            feature_sink.addFeature(f, QgsFeatureSink.Flag.FastInsert)
        return predicted

    def layer(self, model_name: str, output_path: str = "", checkpoint: str = "", inputs: Optional[dict] = None,
              kind: Optional[str] = None, backend: str = "", classes: Optional[list] = None):
        """The styled result layer (memory, or the GeoPackage at ``output_path``), not yet in the
        project; main thread."""
        return results.build_result_layer(self.cells, self.info.crs, self.task, model_name, output_path=output_path,
                                          checkpoint=checkpoint, inputs=inputs, kind=kind, backend=backend,
                                          when=_dt.datetime.now(), classes=classes)
