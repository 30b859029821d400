"""Processing algorithms of the ``refound`` provider. Ids are stable (scripts and models use them):

``refound:create_region_grid``, ``refound:predict_urban_villages``, ``refound:predict_population``,
``refound:predict_commercial_activeness``, ``refound:compute_region_embeddings``,
``refound:train_task_head``; explore (:mod:`.explore`): ``refound:find_similar_regions``,
``refound:cluster_regions``, ``refound:embedding_colours``, ``refound:compare_embeddings``.

The prediction algorithms are one class over a task table (:mod:`.predict`); every one runs
``refound_core.inference.pipeline.run_analysis``, like the dock and ``refound predict``.
"""
from __future__ import annotations

from .common import ResultStyler  # noqa: F401 - part of this module's interface
from .explore import EXPLORE_ALGORITHMS
from .grid_algorithm import CreateRegionGrid
from .predict import PREDICT_ALGORITHMS, PredictAlgorithm  # noqa: F401
from .train_head import TrainTaskHead, label_cells  # noqa: F401

_BY_ID = {cls.ALG_ID: cls for cls in PREDICT_ALGORITHMS}
PredictUrbanVillages = _BY_ID["predict_urban_villages"]
PredictPopulation = _BY_ID["predict_population"]
PredictCommercialActiveness = _BY_ID["predict_commercial_activeness"]
ComputeRegionEmbeddings = _BY_ID["compute_region_embeddings"]

ALGORITHMS = (CreateRegionGrid, PredictUrbanVillages, PredictPopulation, PredictCommercialActiveness,
              ComputeRegionEmbeddings, TrainTaskHead) + EXPLORE_ALGORITHMS
