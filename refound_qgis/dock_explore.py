"""The dock's "Explore" tab: pick an embedding layer, then click a cell on the map (a map tool) and
the cells most like it light up as a new similarity layer; or colour / cluster the whole layer.

Everything is computed by ``refound_core.explore`` (as ``refound explore`` and the Processing
algorithms do); this file only turns a QGIS layer into an ``EmbeddingTable`` and the result back
into a styled memory layer. The layer is read on the GUI thread (QGIS layers are not thread-safe);
the computation runs in a QgsTask (the task manager shows it; *Cancel* stops waiting for it and
drops its result, reported as canceled), and the result layer is built back on the GUI thread.
"""
from __future__ import annotations

import numpy as np
from qgis.core import (
    QgsApplication,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsMapLayerProxyModel,
    QgsPointXY,
    QgsProject,
    QgsTask,
)
from qgis.gui import QgsMapLayerComboBox, QgsMapToolEmitPoint
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from refound_core.errors import InputError

from .explore_layers import result_layer, table_from_layer
from .settings import tr


class ExploreTask(QgsTask):
    """Runs ``compute()`` off the GUI thread; ``result`` / ``error`` hold what it gave."""

    def __init__(self, title, compute):
        super().__init__(title, QgsTask.CanCancel)
        self.compute, self.result, self.error = compute, None, None

    def run(self):
        try:
            self.result = self.compute()
        except InputError as exc:
            self.error = str(exc)
            return False
        return not self.isCanceled()


