"""Masked Geospatial Data Modeling, MGDM (paper 4.2.2, Eq. 6; A.2.1).

    L_MGDM = - sum_{i in M_P} log p(y^P_i | h_i) - sum_{i in M_S} log p(y^S_i | h_i)

M_P: the masked POI name tokens (15%, BERT 80/10/10 corruption), predicted as their original
token ids by a 2-layer MLP with softmax; M_S: the masked satellite image patches (40%, BEiT
blockwise, replaced by the mask embedding), predicted as their discrete visual tokens by a
second 2-layer MLP. The corruption itself happens in the data pipeline
(:mod:`refound_core.losses.masking`); the batch carries the results:

* ``mlm_mask`` ``bool [B, Lp]`` (M_P) and ``mlm_labels`` ``int64 [B, Lp]`` (original ids);
* ``masked_patches`` ``bool [B, N]`` (M_S) and ``visual_tokens`` ``int64 [B, N]`` (targets),
  with the optional ``visual_tokens_valid`` ``bool [B]``.

Each sum is normalised by its number of masked positions in the batch (BERT and BEiT practice,
which keeps the two terms on the scale of one cross-entropy each); ``mgdm`` is their sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from refound_core.losses._util import flag


def _ce(head, hidden: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy and accuracy of ``head`` on the selected rows, or a graph-connected zero."""
    if hidden.shape[0] == 0:
        # Keep the head in the graph with zero gradient (same parameter set on every DDP rank).
        zero = head(hidden.new_zeros(1, hidden.shape[-1])).float().sum() * 0.0
        return zero, zero.detach()
    logits = head(hidden).float()
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(-1) == labels).float().mean()
    return loss, acc


def compute_mgdm(outputs, batch: dict, heads) -> dict:
    """Returns ``{"mgdm", "mgdm_poi", "mgdm_img", "mgdm_poi_acc", "mgdm_img_acc"}``."""
    hidden = outputs.hidden_states
    lp = int(outputs.num_poi_tokens)
    mlm_mask = batch["mlm_mask"].to(hidden.device)
    labels = batch["mlm_labels"].to(hidden.device)
    poi_loss, poi_acc = _ce(heads.require("mgdm_poi", "MGDM"), hidden[:, :lp][mlm_mask], labels[mlm_mask])

    masked = batch["masked_patches"].to(hidden.device)
    if "visual_tokens" not in batch:
        raise KeyError("MGDM needs the visual tokens of the images (batch['visual_tokens']); the teacher "
                       "cache has none: build it, or disable MGDM (--no-mgdm)")
    tokens = batch["visual_tokens"].to(hidden.device)
    keep = masked & (flag(batch, "visual_tokens_valid", hidden) & flag(outputs, "has_image", hidden))[:, None]
    if getattr(outputs, "patch_valid", None) is not None:
        keep = keep & outputs.patch_valid  # a patch without image data has no visual token to predict
    patches = hidden[:, lp + 1: lp + 1 + masked.shape[1]]
    img_loss, img_acc = _ce(heads.require("mgdm_sate", "MGDM"), patches[keep], tokens[keep])
    return {"mgdm": poi_loss + img_loss, "mgdm_poi": poi_loss.detach(), "mgdm_img": img_loss.detach(),
            "mgdm_poi_acc": poi_acc, "mgdm_img_acc": img_acc}
