"""Distillation of Visual-Language Foundation Model, DVLFM (paper 4.2.1, Eq. 5; A.2.1).

Over a batch, the student's cross-modal similarity matrix

    M_ij = Cos(mu_POI(h^i_[P]), mu_Sate(h^j_[S]))

is matched to the teacher's matrix, which the paper builds from the VLFM's *image* embeddings
only (the image embedding stands in for a perfectly aligned POI embedding):

    M~_ij = Cos(v^i_S, v^j_S)

    L_DVLFM = sum_i KL(rho(M~_i) || rho(M_i)) + sum_j KL(rho(M~^T_j) || rho(M^T_j))

with rho = softmax of the matrix scaled by 1 / temperature (A.2.1: 0.07; applied to both
matrices, as in the distillation recipe the paper follows, [45]).

Choices where the paper is silent (docs/PRETRAINING.md):
* valid modalities: row i (a region's POIs) needs POIs, an image and a valid v_S (the teacher's
  pseudo-POI embedding of region i is its own v_S); column j (a region's image) needs an image
  and a valid v_S. Other rows/columns are masked out of both softmaxes and of the sums;
* the sums over rows and over columns are averaged over the valid rows / columns (``batchmean``),
  so the loss scale does not grow with the batch size;
* the matrix is per device (per-rank batch), not gathered across DDP ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from refound_core.losses._util import flag, full_precision, teacher

_NEG = -1e9  # a finite "minus infinity": masked logits, finite so 0 * log p stays 0


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) along ``dim``, restricted to ``mask`` entries.

    Returns the per-row (``dim=1``) or per-column (``dim=0``) divergences; a line with no
    valid entry gives 0.
    """
    log_pt = torch.log_softmax(teacher_logits.masked_fill(~mask, _NEG), dim=dim)
    log_ps = torch.log_softmax(student_logits.masked_fill(~mask, _NEG), dim=dim)
    terms = torch.where(mask, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt))
    return terms.sum(dim=dim)


def compute_dvlfm(outputs, batch: dict, heads, temperature: float = 0.07) -> dict:
    """Returns ``{"dvlfm": row + column term, "dvlfm_row", "dvlfm_col"}``.

    Uses ``outputs.poi_cls``, ``outputs.img_cls`` ``[B, H]``, ``batch["v_S"]`` ``[B, D]`` and the
    masks ``batch["v_S_valid"]``, ``outputs.has_pois``, ``outputs.has_image``.
    """
    z_poi = F.normalize(heads.require("mu_poi", "DVLFM")(outputs.poi_cls).float(), dim=-1)
    z_img = F.normalize(heads.require("mu_sate", "DVLFM")(outputs.img_cls).float(), dim=-1)
    cols = flag(batch, "v_S_valid", z_img) & flag(outputs, "has_image", z_img)
    rows = cols & flag(outputs, "has_pois", z_poi)
    v = F.normalize(teacher(batch, "v_S", "DVLFM", cols), dim=-1)

    with full_precision(z_poi.device):
        student = z_poi @ z_img.t() / temperature  # [B, B]: POIs of region i vs image of region j
        target = v @ v.t() / temperature           # image-image cosine as the teacher matrix
    mask = rows[:, None] & cols[None, :]
    row_kl = masked_kl(target, student, mask, dim=1)
    col_kl = masked_kl(target, student, mask, dim=0)
    row_term = (row_kl * rows).sum() / rows.sum().clamp(min=1)
    col_term = (col_kl * cols).sum() / cols.sum().clamp(min=1)
    return {"dvlfm": row_term + col_term, "dvlfm_row": row_term.detach(), "dvlfm_col": col_term.detach()}
