""""Set up model backend…": the dialog (folder, offline wheelhouse, torch build, progress, log,
cancel, the doctor's report) and the one button it adds to the dock (docs/INSTALL.md).

The work is :class:`refound_qgis.setup_task.BackendSetupTask`; when it succeeds the dock's backend
becomes *Local backend process* with the new venv as its environment.
"""
from __future__ import annotations

import json
import os

from qgis.core import QgsApplication
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import QUrl, pyqtSignal
from qgis.PyQt.QtGui import QDesktopServices
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
)

from . import backend_install as bi
from .settings import tr
from .setup_task import BackendSetupTask, default_log_path, default_venv_dir

BUILDS = (("auto", "Automatic (match the NVIDIA driver, else CPU)"), ("cpu", "CPU only"),
          ("cu130", "CUDA 13.0"), ("cu128", "CUDA 12.8"), ("cu126", "CUDA 12.6"), ("default", "PyPI's default build"))


class BackendSetupDialog(QDialog):
    """``setup_finished(result dict)`` once per run (success, failure or cancel)."""

    setup_finished = pyqtSignal(dict)

    def __init__(self, parent=None, dock=None):
        super().__init__(parent)
        self.dock = dock
        self.task = None
        self.result = None
        self.setWindowTitle(tr("Set up the ReFound model backend"))
        self.resize(640, 480)
        layout = QVBoxLayout(self)
        intro = QLabel(tr("Creates a Python environment with PyTorch and refound for the model, in your QGIS "
                          "profile. The GPU build of PyTorch is chosen from the NVIDIA driver. Running it again "
                          "repairs a broken environment."), self)
        intro.setWordWrap(True)
        layout.addWidget(intro)
        form = QFormLayout()
        self.venv_widget = QgsFileWidget(self)
        self.venv_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.venv_widget.setFilePath(default_venv_dir())
        form.addRow(tr("Environment folder"), self.venv_widget)
        self.build_combo = QComboBox(self)
        for key, label in BUILDS:
            self.build_combo.addItem(tr(label), key)
        form.addRow(tr("PyTorch build"), self.build_combo)
        self.gpu_label = QLabel("", self)
        self.gpu_label.setWordWrap(True)
        form.addRow(tr("Detected"), self.gpu_label)
        self.wheelhouse_widget = QgsFileWidget(self)
        self.wheelhouse_widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.wheelhouse_widget.setToolTip(tr("Offline: a folder of wheels (pip download / pip wheel); nothing is "
                                             "downloaded then"))
        form.addRow(tr("Offline wheelhouse (optional)"), self.wheelhouse_widget)
        self.reuse_widget = QgsFileWidget(self)
        self.reuse_widget.setStorageMode(QgsFileWidget.StorageMode.GetFile)
        self.reuse_widget.setToolTip(tr("Advanced: a Python interpreter whose installed packages (e.g. a working "
                                        "PyTorch) the environment may use instead of installing them again"))
        form.addRow(tr("Reuse packages of (optional)"), self.reuse_widget)
        layout.addLayout(form)
        self.progress_bar = QProgressBar(self)
        self.progress_bar.setRange(0, 100)
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("", self)
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        self.report_text = QPlainTextEdit(self)
        self.report_text.setReadOnly(True)
        layout.addWidget(self.report_text)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        self.start_button = QPushButton(tr("Set up"), self)
        self.cancel_button = QPushButton(tr("Cancel set-up"), self)
        self.log_button = QPushButton(tr("Open log"), self)
        for b in (self.start_button, self.cancel_button, self.log_button):
            self.buttons.addButton(b, QDialogButtonBox.ButtonRole.ActionRole)
        self.cancel_button.setEnabled(False)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.log_button.clicked.connect(self.open_log)
        self.buttons.rejected.connect(self.reject)
        self.venv_widget.fileChanged.connect(lambda *_: self._show_state())  # Set up / Repair for that folder
        layout.addWidget(self.buttons)
        self._show_state()

    def _show_state(self):
        from .backend_install_run import venv_health

        gpu = bi.detect_gpu()
        _, _, note = bi.torch_build(gpu, "auto")
        self.gpu_label.setText(note)
        state, why = venv_health(self.venv_widget.filePath().strip())
        self.start_button.setText(tr("Repair") if state in ("broken", "incomplete") else tr("Set up"))
        if state != "missing":
            self.status_label.setText({"ok": tr("The environment is set up; run again to update or repair it."),
                                       "broken": tr("The environment is broken ({why}): Repair recreates it."),
                                       "incomplete": tr("An earlier set-up did not finish ({why}): Repair finishes it.")}
                                      [state].format(why=why))

    def options(self) -> bi.InstallOptions:
        return bi.InstallOptions(venv_dir=self.venv_widget.filePath().strip() or default_venv_dir(),
                                 wheelhouse=self.wheelhouse_widget.filePath().strip(),
                                 reuse_python=self.reuse_widget.filePath().strip(),
                                 gpu=self.build_combo.currentData())  # log: next to the venv

    def start(self, *_):
        if self.task is not None:
            return None
        self.result = None
        self.report_text.clear()
        self.task = BackendSetupTask(self.options())
        self.task.status.connect(self._status)
        self.task.progressChanged.connect(lambda v: self.progress_bar.setValue(int(v)))
        self.task.done.connect(self._done)
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setValue(0)
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def cancel(self, *_):
        if self.task is not None:
            self.status_label.setText(tr("Canceling (stopping pip) …"))
            self.task.cancel()

    def open_log(self, *_):
        venv = self.venv_widget.filePath().strip()
        path = (self.result or {}).get("log") or (os.path.join(os.path.dirname(venv), "backend-setup.log")
                                                  if venv else default_log_path())
        if os.path.isfile(path):
            QDesktopServices.openUrl(QUrl.fromLocalFile(path))

    def _status(self, text):
        self.status_label.setText(text)

    def _done(self, result):
        self.task = None
        self.result = result
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.status_label.setText(result.get("message", ""))
        if result.get("ok"):
            self.progress_bar.setValue(100)
            self.report_text.setPlainText(doctor_text(result))
            if self.dock is not None:
                apply_to_dock(self.dock, self.options().venv_dir)
        else:
            self.report_text.setPlainText(tr("Log: {log}").format(log=result.get("log", "")))
        self._show_state_after(result)
        self.setup_finished.emit(result)

    def _show_state_after(self, result):
        self.start_button.setText(tr("Run again") if result.get("ok") else tr("Repair"))