class ExplorePanel(QWidget):
    """``result_ready(layer or None, message)`` fires once per action (tests wait on it)."""

    result_ready = pyqtSignal(object, str)

    def __init__(self, iface, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.last_layer = None
        outer = QVBoxLayout(self)
        form = QFormLayout()
        self.layer_combo = QgsMapLayerComboBox(self)
        self.layer_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.layer_combo.setToolTip(tr("A region-embedding layer (emb_000... fields), e.g. from "
                                       "'Compute region embeddings'"))
        form.addRow(tr("Embedding layer"), self.layer_combo)
        self.top_k_spin = QSpinBox(self)
        self.top_k_spin.setRange(1, 10000)
        self.top_k_spin.setValue(20)
        form.addRow(tr("Top k"), self.top_k_spin)
        self.action_combo = QComboBox(self)
        self.action_combo.addItem(tr("Embedding colours (PCA)"), "colours")
        self.action_combo.addItem(tr("Clusters (k by silhouette)"), "cluster")
        form.addRow(tr("Whole layer"), self.action_combo)
        outer.addLayout(form)
        buttons = QHBoxLayout()
        self.pick_button = QPushButton(tr("Click a cell: find similar"), self)
        self.pick_button.setCheckable(True)
        self.run_button = QPushButton(tr("Run"), self)
        self.cancel_button = QPushButton(tr("Cancel"), self)
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.pick_button)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        outer.addLayout(buttons)
        self.progress_bar = QProgressBar(self)
        self.progress_bar.setRange(0, 100)
        outer.addWidget(self.progress_bar)
        self.status_label = QLabel("", self)
        self.status_label.setWordWrap(True)
        outer.addWidget(self.status_label)
        outer.addStretch(1)
        self.map_tool = None
        self.task = None
        self.cancel_button.clicked.connect(self.cancel)
        self.pick_button.toggled.connect(self._toggle_tool)
        self.run_button.clicked.connect(self.run_whole_layer)

    # ------------------------------------------------------------------ map tool
    def _toggle_tool(self, on):
        canvas = self.iface.mapCanvas()
        if on:
            self.map_tool = QgsMapToolEmitPoint(canvas)
            self.map_tool.canvasClicked.connect(self.cell_clicked)
            canvas.setMapTool(self.map_tool)
        elif self.map_tool is not None:
            canvas.unsetMapTool(self.map_tool)
            self.map_tool = None

    def cell_clicked(self, point, button=None):
        """``point`` in the canvas CRS: the cell under it becomes the similarity query."""
        layer = self.layer_combo.currentLayer()
        if layer is None:
            return self._done(None, tr("Pick an embedding layer first."))
        canvas = self.iface.mapCanvas()
        tr_ = QgsCoordinateTransform(canvas.mapSettings().destinationCrs(), layer.crs(), QgsProject.instance())
        p = QgsGeometry.fromPointXY(tr_.transform(QgsPointXY(point)))
        hits = [f["cell_id"] for f in layer.getFeatures(p.boundingBox()) if f.geometry().intersects(p)]
        if not hits:
            return self._done(None, tr("No cell of {l} under the click.").format(l=layer.name()))
        self._run(layer, "similar", [str(hits[0])])

    # ------------------------------------------------------------------ actions
    def run_whole_layer(self):
        layer = self.layer_combo.currentLayer()
        if layer is None:
            return self._done(None, tr("Pick an embedding layer first."))
        self._run(layer, self.action_combo.currentData())

    def _run(self, layer, action, query=()):
        from refound_core.explore import cluster, colours, similar

        if self.task is not None:
            return self._done(None, tr("An Explore computation is still running; wait or cancel it."))
        self.progress_bar.setValue(5)
        try:
            table = table_from_layer(layer)
        except InputError as exc:
            self.progress_bar.setValue(0)
            return self._done(None, str(exc))
        self.progress_bar.setValue(30)
        top_k = self.top_k_spin.value()

        def compute():
            if action == "similar":
                res = similar.find_similar(table, query, None, top_k)
                top = np.zeros(len(table.cell_ids), dtype=bool)
                top[res["top"]] = True
                return {"similarity": res["similarity"], "rank": res["rank"], "top_k": top}, \
                    tr("Similar to {c}").format(c=query[0])
            if action == "cluster":
                res = cluster.cluster(table)
                return {"cluster": res["cluster"]}, tr("Clusters (k={k})").format(k=res["k"])
            res = colours.embedding_colours(table)
            c = res["components"]
            return {"colour": np.asarray(res["colour"], dtype=object), "pc1": c[:, 0], "pc2": c[:, 1],
                    "pc3": c[:, 2]}, tr("Embedding colours")

        task = ExploreTask(tr("ReFound Explore: {a}").format(a=action), compute)
        task.taskCompleted.connect(lambda: self._finished(task, table, layer, action))
        task.taskTerminated.connect(lambda: self._finished(task, table, layer, action))
        self.task = task
        self.cancel_button.setEnabled(True)
        self.run_button.setEnabled(False)
        QgsApplication.taskManager().addTask(task)
        return None

    def cancel(self):
        if self.task is not None:
            self.task.cancel()

    def _finished(self, task, table, layer, action):
        self.task = None
        self.cancel_button.setEnabled(False)
        self.run_button.setEnabled(True)
        if task.isCanceled():
            self.progress_bar.setValue(0)
            return self._done(None, tr("Canceled: nothing was added."))
        if task.error or task.result is None:
            self.progress_bar.setValue(0)
            return self._done(None, task.error or tr("The Explore computation failed; see the QGIS log."))
        cols, title = task.result
        self.progress_bar.setValue(80)
        out = result_layer(table, cols, f"{title} ({layer.name()})", action)
        QgsProject.instance().addMapLayer(out)
        self.progress_bar.setValue(100)
        return self._done(out, tr("{t}: {n} cells").format(t=title, n=len(table.cell_ids)))

    def _done(self, layer, message):
        self.last_layer = layer
        self.status_label.setText(message)
        self.result_ready.emit(layer, message)
        return layer

    def shutdown(self):
        self.cancel()
        if self.pick_button.isChecked():
            self.pick_button.setChecked(False)


def add_tabs(dock, body):
    """The dock's tabs: ``body`` (Analyze) and the Explore panel; ``(tabs, explore_panel)``.

    Labels are never cut, however narrow the user drags the panel: form rows wrap their field
    below a label that does not fit beside it, and each tab scrolls instead of squeezing."""
    from qgis.PyQt.QtWidgets import QFrame, QScrollArea, QTabWidget

    from .settings import tr

    def scrollable(page):
        for form in page.findChildren(QFormLayout):
            form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        area = QScrollArea(tabs)
        area.setWidgetResizable(True)
        area.setFrameShape(QFrame.Shape.NoFrame)
        area.setWidget(page)
        return area

    tabs = QTabWidget(dock)
    tabs.addTab(scrollable(body), tr("Analyze"))
    panel = ExplorePanel(dock.iface, tabs)
    tabs.addTab(scrollable(panel), tr("Explore"))
    dock.setWidget(tabs)
    return tabs, panel
