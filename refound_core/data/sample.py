"""The data contract: what sources hand to featurisation, and what featurisation hands to the model.

Sources (files read with pyogrio/rasterio, QGIS layers, the synthetic city) differ; every one of
them produces :class:`RegionSample`. Featurisation (``refound_core.data.featurize``) exists once
and turns a sample into an :class:`EncodedRegion`; ``collate`` pads a list of those into the
model's batch dict (see ``refound_core.model.refound.ReFound.forward``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class RegionSample:
    """One region (grid cell) with its raw POIs and satellite image (paper section 3).

    Attributes:
        cell_id: stable id of the grid cell (``refound_core.data.grid``), e.g. ``"EPSG:32650/256/1830_17542"``.
        bounds: ``(xmin, ymin, xmax, ymax)`` of the cell in ``crs`` (metres).
        crs: the cell's metric CRS as an authority string (``"EPSG:32650"``).
        poi_names: POI names, one per POI (any Unicode; may be empty strings).
        poi_categories: raw category labels (strings), one per POI; mapped to ids by a CategoryVocab.
        poi_xy: ``float64 [N, 2]`` POI locations in ``crs`` (absolute coordinates, not cell-local).
        image: ``uint8 [H, W, 3]`` RGB chip covering ``bounds`` (row 0 = north), or ``None`` when
            the imagery does not cover the cell at all.
        image_coverage: fraction of the chip's pixels that hold valid data (0 when ``image`` is None).
        image_valid: optional bool ``[H, W]``: True where the chip's pixel holds data (None = all
            valid). Pixels outside it never reach the model as colour (docs/INFERENCE.md, coverage).
        labels: optional downstream targets by task name (``urban_village``, ``population``, ``commercial``).
        poi_values: optional per-POI numeric values (e.g. review counts) by field name.
    """

    cell_id: str
    bounds: tuple
    crs: str
    poi_names: list = field(default_factory=list)
    poi_categories: list = field(default_factory=list)
    poi_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float64))
    image: Optional[np.ndarray] = None
    image_coverage: float = 0.0
    labels: dict = field(default_factory=dict)
    poi_values: dict = field(default_factory=dict)
    image_valid: Optional[np.ndarray] = None

    @property
    def num_pois(self) -> int:
        return len(self.poi_names)

    @property
    def has_pois(self) -> bool:
        return self.num_pois > 0

    @property
    def has_image(self) -> bool:
        return self.image is not None and self.image_coverage > 0.0


@dataclass
class EncodedRegion:
    """Model-ready arrays of one region, unpadded (padding happens per batch in ``collate``).

    POI side (length ``Lp`` = 1 CLS + all kept POI tokens incl. one [SEP] per POI; paper 4.1.1):
        token_ids, word_pos, poi_pos, grid_pos, category_ids: ``int64 [Lp]``.
        Conventions follow the official implementation (shared/parity/SEMANTICS.md 2.2):
        CLS at 0 with word_pos 0, poi_pos 0, grid 0, category PAD; POIs get poi_pos 1..K,
        grid 1..G*G (row 0 = north), category id of the POI on all its tokens incl. [SEP].
    Image side:
        image: ``uint8 [3, H, W]`` or None (normalisation happens on the device in the model).
        image_valid: bool ``[H, W]`` pixel validity, or None when every pixel is valid.
    Flags: has_pois, has_image, image_coverage, num_pois (kept), num_pois_total (before truncation).
    """

    cell_id: str
    token_ids: np.ndarray
    word_pos: np.ndarray
    poi_pos: np.ndarray
    grid_pos: np.ndarray
    category_ids: np.ndarray
    image: Optional[np.ndarray]
    has_pois: bool
    has_image: bool
    image_coverage: float
    num_pois: int
    num_pois_total: int
    labels: dict = field(default_factory=dict)
    image_valid: Optional[np.ndarray] = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])
