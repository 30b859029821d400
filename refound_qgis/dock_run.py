"""The dock's run: widgets -> :class:`~refound_qgis.task.AnalysisParams` (layer snapshots on the
main thread), the QgsTask, progress, cancel and the one ``analysis_finished`` signal per run.

A mixin of :class:`refound_qgis.dock.RefoundDock` (which builds the widgets these methods read),
kept apart so the panel's layout and its run logic each stay small.
"""
from __future__ import annotations

from typing import Optional

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer

from refound_core.errors import InputError

from . import settings
from .settings import tr


class AnalysisRunMixin:
    """Run methods of the dock; ``self`` is the RefoundDock."""

    def inputs_ready(self) -> bool:
        return self.poi_combo.currentLayer() is not None and bool(self.checkpoint_widget.filePath().strip())

    def build_params(self):
        """AnalysisParams from the widgets (main thread; layer snapshots taken here)."""
        from .layer_io import ImageryInput, PoiInput
        from .task import AnalysisParams

        canvas = self._canvas()
        if canvas is None:
            raise InputError(tr("There is no map canvas to take the extent from."))
        poi_layer = self.poi_combo.currentLayer()
        pois = PoiInput.from_layer(poi_layer, self.name_field.currentField(), self.category_field.currentField())
        raster = self.imagery_combo.currentLayer()
        imagery = ImageryInput.from_layer(raster) if isinstance(raster, QgsRasterLayer) else None
        b = self._backend_settings()
        if b["backend"] == "remote":
            from .auth import token_for

            if not token_for(b["backend_authcfg"]):  # read here too: a locked database is unlocked on this thread
                raise InputError(tr("The running-server backend needs the token from the server's token file: "
                                    "paste it into 'Server token'."))
        return AnalysisParams(
            task=self.task_combo.currentData(),
            extent=canvas.extent(),
            extent_crs=canvas.mapSettings().destinationCrs(),
            cell_size=float(self.cell_size_spin.value()),
            batch_size=int(self.batch_spin.value()),
            device=b["device"],
            checkpoint_dir=b["checkpoint_dir"],
            backend=b["backend"],
            backend_python=b["backend_python"],
            backend_url=b["backend_url"],
            backend_authcfg=b["backend_authcfg"],
            output_path=self.output_widget.filePath().strip(),
            max_cells=int(settings.value("max_cells")),
            pois=pois,
            imagery=imagery,
            input_layer_ids=[lyr.id() for lyr in (poi_layer, raster) if lyr is not None],
            input_names={"POIs": poi_layer.name() if poi_layer else "",
                         "imagery": raster.name() if raster is not None else tr("none")},
            transform_context=QgsProject.instance().transformContext(),
        )

    def start_analysis(self, *_) -> Optional[object]:
        """Start an AnalysisTask on the current extent; refused inputs end in a message, no crash."""
        if self.current_task is not None:
            self._report(tr("An analysis is already running; cancel it first."), level="warning", emit=False)
            return None
        try:
            self._save_settings()  # a typed token goes to the auth database here (may ask to unlock it)
            params = self.build_params()
        except InputError as exc:
            self._done(None, str(exc), level="warning")
            return None
        from .dock_guard import confirm_cost

        if not confirm_cost(self, params):
            self.progress_bar.setValue(0)
            self._done(None, tr("Not started: zoom in or use larger cells for a smaller analysis."))
            return None
        from .task import AnalysisTask

        task = AnalysisTask(params)
        task.progressChanged.connect(self._progress)
        task.done.connect(self._task_done)
        self.current_task = task
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setValue(0)
        self.status_label.setText(tr("Running {task} on {n} …").format(task=settings.task_label(params.task),
                                                                        n=tr("the current extent")))
        QgsApplication.taskManager().addTask(task)
        return task

    def cancel_analysis(self, *_):
        if self.current_task is not None:
            self.status_label.setText(tr("Canceling …"))
            self.current_task.cancel()

    def _progress(self, value):
        self.progress_bar.setValue(int(value))

    def _task_done(self, layer, message, level):
        self.current_task = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setValue(100 if layer is not None else 0)  # no stale bar after a cancel or failure
        self._done(layer, message, level)

    def _done(self, layer, message, level="info"):
        self.last_layer = layer
        self._report(message, level)
        self.analysis_finished.emit(layer, message)

    def _report(self, message, level="info", emit=True):
        self.last_message = message
        self.status_label.setText(message)
        if self.iface is None or not message:
            return
        try:
            from qgis.core import Qgis

            lvl = {"info": Qgis.Info, "success": Qgis.Success, "warning": Qgis.Warning,
                   "critical": Qgis.Critical}.get(level, Qgis.Info)
            self.iface.messageBar().pushMessage("ReFound", message, lvl, 8)
        except (AttributeError, RuntimeError):
            pass
