"""Cross-Modal Spatial Alignment, CMSA (paper 4.2.2, Eq. 7).

For every POI-side position 1 <= i < L_P that is not masked (i not in M_P), a sigmoid classifier
on h_i predicts whether the POI that the position belongs to lies in a masked satellite image
patch:

    L_CMSA = sum_{1 <= i < L_P, i not in M_P} -y_i log p(y_i|h_i) - (1 - y_i) log(1 - p(y_i|h_i))

Positions: every unmasked POI token of a region that has an image, its [SEP] included (the [SEP]
carries its POI's grid position, so it "is included in the POI"); [P] and padding are excluded.
A POI's location is known to the model only as its grid sub-cell, so the label is derived from
``grid_pos``: sub-cell (gy, gx) of the G x G grid lies in patch (gy*P//G, gx*P//G) of the P x P
patch grid when P <= G. When P > G (a sub-cell spans several patches) the label is 1 if any of
them is masked. The loss is the mean over the eligible positions of the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from refound_core.losses._util import masked_mean


def cmsa_targets(grid_pos: torch.Tensor, poi_mask: torch.Tensor, mlm_mask, masked_patches: torch.Tensor,
                 has_image: torch.Tensor, grid_cells: int, patches_per_side: int):
    """CMSA labels and the positions they apply to.

    Args:
        grid_pos: ``int64 [B, Lp]`` (0 = [P], 1..G*G = sub-cells row-major from north, G*G+1 = pad).
        poi_mask: ``bool [B, Lp]`` real tokens.
        mlm_mask: ``bool [B, Lp]`` M_P (excluded), or None.
        masked_patches: ``bool [B, P*P]`` M_S, row-major from north.
        has_image: ``bool [B]``.

    Returns:
        ``(labels float32 [B, Lp], eligible bool [B, Lp])``.
    """
    g, p = int(grid_cells), int(patches_per_side)
    b = grid_pos.shape[0]
    cell = grid_pos - 1
    eligible = poi_mask.bool() & (cell >= 0) & (cell < g * g) & has_image.bool()[:, None]
    eligible[:, 0] = False
    if mlm_mask is not None:
        eligible &= ~mlm_mask.bool()
    cell = cell.clamp(0, g * g - 1)
    if p <= g:
        gy, gx = cell // g, cell % g
        patch = (gy * p // g) * p + (gx * p // g)
        labels = masked_patches.gather(1, patch)
    else:
        k = p // g  # ModelConfig guarantees that the two grids nest
        per_cell = masked_patches.view(b, g, k, g, k).any(dim=4).any(dim=2).reshape(b, g * g)
        labels = per_cell.gather(1, cell)
    return labels.float(), eligible


def compute_cmsa(outputs, batch: dict, heads) -> dict:
    """Returns ``{"cmsa": BCE, "cmsa_acc", "cmsa_pos_rate"}`` (the last two detached, for the log)."""
    hidden = outputs.hidden_states
    lp = int(outputs.num_poi_tokens)
    dev = hidden.device
    has_image = getattr(outputs, "has_image", None)
    if has_image is None:
        has_image = batch.get("has_image", torch.ones(hidden.shape[0], dtype=torch.bool))
    labels, eligible = cmsa_targets(batch["grid_pos"].to(dev)[:, :lp], batch["poi_mask"].to(dev)[:, :lp],
                                    batch.get("mlm_mask").to(dev)[:, :lp] if batch.get("mlm_mask") is not None else None,
                                    batch["masked_patches"].to(dev), has_image.to(dev),
                                    heads.grid_cells, heads.patches_per_side)
    logits = heads.require("cmsa", "CMSA")(hidden[:, :lp]).squeeze(-1).float()
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    correct = ((logits.detach() > 0).float() == labels).float()
    return {"cmsa": masked_mean(bce, eligible), "cmsa_acc": masked_mean(correct, eligible),
            "cmsa_pos_rate": masked_mean(labels, eligible)}
