"""Distillation of Visual Foundation Model, DVFM (paper 4.2.1, Eq. 4).

    L_DVFM = -Cos(sigma_Sate(h_[S]), u_S)

u_S = VFM(S) is the visual teacher's feature of the satellite image (cached per dataset). The
loss is averaged over the regions of the batch that have an image and a valid u_S.
"""
from __future__ import annotations

import torch.nn.functional as F

from refound_core.losses._util import flag, masked_mean, teacher


def compute_dvfm(outputs, batch: dict, heads) -> dict:
    """Returns ``{"dvfm": loss, "dvfm_cos": mean cosine (detached)}``; uses ``outputs.img_cls``,
    ``batch["u_S"]`` and the masks ``batch["u_S_valid"]`` / ``outputs.has_image``."""
    pred = heads.require("sigma_sate", "DVFM")(outputs.img_cls).float()
    valid = flag(batch, "u_S_valid", pred) & flag(outputs, "has_image", pred)
    cos = F.cosine_similarity(pred, teacher(batch, "u_S", "DVFM", valid), dim=-1)
    mean_cos = masked_mean(cos, valid)
    return {"dvfm": -mean_cos, "dvfm_cos": mean_cos.detach()}
