"""The ReFound panel: pick inputs, run on the current map extent, watch progress, cancel.

The dock gathers the user's choices into ``task.AnalysisParams`` for ``task.AnalysisTask`` (``dock_run``);
the analysis itself is ``run_analysis``, as for the Processing algorithms and ``refound predict``.
"""
from __future__ import annotations

from qgis.core import QgsFieldProxyModel, QgsMapLayerProxyModel, QgsVectorLayer
from qgis.gui import QgsDockWidget, QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox, QgsPasswordLineEdit
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from refound_core.errors import InputError

from . import auth, settings
from .dock_run import AnalysisRunMixin
from .settings import BACKENDS, DEVICES, TASKS, tr

# Field names tried, in order, when a POI layer is picked for the first time.
NAME_FIELD_GUESSES = ("name", "poi_name", "title", "label")
CATEGORY_FIELD_GUESSES = ("category", "poi_category", "cat", "type", "fclass", "amenity", "shop", "class")


def _guess_field(layer: QgsVectorLayer, guesses) -> str:
    names = [f.name() for f in layer.fields()]
    lower = {n.lower(): n for n in names}
    for g in guesses:
        if g in lower:
            return lower[g]
    return ""


class RefoundDock(AnalysisRunMixin, QgsDockWidget):
    """Dock widget. ``analysis_finished(layer or None, message)`` fires once per run (also for
    refused inputs and cancels), so callers and tests can wait on one signal."""

    analysis_finished = pyqtSignal(object, str)

    def __init__(self, iface, parent=None):
        super().__init__(tr("ReFound urban regions"), parent)
        self.iface = iface
        self.current_task = None
        self.last_layer = None
        self.last_message = ""
        self._build()
        self._restore()
        self._connect()
        self.update_estimate()

    # ------------------------------------------------------------------ construction
    def _build(self):
        body = QWidget(self)
        outer = QVBoxLayout(body)

        inputs = QGroupBox(tr("Inputs"), body)
        form = QFormLayout(inputs)
        self.poi_combo = QgsMapLayerComboBox(inputs)
        self.poi_combo.setFilters(QgsMapLayerProxyModel.PointLayer)
        self.poi_combo.setAllowEmptyLayer(True)
        self.poi_combo.setToolTip(tr("Point layer of POIs (points of interest) with a name and a category field"))
        form.addRow(tr("POI layer"), self.poi_combo)
        self.name_field = QgsFieldComboBox(inputs)
        self.name_field.setFilters(QgsFieldProxyModel.String | QgsFieldProxyModel.Numeric)
        self.name_field.setAllowEmptyFieldName(True)
        form.addRow(tr("POI name field"), self.name_field)
        self.category_field = QgsFieldComboBox(inputs)
        self.category_field.setAllowEmptyFieldName(True)
        form.addRow(tr("POI category field"), self.category_field)
        self.imagery_combo = QgsMapLayerComboBox(inputs)
        self.imagery_combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.imagery_combo.setAllowEmptyLayer(True)
        self.imagery_combo.setToolTip(tr("Satellite / aerial imagery as rendered in QGIS (optional: POI-only without it)"))
        form.addRow(tr("Imagery layer"), self.imagery_combo)
        outer.addWidget(inputs)

        model = QGroupBox(tr("Model"), body)
        mform = QFormLayout(model)
        self.task_combo = QComboBox(model)
        for key, label in TASKS:
            self.task_combo.addItem(tr(label), key)
        mform.addRow(tr("Task"), self.task_combo)
        self.checkpoint_widget = QgsFileWidget(model)
        self.checkpoint_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.checkpoint_widget.setDialogTitle(tr("ReFound checkpoint folder"))
        mform.addRow(tr("Checkpoint"), self.checkpoint_widget)
        self.backend_combo = QComboBox(model)
        for key, label in BACKENDS:
            self.backend_combo.addItem(tr(label), key)
        mform.addRow(tr("Backend"), self.backend_combo)
        self.backend_python_widget = QgsFileWidget(model)
        self.backend_python_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.backend_python_widget.setToolTip(tr("Python environment (venv folder) with PyTorch and refound "
                                                 "installed, for the local backend"))
        self.backend_python_label = QLabel(tr("Backend environment"), model)
        mform.addRow(self.backend_python_label, self.backend_python_widget)
        self.backend_url_edit = QLineEdit(model)
        self.backend_url_edit.setPlaceholderText("http://127.0.0.1:8765")
        self.backend_url_label = QLabel(tr("Server URL"), model)
        mform.addRow(self.backend_url_label, self.backend_url_edit)
        self.backend_token_edit = QgsPasswordLineEdit(model)
        self.backend_token_label = QLabel(tr("Server token"), model)
        mform.addRow(self.backend_token_label, self.backend_token_edit)
        self.device_combo = QComboBox(model)
        for d in DEVICES:
            self.device_combo.addItem({"auto": tr("automatic"), "cuda": tr("GPU (CUDA)"), "cpu": tr("CPU")}[d], d)
        mform.addRow(tr("Device"), self.device_combo)
        self.cell_size_spin = QDoubleSpinBox(model)
        self.cell_size_spin.setRange(10.0, 100000.0)
        self.cell_size_spin.setDecimals(1)
        self.cell_size_spin.setSuffix(" m")
        self.cell_size_spin.setToolTip(tr("Side of a grid cell in metres (paper: 256 m)"))
        mform.addRow(tr("Cell size"), self.cell_size_spin)
        self.batch_spin = QSpinBox(model)
        self.batch_spin.setRange(1, 1024)
        mform.addRow(tr("Batch size"), self.batch_spin)
        self.output_widget = QgsFileWidget(model)
        self.output_widget.setStorageMode(QgsFileWidget.SaveFile)
        self.output_widget.setFilter(tr("GeoPackage (*.gpkg)"))
        self.output_widget.setToolTip(tr("Leave empty for a temporary layer"))
        mform.addRow(tr("Output GeoPackage"), self.output_widget)
        outer.addWidget(model)

        self.estimate_label = QLabel("", body)
        self.estimate_label.setWordWrap(True)
        outer.addWidget(self.estimate_label)
        buttons = QHBoxLayout()
        self.run_button = QPushButton(tr("Analyze extent"), body)
        self.cancel_button = QPushButton(tr("Cancel"), body)
        self.cancel_button.setEnabled(False)
        self.diagnostics_button = QPushButton(tr("Diagnostics…"), body)
        for b in (self.run_button, self.cancel_button, self.diagnostics_button):
            buttons.addWidget(b)
        outer.addLayout(buttons)
        self.progress_bar = QProgressBar(body)
        self.progress_bar.setRange(0, 100)
        self.progress_bar.setValue(0)
        outer.addWidget(self.progress_bar)
        self.status_label = QLabel("", body)
        self.status_label.setWordWrap(True)
        outer.addWidget(self.status_label)
        outer.addStretch(1)
        # Combos otherwise size to their longest entry (e.g. the backend's) and the panel
        # squeezes the map canvas on a laptop screen.
        for combo in body.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)
            combo.setMinimumWidth(80)
        from . import dock_explore, dock_guard, dock_setup  # Explore tab; cell limits; "Set up model backend…"
        self.setup_button = dock_setup.add_setup_button(self, mform)
        self.max_cells_spin, self.confirm_cells_spin = dock_guard.add_limits(self, mform)  # + preselects layers
        self.tabs, self.explore_panel = dock_explore.add_tabs(self, body)

    def _restore(self):
        self._set_combo_data(self.task_combo, settings.value("task"))
        self._set_combo_data(self.backend_combo, settings.value("backend"))
        self._set_combo_data(self.device_combo, settings.value("device"))
        self.checkpoint_widget.setFilePath(settings.default_checkpoint_dir())
        self.backend_python_widget.setFilePath(str(settings.value("backend_python") or ""))
        self.backend_url_edit.setText(str(settings.value("backend_url") or ""))
        self._show_token_state()
        self.cell_size_spin.setValue(float(settings.value("cell_size")))
        self.batch_spin.setValue(int(settings.value("batch_size")))
        self.output_widget.setFilePath(str(settings.value("output_path") or ""))
        self._poi_layer_changed(self.poi_combo.currentLayer())
        self._backend_changed()

    def _connect(self):
        self.poi_combo.layerChanged.connect(self._poi_layer_changed)
        self.name_field.fieldChanged.connect(self._remember_fields)
        self.category_field.fieldChanged.connect(self._remember_fields)
        self.backend_combo.currentIndexChanged.connect(self._backend_changed)
        self.cell_size_spin.valueChanged.connect(self.update_estimate)
        self.run_button.clicked.connect(self.start_analysis)
        self.cancel_button.clicked.connect(self.cancel_analysis)
        self.diagnostics_button.clicked.connect(self._show_diagnostics)
        canvas = self._canvas()
        if canvas is not None:
            canvas.extentsChanged.connect(self.update_estimate)
            canvas.destinationCrsChanged.connect(self.update_estimate)

    def shutdown(self):
        """Disconnect from the canvas (called by the plugin's unload)."""
        self.explore_panel.shutdown()
        canvas = self._canvas()
        if canvas is not None:
            for sig in (canvas.extentsChanged, canvas.destinationCrsChanged):
                try:
                    sig.disconnect(self.update_estimate)
                except (TypeError, RuntimeError):
                    pass

    @staticmethod
    def _set_combo_data(combo: QComboBox, data):
        i = combo.findData(data)
        if i >= 0:
            combo.setCurrentIndex(i)

    def _canvas(self):
        try:
            return self.iface.mapCanvas() if self.iface is not None else None
        except (AttributeError, RuntimeError):
            return None

    # ------------------------------------------------------------------ reactions
    def _poi_layer_changed(self, layer):
        self._loading_fields = True
        try:
            lyr = layer if isinstance(layer, QgsVectorLayer) else None
            self.name_field.setLayer(lyr)
            self.category_field.setLayer(lyr)
            if lyr is None:
                return
            name, cat = settings.field_mapping(lyr.source())
            names = set(lyr.fields().names())
            self.name_field.setField(name if name in names else _guess_field(lyr, NAME_FIELD_GUESSES))
            self.category_field.setField(cat if cat in names else _guess_field(lyr, CATEGORY_FIELD_GUESSES))
        finally:
            self._loading_fields = False

    def _remember_fields(self, *_):
        if getattr(self, "_loading_fields", False):
            return
        layer = self.poi_combo.currentLayer()
        if isinstance(layer, QgsVectorLayer):
            settings.set_field_mapping(layer.source(), self.name_field.currentField(), self.category_field.currentField())

    def _backend_changed(self, *_):
        b = self.backend_combo.currentData()
        for w in (self.backend_python_label, self.backend_python_widget):
            w.setVisible(b in ("auto", "local"))
        for w in (self.backend_url_label, self.backend_url_edit, self.backend_token_label, self.backend_token_edit):
            w.setVisible(b == "remote")

    def _show_diagnostics(self):
        from .diagnostics import DiagnosticsDialog

        DiagnosticsDialog(self, backend_settings=self._backend_settings()).exec()

    def update_estimate(self, *_):
        """Cells of the current extent and a rough time, before anything runs (USERS.md item 4)."""
        canvas = self._canvas()
        if canvas is None:
            return
        from .layer_io import count_cells

        try:
            n, crs = count_cells(canvas.extent(), canvas.mapSettings().destinationCrs(), self.cell_size_spin.value())
        except InputError as exc:
            self.estimate_label.setText(str(exc))
            return
        except Exception:  # noqa: BLE001 - an estimate must never break the panel
            self.estimate_label.setText("")
            return
        self.estimate_label.setText(tr("Current extent: {n} cells of {size:g} m in {crs}.")
                                    .format(n=f"{n:,}", size=self.cell_size_spin.value(), crs=crs))

    # ------------------------------------------------------------------ run
    def _backend_settings(self) -> dict:
        return {
            "backend": self.backend_combo.currentData(),
            "backend_python": self.backend_python_widget.filePath().strip(),
            "backend_url": self.backend_url_edit.text().strip(),
            "backend_authcfg": str(settings.value("backend_authcfg") or ""),
            "device": self.device_combo.currentData(),
            "checkpoint_dir": self.checkpoint_widget.filePath().strip(),
        }

    def _show_token_state(self):
        # The token is never shown back: it lives in QGIS's authentication database.
        self.backend_token_edit.clear()
        self.backend_token_edit.setPlaceholderText(
            tr("saved in the QGIS authentication database") if settings.value("backend_authcfg") else "")

    def _store_token(self):
        """A token typed into the panel goes to QgsAuthManager; QgsSettings keeps only the config id."""
        if self.backend_token_edit.text().strip():
            auth.remember_token(self.backend_token_edit.text().strip())
            self._show_token_state()

    def _save_settings(self):
        self._store_token()
        for k, v in self._backend_settings().items():
            settings.set_value(k, v)
        settings.set_value("task", self.task_combo.currentData())
        settings.set_value("cell_size", float(self.cell_size_spin.value()))
        settings.set_value("batch_size", int(self.batch_spin.value()))
        settings.set_value("output_path", self.output_widget.filePath().strip())
