"""Distillation of Language Foundation Model, DLFM (paper 4.2.1, Eq. 3).

    L_DLFM = -Cos(sigma_POI(h_[P]), u_P)

u_P is the LLM-feature: the sentence embedding of an LLM's description of the region's function,
written from its POI names (Eq. 2; computed once per dataset by ``refound_core.teachers``).
The loss is averaged over the regions of the batch that have POIs and a valid u_P.
"""
from __future__ import annotations

import torch.nn.functional as F

from refound_core.losses._util import flag, masked_mean, teacher


def compute_dlfm(outputs, batch: dict, heads) -> dict:
    """Returns ``{"dlfm": loss, "dlfm_cos": mean cosine (detached)}``.

    Uses ``outputs.poi_cls [B, H]``, ``batch["u_P"] [B, D]`` and the masks
    ``batch["u_P_valid"]`` / ``outputs.has_pois`` (each optional, all True when absent).
    """
    pred = heads.require("sigma_poi", "DLFM")(outputs.poi_cls).float()
    valid = flag(batch, "u_P_valid", pred) & flag(outputs, "has_pois", pred)
    cos = F.cosine_similarity(pred, teacher(batch, "u_P", "DLFM", valid), dim=-1)
    mean_cos = masked_mean(cos, valid)
    return {"dlfm": -mean_cos, "dlfm_cos": mean_cos.detach()}
