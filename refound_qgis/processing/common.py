"""What every ReFound Processing algorithm shares: group, icon, advanced parameters, the result
styler (a layer post-processor, kept alive by a module-level reference, as QGIS only holds a raw
pointer to it) and the style stored inside GeoPackage outputs (so ``qgis_process`` results open
styled).
"""
from __future__ import annotations

import os

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterDefinition,
    QgsVectorLayer,
)

from .. import results
from ..settings import tr

# Post-processors must outlive processAlgorithm (QGIS keeps a raw pointer): keep references here.
_POST_PROCESSORS: list = []
_KEEP = 64


def _keep(pp):
    _POST_PROCESSORS.append(pp)
    del _POST_PROCESSORS[:-_KEEP]
    return pp


class ResultStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles a loaded result layer (task ramp, hatched insufficient cells) and names it."""

    def __init__(self, task: str, kind, title: str, model_name: str, checkpoint: str, inputs: dict, classes=None):
        super().__init__()
        self.task, self.kind, self.title, self.classes = task, kind, title, classes
        self.model_name, self.checkpoint, self.inputs = model_name, checkpoint, inputs

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 - QGIS's name
        if not isinstance(layer, QgsVectorLayer):
            return
        results.apply_style(layer, self.task, self.kind, self.classes)
        layer.setName(self.title)
        results.set_provenance(layer, self.task, self.model_name, self.checkpoint, self.inputs)


class RefoundAlgorithm(QgsProcessingAlgorithm):
    """Shared boilerplate: group, translation, instance creation."""

    def group(self):
        return tr("ReFound")

    def groupId(self):  # noqa: N802
        return "refound"

    def createInstance(self):  # noqa: N802
        return type(self)()

    def tr(self, text):
        return tr(text)

    def icon(self):
        from ..icon import plugin_icon

        return plugin_icon()


def _advanced(param):
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def _plain(v):
    if v is None or (hasattr(v, "isNull") and v.isNull()):
        return None
    if isinstance(v, bool):
        return int(v)
    return v


def _style_file_output(dest_id: str, task: str, kind, title: str, feedback, classes=None) -> None:
    """Store the style inside a GeoPackage output so the file opens styled (qgis_process runs)."""
    path = dest_id.split("|")[0]
    if not path.lower().endswith(".gpkg") or not os.path.isfile(path):
        return
    layer = QgsVectorLayer(dest_id, title, "ogr")
    if not layer.isValid():
        return
    try:
        results.apply_style(layer, task, kind, classes)
        layer.saveStyleToDatabase(results.style_name(task), "ReFound default style", True, "")
    except Exception as exc:  # noqa: BLE001 - a style is a nicety; the data is written
        feedback.reportError(tr("The style could not be stored in {p}: {e}").format(p=path, e=exc))
