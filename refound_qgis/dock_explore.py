"""The dock's "Explore" tab: pick an embedding layer, then click a cell on the map (a map tool) and
the cells most like it light up as a new similarity layer; or colour / cluster the whole layer.

Everything is computed by ``refound_core.explore`` (as ``refound explore`` and the Processing
algorithms do); this file only turns a QGIS layer into an ``EmbeddingTable`` and the result back
into a styled memory layer. These computations take well under a second for a city's cells, so
they run on the GUI thread; the progress bar shows the steps.
"""
from __future__ import annotations

import numpy as np
from qgis.core import (
    QgsCoordinateTransform,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsMapLayerProxyModel,
    QgsPointXY,
    QgsProject,
    QgsVectorLayer,
)
from qgis.gui import QgsMapLayerComboBox, QgsMapToolEmitPoint
from qgis.PyQt.QtCore import QVariant, pyqtSignal
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

from . import explore_styles
from .settings import tr


def table_from_layer(layer: QgsVectorLayer):
    """The layer's ``emb_000...`` fields as a core ``EmbeddingTable`` (any provider, memory too)."""
    from refound_core.explore.io import EMB_FIELD, EmbeddingTable, _check_rows

    names = [f.name() for f in layer.fields()]
    emb = sorted((int(m.group(1)), n) for n in names if (m := EMB_FIELD.match(n)))
    if not emb or "cell_id" not in names:
        raise InputError(tr("layer {l} has no cell_id and emb_000... fields; compute region embeddings first")
                         .format(l=layer.name()))
    idx = [layer.fields().indexOf(n) for _, n in emb]
    ids, rows, geoms = [], [], []
    for f in layer.getFeatures():
        attrs = f.attributes()
        ids.append(str(f["cell_id"]))
        rows.append([np.nan if attrs[i] is None or attrs[i] == QVariant() else float(attrs[i]) for i in idx])
        geoms.append(bytes(f.geometry().asWkb()))
    if not ids:
        raise InputError(tr("layer {l} has no cells").format(l=layer.name()))
    mat = np.asarray(rows, dtype=np.float32)
    valid = _check_rows(mat, layer.name())
    return EmbeddingTable(layer.name(), np.asarray(ids, dtype=object), mat, valid, np.asarray(geoms, dtype=object),
                          layer.crs().authid(), column="emb")


def result_layer(table, columns: dict, title: str, kind: str) -> QgsVectorLayer:
    """A memory polygon layer: cell_id + ``columns`` (float, int, bool or str arrays), styled."""
    layer = QgsVectorLayer(f"Polygon?crs={table.crs}", title, "memory")
    types = {}
    fields = [QgsField("cell_id", QVariant.String)]
    for name, values in columns.items():
        a = np.asarray(values)
        types[name] = (QVariant.Double if a.dtype.kind == "f" else QVariant.Int if a.dtype.kind in "iub"
                       else QVariant.String)
        fields.append(QgsField(name, types[name]))
    layer.dataProvider().addAttributes(fields)
    layer.updateFields()
    feats = []
    for i, cid in enumerate(table.cell_ids):
        f = QgsFeature(layer.fields())
        g = QgsGeometry()
        g.fromWkb(table.geometry[i])
        f.setGeometry(g)
        vals = [str(cid)]
        for name, values in columns.items():
            v = values[i]
            if types[name] == QVariant.Double:
                vals.append(None if not np.isfinite(v) else float(v))
            elif types[name] == QVariant.Int:
                vals.append(int(v))
            else:
                vals.append(v)
        f.setAttributes(vals)
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    layer.updateExtents()
    explore_styles.style_layer(layer, kind)
    return layer


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
        buttons.addWidget(self.pick_button)
        buttons.addWidget(self.run_button)
        outer.addLayout(buttons)
        self.progress_bar = QProgressBar(self)
        self.progress_bar.setRange(0, 100)
        outer.addWidget(self.progress_bar)
        self.status_label = QLabel("", self)
        self.status_label.setWordWrap(True)
        outer.addWidget(self.status_label)
        outer.addStretch(1)
        self.map_tool = None
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

        self.progress_bar.setValue(5)
        try:
            table = table_from_layer(layer)
            self.progress_bar.setValue(40)
            if action == "similar":
                res = similar.find_similar(table, query, None, self.top_k_spin.value())
                top = np.zeros(len(table.cell_ids), dtype=bool)
                top[res["top"]] = True
                cols = {"similarity": res["similarity"], "rank": res["rank"], "top_k": top}
                title = tr("Similar to {c}").format(c=query[0])
            elif action == "cluster":
                res = cluster.cluster(table)
                cols, title = {"cluster": res["cluster"]}, tr("Clusters (k={k})").format(k=res["k"])
            else:
                res = colours.embedding_colours(table)
                c = res["components"]
                cols = {"colour": np.asarray(res["colour"], dtype=object), "pc1": c[:, 0], "pc2": c[:, 1],
                        "pc3": c[:, 2]}
                title = tr("Embedding colours")
        except InputError as exc:
            self.progress_bar.setValue(0)
            return self._done(None, str(exc))
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
        if self.pick_button.isChecked():
            self.pick_button.setChecked(False)
