"""The backend set-up as a QgsTask (:func:`refound_qgis.backend_install_run.install` off the GUI
thread), and what a finished set-up changes: the plugin's backend settings point at the new venv.
"""
from __future__ import annotations

import os

from qgis.core import QgsApplication, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from . import backend_install, settings
from .settings import tr

backend_install.translate = tr


def default_venv_dir() -> str:
    """``<QGIS profile>/refound/backend-venv``: per profile, removed with the profile."""
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "refound", "backend-venv")


def default_log_path() -> str:
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "refound", "backend-setup.log")


class BackendSetupTask(QgsTask):
    """``status(str)`` while it runs (queued to the GUI thread), ``done(dict)`` once at the end with
    the result of :func:`~refound_qgis.backend_install_run.install`."""

    status = pyqtSignal(str)
    done = pyqtSignal(dict)

    def __init__(self, options):
        super().__init__(tr("ReFound: set up model backend"), QgsTask.Flag.CanCancel)
        self.options = options
        self.result = None

    def run(self):  # worker thread: no widgets touched here
        from .backend_install_run import install

        def report(fraction, text):
            self.setProgress(max(0.0, min(100.0, 100.0 * fraction)))
            self.status.emit(text)

        try:
            self.result = install(self.options, report=report, is_canceled=self.isCanceled)
        except Exception as exc:  # noqa: BLE001 - shown to the user as one message, never a crash
            self.result = {"ok": False, "kind": "internal", "message": f"{type(exc).__name__}: {exc}",
                           "log": self.options.log_path}
        return bool(self.result.get("ok"))

    def finished(self, ok):  # GUI thread
        res = self.result or {"ok": False, "kind": "canceled", "message": tr("Set-up canceled."),
                              "log": self.options.log_path}
        if res.get("ok"):
            use_backend(self.options.venv_dir)
        self.done.emit(res)


def use_backend(venv_dir: str) -> None:
    """Point the plugin's backend at the venv: analyses then run in a backend process started from it."""
    settings.set_value("backend_python", venv_dir)
    settings.set_value("backend", "local")
