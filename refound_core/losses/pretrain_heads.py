"""Pre-training heads (paper 4.2): small modules on top of the backbone's hidden states.

The backbone returns features only (ARCHITECTURE.md convention 3); these heads exist during
pre-training and are not part of the exported model checkpoint.

=================  ==========================================  =============================
name               paper                                        shape
=================  ==========================================  =============================
``sigma_poi``      sigma_POI, linear, DLFM (Eq. 3)              H -> dim(u_P)
``sigma_sate``     sigma_Sate, linear, DVFM (Eq. 4)             H -> dim(u_S)
``sigma_patch``    linear, dense DVFM (ours, off by default)     H -> dim(patch features)
``mu_poi``         mu_POI, linear, DVLFM (Eq. 5)                H -> proj_dim
``mu_sate``        mu_Sate, linear, DVLFM (Eq. 5)               H -> proj_dim
``mgdm_poi``       2-layer MLP + softmax, MGDM tokens (Eq. 6)   H -> H -> vocab_size
``mgdm_sate``      2-layer MLP + softmax, MGDM visual tokens    H -> H -> codebook_size
``cmsa``           sigmoid classifier, CMSA (Eq. 7)             H -> 1
=================  ==========================================  =============================

Only the heads of the enabled objectives are built, so an ablation run has no dead parameters
(DDP and the optimizer never see them).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

from timm.layers import Mlp, trunc_normal_
from torch import nn


class PretrainHeads(nn.Module):
    """All heads of the enabled objectives (see module docstring).

    Args:
        model_cfg: the backbone's :class:`~refound_core.model.config.ModelConfig` (hidden size,
            name vocabulary, grid and patch geometry for CMSA labels).
        loss_cfg: :class:`~refound_core.losses.LossConfig`; disabled objectives get no head.
        llm_dim: dimension of the LLM-feature u_P (needed when DLFM is on).
        vfm_dim: dimension of the VFM feature u_S (needed when DVFM is on).
        codebook_size: number of discrete visual tokens (needed when MGDM is on).
        patch_dim: channels of the per-patch teacher features (needed for the dense DVFM term).
        proj_dim: width of the DVLFM projections mu_POI / mu_Sate. The paper does not give it;
            only cosines of the two projections are used, so any width works; default H.
    """

    def __init__(self, model_cfg, loss_cfg, *, llm_dim: Optional[int] = None, vfm_dim: Optional[int] = None,
                 codebook_size: Optional[int] = None, proj_dim: Optional[int] = None,
                 patch_dim: Optional[int] = None):
        super().__init__()
        h = model_cfg.hidden_size
        self.grid_cells = int(model_cfg.grid_cells)
        self.patches_per_side = int(model_cfg.patches_per_side)
        self.vocab_size = int(model_cfg.vocab_size)
        active = loss_cfg.active()
        if "dlfm" in active:
            self.sigma_poi = nn.Linear(h, _need(llm_dim, "llm_dim (dimension of u_P)", "DLFM"))
        if "dvfm" in active:
            self.sigma_sate = nn.Linear(h, _need(vfm_dim, "vfm_dim (dimension of u_S)", "DVFM"))
        if "dvfm_patch" in active:
            self.sigma_patch = nn.Linear(h, _need(patch_dim, "patch_dim (channels of the patch features)", "dense DVFM"))
        if "dvlfm" in active:
            p = int(proj_dim or h)
            self.mu_poi = nn.Linear(h, p)
            self.mu_sate = nn.Linear(h, p)
        if "mgdm" in active:
            norm = partial(nn.LayerNorm, eps=model_cfg.layer_norm_eps)
            self.mgdm_poi = Mlp(h, h, self.vocab_size, act_layer=nn.GELU, norm_layer=norm)
            self.codebook_size = _need(codebook_size, "codebook_size (number of visual tokens)", "MGDM")
            self.mgdm_sate = Mlp(h, h, self.codebook_size, act_layer=nn.GELU, norm_layer=norm)
        if "cmsa" in active:
            self.cmsa = nn.Linear(h, 1)
        self.apply(_init)

    def require(self, name: str, objective: str) -> nn.Module:
        """The head ``name``, or a clear error when the objective was disabled when building."""
        head = getattr(self, name, None)
        if head is None:
            raise RuntimeError(f"{objective} needs the pre-training head {name!r}, which was not built; "
                               f"build PretrainHeads with {objective} enabled in the LossConfig")
        return head


def _need(value, what: str, objective: str) -> int:
    if value is None or int(value) <= 0:
        raise ValueError(f"{objective} is enabled but {what} is unknown; it comes from the teacher cache")
    return int(value)


def _init(module: nn.Module):
    # BERT / the official code: N(0, 0.02) (truncated as in timm), zero bias, unit LayerNorm.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
