"""What inference yields per grid cell (framework-free: writers and the plugin use it without torch)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class CellResult:
    """The model's answer for one region (grid cell).

    Attributes:
        cell_id, bounds, crs: the cell (``refound_core.data.grid``).
        value: the prediction (probability for a binary task, the value for a regression);
            NaN when the cell was not predicted (``sufficient`` False).
        values: all outputs of the head (``[num_classes]``; equals ``[value]`` for one output).
        poi_count: POIs inside the cell (before any truncation to the model's sequence length).
        image_coverage: fraction of valid imagery pixels in the cell's chip (0 = no imagery).
        image_used: True when the image modality reached the model: coverage at least the
            threshold (``--min-image-coverage``, default 0.25) and at least one valid patch.
        sufficient: True when the cell had POIs or imagery. A cell with neither is never run
            through the model as if it had data: its outputs stay NaN (NULL in the file).
        h_P, h_S, fused: float32 ``[H]`` region representations (paper 4.3) when requested:
            the [P] CLS, the [S] CLS and their fusion; None when not requested.
    """

    cell_id: str
    bounds: tuple
    crs: str = ""
    value: float = math.nan
    values: Optional[np.ndarray] = None
    poi_count: int = 0
    image_coverage: float = 0.0
    sufficient: bool = False
    image_used: bool = False
    h_P: Optional[np.ndarray] = None
    h_S: Optional[np.ndarray] = None
    fused: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)


def is_sufficient(sample) -> bool:
    """A region can be predicted when it has at least one POI or some imagery coverage."""
    return bool(sample.has_pois or sample.has_image)
