"""Inference (paper 4.3): streaming prediction and region embeddings, writers and styles.

Heavy modules (torch) load lazily: ``styles``, ``results`` and ``writers`` stay usable without
torch (the QGIS plugin imports ``styles``).

Public API::

    from refound_core.inference.pipeline import AnalysisRequest, run_analysis
    from refound_core.inference.predictor import Predictor, AnalysisCanceled, load_predictor
    from refound_core.inference.results import CellResult
"""
