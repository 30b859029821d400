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


def compute_dvfm_patch(outputs, batch: dict, heads) -> dict:
    """Dense DVFM, an addition to the paper (docs/PRETRAINING.md, choice 16): every image patch's
    final hidden state, through its own linear head ``sigma_patch``, imitates the visual teacher's
    feature at that patch (the tokenizer's per-patch features, ``batch["patch_features"]``
    ``[B, N, C]``, normalised like u_S), by cosine as in Eq. 4:

        L_DVFM-patch = -mean_{valid patches i} Cos(sigma_patch(h_i), u_S,i)

    Why: Eq. 4 gives one target per image; a student learning a visual extractor from a few
    thousand images on a CPU budget sees too few of them. The per-patch targets give a local
    function to learn (the feature-map distillation of FitNets), N times as many targets per
    image. Masked patches count too (their input is the mask embedding, so there the term is a
    masked feature prediction, as in MaskFeat / BEiT v2); patches without image data do not.
    Off by default (weight 0 = the paper's objective)."""
    hidden = outputs.hidden_states
    lp = int(outputs.num_poi_tokens)
    if "patch_features" not in batch:
        raise KeyError("dense DVFM needs the per-patch teacher features (batch['patch_features']); the teacher "
                       "cache has none: rebuild it with `refound teachers` (caches before 2026-12-08 lack them)")
    target = batch["patch_features"].to(hidden.device).float()
    n = target.shape[1]
    pred = heads.require("sigma_patch", "dense DVFM")(hidden[:, lp + 1: lp + 1 + n]).float()
    valid = (flag(batch, "u_S_valid", pred) & flag(outputs, "has_image", pred))[:, None].expand(-1, n)
    if getattr(outputs, "patch_valid", None) is not None:
        valid = valid & outputs.patch_valid.to(valid.device)
    cos = F.cosine_similarity(pred, target.masked_fill(~valid[..., None], 0.0), dim=-1)
    mean_cos = masked_mean(cos.reshape(-1), valid.reshape(-1))
    return {"dvfm_patch": -mean_cos, "dvfm_patch_cos": mean_cos.detach()}
