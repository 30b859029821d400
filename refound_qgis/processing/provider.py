"""The ``refound`` Processing provider."""
from qgis.core import QgsProcessingProvider

from ..settings import tr


class RefoundProvider(QgsProcessingProvider):
    def id(self):  # noqa: A003 - QGIS's name
        return "refound"

    def name(self):
        return tr("ReFound urban regions")

    def longName(self):  # noqa: N802
        return tr("ReFound urban region foundation model (KDD 2024)")

    def icon(self):
        from ..icon import plugin_icon

        return plugin_icon()

    def loadAlgorithms(self):  # noqa: N802
        from .algorithms import ALGORITHMS

        for cls in ALGORITHMS:
            self.addAlgorithm(cls())
