"""The QGIS end of the one analysis path: a :class:`refound_core.inference.sinks.ResultSink`
that becomes a QGIS layer.

``run_analysis`` runs in a worker thread (QgsTask, or Processing's), where no project layer may
be touched; :class:`QgisLayerSink` therefore keeps the cells' results (a QGIS extent is bounded
by the ``max_cells`` setting); :mod:`refound_qgis.results` turns them into features afterwards
(main thread), for the dock's styled layer and for a Processing feature sink alike. The fields
are the core writers' (plus every extra per-cell output the model returned); embeddings become
``emb_000...`` with their first principal component as ``prediction``.
"""
from __future__ import annotations

from typing import Optional

from refound_core.inference.sinks import ResultSink, RunInfo


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
