"""The plugin object QGIS loads: actions, the dock, and the Processing provider.

``initProcessing`` registers the provider (QGIS calls it on its own in ``qgis_process`` where
there is no GUI); ``initGui`` adds the "Analyze extent" action to a toolbar and the Plugins menu,
the panel toggle, diagnostics, and the dock; ``unload`` removes every one of them again.
"""
from __future__ import annotations

import os

from qgis.core import QgsApplication, QgsSettings
from qgis.PyQt.QtCore import QCoreApplication, Qt, QTranslator
from qgis.PyQt.QtWidgets import QAction

from .icon import plugin_icon
from .settings import plugin_dir, tr

MENU = "&ReFound"


class RefoundPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.dock = None
        self.actions = []
        self.toolbar = None
        self.analyze_action = None
        self.panel_action = None
        self.diagnostics_action = None
        self.setup_action = None
        self.translator = self._install_translator()

    @staticmethod
    def _install_translator():
        """Load i18n/refound_<locale>.qm when the build ships one for QGIS's locale."""
        locale = str(QgsSettings().value("locale/userLocale", "") or "")[:2]
        qm = os.path.join(plugin_dir(), "i18n", f"refound_{locale}.qm")
        if not locale or not os.path.isfile(qm):
            return None
        translator = QTranslator()
        if not translator.load(qm):
            return None
        QCoreApplication.installTranslator(translator)
        return translator

    # ------------------------------------------------------------------ Processing
    def initProcessing(self):  # noqa: N802 - QGIS's name
        if self.provider is not None:
            return
        from .processing.provider import RefoundProvider

        self.provider = RefoundProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    # ------------------------------------------------------------------ GUI
    def initGui(self):  # noqa: N802 - QGIS's name
        self.initProcessing()
        if self.iface is None:
            return
        from .auth import migrate_plain_token

        migrate_plain_token()  # a token an older version kept in QgsSettings moves to the auth database
        icon = plugin_icon()
        main = self.iface.mainWindow()
        self.analyze_action = QAction(icon, tr("Analyze extent"), main)
        self.analyze_action.setObjectName("refoundAnalyzeExtent")
        self.analyze_action.setToolTip(tr("ReFound: predict for the grid cells of the current map extent"))
        self.analyze_action.triggered.connect(self.analyze_extent)
        self.panel_action = QAction(icon, tr("ReFound panel"), main)
        self.panel_action.setObjectName("refoundPanel")
        self.panel_action.setCheckable(True)
        self.panel_action.toggled.connect(self._toggle_dock)
        self.diagnostics_action = QAction(tr("Diagnostics…"), main)
        self.diagnostics_action.setObjectName("refoundDiagnostics")
        self.diagnostics_action.triggered.connect(self.show_diagnostics)
        self.setup_action = QAction(tr("Set up model backend…"), main)
        self.setup_action.setObjectName("refoundSetupBackend")
        self.setup_action.triggered.connect(self.show_backend_setup)
        self.actions = [self.analyze_action, self.panel_action, self.diagnostics_action, self.setup_action]

        self.iface.addToolBarIcon(self.analyze_action)
        for action in self.actions:
            self.iface.addPluginToMenu(MENU, action)

        from .dock import RefoundDock

        self.dock = RefoundDock(self.iface, main)
        self.dock.setObjectName("RefoundDock")
        self.dock.visibilityChanged.connect(self._dock_visibility)
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()

    def _dock_visibility(self, visible):
        if self.panel_action is not None and self.panel_action.isChecked() != bool(visible):
            self.panel_action.blockSignals(True)
            self.panel_action.setChecked(bool(visible))
            self.panel_action.blockSignals(False)

    def _toggle_dock(self, checked):
        if self.dock is not None:
            self.dock.setVisible(bool(checked))
            if checked:
                self.dock.raise_()

    def analyze_extent(self):
        """Show the panel and analyse the current map extent when the inputs are complete."""
        if self.dock is None:
            return
        self.dock.show()
        self.dock.raise_()
        if self.dock.inputs_ready():
            self.dock.start_analysis()

    def show_diagnostics(self):
        from .diagnostics import DiagnosticsDialog

        dlg = DiagnosticsDialog(self.iface.mainWindow() if self.iface else None)
        dlg.exec()

    def show_backend_setup(self):
        from .dock_setup import open_setup_dialog

        open_setup_dialog(self.dock, self.iface.mainWindow() if self.iface else None)

    def unload(self):
        if self.dock is not None:
            self.dock.cancel_analysis()
            if self.iface is not None:
                self.iface.removeDockWidget(self.dock)
            self.dock.shutdown()
            self.dock.deleteLater()
            self.dock = None
        if self.iface is not None:
            if self.analyze_action is not None:
                self.iface.removeToolBarIcon(self.analyze_action)
            for action in self.actions:
                self.iface.removePluginMenu(MENU, action)
                action.deleteLater()
        self.actions = []
        self.analyze_action = self.panel_action = self.diagnostics_action = self.setup_action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        from .backend import stop_local_backends

        stop_local_backends()
        if self.translator is not None:
            QCoreApplication.removeTranslator(self.translator)
            self.translator = None
