"""What inference yields per grid cell (framework-free: writers and the plugin use it without torch)."""
from __future__ import annotations

import dataclasses
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
        extra: any further per-cell scalar outputs by column name. They, and any scalar field
            added to this class later, are written by every sink after the fixed columns
            (:func:`extra_columns`), so a new per-cell output needs no change downstream.
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


# Fields every sink writes in its own way (geometry, the prediction column, vectors).
BASE_FIELDS = ("cell_id", "bounds", "crs", "value", "values", "poi_count", "image_coverage", "image_used",
               "sufficient",                "h_P", "h_S", "fused", "extra")


def _scalar(v):
    """``v`` as a plain Python scalar (numpy scalars unwrapped), or a sentinel when it is not one."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        return v.item()
    return _NOT_SCALAR


_NOT_SCALAR = object()


def extra_columns(result) -> dict:
    """The per-cell outputs beyond the fixed columns, ``{name: scalar}`` in a stable order: scalar
    dataclass fields not in :data:`BASE_FIELDS` first, then ``result.extra``. Vectors are left out."""
    out = {}
    if dataclasses.is_dataclass(result):
        for f in dataclasses.fields(result):
            if f.name not in BASE_FIELDS:
                v = _scalar(getattr(result, f.name))
                if v is not _NOT_SCALAR:
                    out[f.name] = v
    for k, v in (getattr(result, "extra", None) or {}).items():
        v = _scalar(v)
        if v is not _NOT_SCALAR and k not in BASE_FIELDS:
            out[str(k)] = v
    return out