def doctor_text(result: dict) -> str:
    """``refound doctor``'s report in the venv, readable: python, packages, device, then the JSON."""
    doc = result.get("doctor") or {}
    lines = [tr("refound doctor in {py}:").format(py=result.get("python", "")), f"refound {doc.get('refound')}",
             f"python {doc.get('python')}"]
    lines += [f"{k:<13}{v}" for k, v in (doc.get("packages") or {}).items()]
    lines += [tr("device: {s}").format(s=(doc.get("device") or {}).get("summary", "")),
              tr("PyTorch build chosen: {t} ({n})").format(t=result.get("torch_build"), n=result.get("note")),
              "", json.dumps(doc, indent=2)]
    return "\n".join(lines)


def apply_to_dock(dock, venv_dir: str) -> None:
    """The dock's backend: local process from the new venv (settings are saved by setup_task)."""
    dock.backend_python_widget.setFilePath(venv_dir)
    i = dock.backend_combo.findData("local")
    if i >= 0:
        dock.backend_combo.setCurrentIndex(i)


def add_setup_button(dock, form: QFormLayout) -> QPushButton:
    """A "Set up model backend…" row under the dock's backend environment (auto / local backends)."""
    button = QPushButton(tr("Set up model backend…"), dock)
    button.setObjectName("refoundSetupBackend")
    button.setToolTip(tr("Create (or repair) a Python environment with PyTorch and refound in the QGIS profile"))
    row, _ = form.getWidgetPosition(dock.backend_python_widget)
    form.insertRow(row + 1, "", button)
    button.clicked.connect(lambda *_: open_setup_dialog(dock))

    def follow(*_):
        button.setVisible(dock.backend_combo.currentData() in ("auto", "local"))

    dock.backend_combo.currentIndexChanged.connect(follow)
    follow()
    return button


def open_setup_dialog(dock=None, parent=None):
    dlg = BackendSetupDialog(parent or dock, dock=dock)
    dlg.exec()
    return dlg
