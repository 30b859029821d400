"""The ReFound backbone (paper 4.1) and the region read-out (paper 4.3).

``ReFound`` = multi-modal geospatial embedding (4.1.1) + MoGE transformer (4.1.2). It returns
features only (``ReFoundOutput``): every hidden state, the two CLS vectors h[P] (position 0) and
h[S] (position ``num_poi_tokens``), and which modalities each region actually has. Task heads and
pre-training losses live outside (``heads.py``, ``refound_core.losses``).

Sequence layout: ``[ [P] CLS, POI tokens..., POI padding | [S] CLS, patch_1 ... patch_N ]``,
``num_poi_tokens`` = the batch's padded POI length (the official code always pads to 512).

Missing modalities (beyond the official code, which always has both): the attention keys of an
absent modality are masked out, except the [P] CLS key, which stays visible so no query ever
sees an all-masked row. For a region without POIs this is exactly what the official loader
produces (its POI mask is ``[1, 0, 0, ...]``); for a region without an image, every image key,
[S] CLS included, is hidden, so its POI-side outputs do not depend on the placeholder pixels.
The read-out then fuses only the present modalities (``average_fusion``; ``AttnPool`` in heads.py).

Partial images (a cell at the edge of the imagery, nodata inside it): with ``image_valid`` (bool
pixel mask) no invalid pixel reaches the model as colour. The rule (docs/INFERENCE.md, coverage):
a patch is *valid* when at least half of its pixels are; invalid patches are hidden as attention
keys exactly like an absent modality, so no other position ever reads them; inside a valid patch
the invalid pixels are set to the normalisation mean (0 after normalising), so their fill value
cannot matter either. A region with no valid patch left counts as having no image.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from refound_core.errors import InputError
from refound_core.model.config import ModelConfig
from refound_core.model.embeddings import MultiModalEmbedding, normalize_image
from refound_core.model.moge import MoGETransformer

BATCH_KEYS = ("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids", "poi_mask", "image",
              "has_pois", "has_image", "image_valid")
#: a patch is valid when at least this share of its pixels are (see the module docstring)
MIN_PATCH_VALID = 0.5


@dataclass
class ReFoundOutput:
    """What the backbone returns.

    Attributes:
        hidden_states: ``[B, L, H]`` contextualised representations H (padded positions included).
        poi_cls: h[P] = ``hidden_states[:, 0]``, ``[B, H]``.
        img_cls: h[S] = ``hidden_states[:, num_poi_tokens]``, ``[B, H]``.
        num_poi_tokens: the split index L_P of this batch (POI positions are ``[:L_P]``).
        has_pois, has_image: bool ``[B]`` (all True when the caller gave none: official behaviour).
        attentions: optional ``[B, heads, L, L]`` attention probabilities of one layer.
        patch_valid: bool ``[B, N]`` image patches that held data (None = all, no mask given).
    """

    hidden_states: torch.Tensor
    poi_cls: torch.Tensor
    img_cls: torch.Tensor
    num_poi_tokens: int
    has_pois: torch.Tensor
    has_image: torch.Tensor
    attentions: Optional[torch.Tensor] = None
    patch_valid: Optional[torch.Tensor] = None

    @property
    def poi_hidden(self) -> torch.Tensor:
        """``[B, L_P, H]``: the POI side, [P] CLS first."""
        return self.hidden_states[:, :self.num_poi_tokens]

    @property
    def image_hidden(self) -> torch.Tensor:
        """``[B, 1 + N, H]``: the image side, [S] CLS first."""
        return self.hidden_states[:, self.num_poi_tokens:]

    @property
    def region_tokens(self) -> torch.Tensor:
        """``[B, 2, H]`` = stack(h[P], h[S]): the official feature extractor's region embedding."""
        return torch.stack([self.poi_cls, self.img_cls], dim=1)

    @property
    def presence(self) -> torch.Tensor:
        """bool ``[B, 2]``: which of (h[P], h[S]) carries a present modality."""
        return torch.stack([self.has_pois, self.has_image], dim=1)

    def average(self) -> torch.Tensor:
        """Average fusion of the present modalities (paper 4.3), ``[B, H]``."""
        return average_fusion(self.region_tokens, self.presence)


def usable_presence(presence: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
    """bool ``[B, 2]``; None means both present (official). A region with neither modality falls
    back to both, so fusion never divides by zero (its embedding is then meaningless anyway)."""
    if presence is None:
        return torch.ones(batch, 2, dtype=torch.bool, device=device)
    presence = presence.to(device=device, dtype=torch.bool)
    return presence | ~presence.any(dim=1, keepdim=True)


def average_fusion(region_tokens: torch.Tensor, presence: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Average of h[P] and h[S] over the present modalities (paper 4.3, official ``agg='avr'``).

    Args:
        region_tokens: ``[B, 2, H]`` = stack(h[P], h[S]).
        presence: optional bool ``[B, 2]``; None = both present: ``0.5 * (h[P] + h[S])``.
    """
    if presence is None:
        return 0.5 * (region_tokens[:, 0] + region_tokens[:, 1])
    w = usable_presence(presence, region_tokens.shape[0], region_tokens.device).to(region_tokens.dtype)
    w = w / w.sum(dim=1, keepdim=True)
    return (w.unsqueeze(-1) * region_tokens).sum(dim=1)


class ReFound(nn.Module):
    """ReFound backbone: multi-modal geospatial embedding + MoGE transformer (paper 4.1)."""

    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = MultiModalEmbedding(cfg)
        self.encoder = MoGETransformer(cfg)
        self.register_buffer("image_mean", torch.tensor(cfg.image_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("image_std", torch.tensor(cfg.image_std, dtype=torch.float32), persistent=False)
        if init_weights:
            self.apply(init_weights_)
            img = self.embeddings.image
            for p in (img.cls_token, img.mask_token, img.pos_embed, self.embeddings.poi.token_type_embed):
                nn.init.normal_(p, std=0.02)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict) -> "ReFound":
        """Build without random init (modules on the meta device) and adopt ``state``'s tensors.
        ``state`` must match exactly (checked by the caller, e.g. ``checkpoint.check_state_dict``)."""
        with torch.device("meta"):
            model = cls(cfg, init_weights=False)
        model.load_state_dict(state, strict=True, assign=True)
        device = next(iter(state.values())).device
        model.image_mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=device)
        model.image_std = torch.tensor(cfg.image_std, dtype=torch.float32, device=device)
        return model

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, token_ids, word_pos, poi_pos, grid_pos, category_ids, poi_mask, image,
                has_pois=None, has_image=None, masked_patches=None, output_attentions_layer=None,
                image_valid=None) -> ReFoundOutput:
        """Encode a batch of regions.

        Args:
            token_ids, word_pos, poi_pos, grid_pos, category_ids: int64 ``[B, L_P]``, [P] CLS at 0.
            poi_mask: bool/int ``[B, L_P]``, True for real tokens (CLS included), False for padding.
            image: uint8 ``[B, 3, H, W]`` (normalised here with the config mean/std) or an already
                normalised float tensor; None when no region of the batch has an image.
            has_pois, has_image: optional bool ``[B]``; None = present (official behaviour).
            masked_patches: optional bool ``[B, N]``: patches replaced by the mask embedding.
            output_attentions_layer: optional layer index (``-1`` = last; True = last) whose
                attention probabilities are returned in ``attentions``.
            image_valid: optional bool ``[B, H, W]`` pixel validity of the images (None = all valid);
                see the module docstring for how partial images are handled.
        """
        b, lp = token_ids.shape
        cfg = self.config
        if lp > cfg.max_word_pos:
            # L_P is cfg.max_poi_tokens; batches may be padded a little beyond it (collate rounds
            # up to a multiple of 8), but never beyond the word-level position table.
            raise InputError(f"POI sequence of {lp} positions is longer than the model's position table "
                             f"({cfg.max_word_pos}); encode regions with max_poi_tokens <= {cfg.max_poi_tokens}")
        device = token_ids.device
        if image is None:
            if has_image is not None and bool(has_image.any()):
                raise InputError("has_image is True for some region but no image tensor was given")
            has_image = torch.zeros(b, dtype=torch.bool, device=device)
            image = torch.zeros(b, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
        if tuple(image.shape[1:]) != (cfg.in_chans, cfg.image_size, cfg.image_size):
            raise InputError(f"satellite image batch has shape {tuple(image.shape)}; this model expects "
                             f"[B, {cfg.in_chans}, {cfg.image_size}, {cfg.image_size}] chips")
        has_pois = _flag(has_pois, b, device)
        has_image = _flag(has_image, b, device)
        images = normalize_image(image, self.image_mean, self.image_std)
        patch_valid = None
        if image_valid is not None:
            images, patch_valid = self._mask_invalid_pixels(images, image_valid.to(device))
            has_image = has_image & patch_valid.any(dim=1)

        x = self.embeddings(token_ids, word_pos, poi_pos, grid_pos, category_ids, images, masked_patches)

        key_valid = torch.empty(b, x.shape[1], dtype=torch.bool, device=device)
        key_valid[:, :lp] = poi_mask.to(torch.bool) & has_pois[:, None]
        key_valid[:, 0] = True  # the [P] CLS is always attendable (never an all-masked row)
        key_valid[:, lp:] = has_image[:, None]
        if patch_valid is not None:
            key_valid[:, lp + 1:] &= patch_valid

        if output_attentions_layer is True:
            output_attentions_layer = -1
        h, probs = self.encoder(x, key_valid, lp, output_attentions_layer)
        return ReFoundOutput(hidden_states=h, poi_cls=h[:, 0], img_cls=h[:, lp], num_poi_tokens=lp,
                             has_pois=has_pois, has_image=has_image, attentions=probs, patch_valid=patch_valid)

    def _mask_invalid_pixels(self, images: torch.Tensor, valid: torch.Tensor) -> tuple:
        """Normalised images with invalid pixels at 0 (the mean colour), and bool ``[B, N]`` valid patches."""
        cfg = self.config
        if tuple(valid.shape) != (images.shape[0], cfg.image_size, cfg.image_size):
            raise InputError(f"image_valid has shape {tuple(valid.shape)}; expected "
                             f"[{images.shape[0]}, {cfg.image_size}, {cfg.image_size}] (one mask per image)")
        valid = valid.to(torch.bool)
        images = images.masked_fill(~valid[:, None], 0.0)
        share = torch.nn.functional.avg_pool2d(valid[:, None].float(), cfg.patch_size)  # [B, 1, P, P]
        return images, share.flatten(1) >= MIN_PATCH_VALID

    def forward_batch(self, batch: dict, **kwargs) -> ReFoundOutput:
        """Run on the dict made by ``refound_core.data.collate`` (extra keys are ignored); moves the
        tensors to the model's device."""
        missing = [k for k in BATCH_KEYS[:7] if k not in batch]
        if missing:
            raise InputError(f"batch dict lacks {missing}; build it with refound_core.data.collate")
        device = self.embeddings.modality_embed.weight.device
        args = {k: (batch[k].to(device, non_blocking=True) if torch.is_tensor(batch.get(k)) else batch.get(k))
                for k in BATCH_KEYS}
        return self(**args, **kwargs)

    # -- helpers for optimisers (timm conventions) ------------------------------------------
    def no_weight_decay(self) -> set:
        """Names excluded from weight decay: embedding-like parameters (BEiT/timm convention)."""
        return {"embeddings.image.cls_token", "embeddings.image.mask_token", "embeddings.image.pos_embed",
                "embeddings.poi.token_type_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for ``timm.optim.param_groups_layer_decay`` (layer-wise lr decay, A.2.2)."""
        return {"stem": r"^embeddings", "blocks": [(r"^encoder\.layers\.(\d+)", None)]}

    def layer_id(self, param_name: str) -> int:
        """0 for embeddings, i+1 for encoder layer i (BEiT's ``get_layer_id``)."""
        m = re.match(r"^encoder\.layers\.(\d+)\.", param_name)
        return int(m.group(1)) + 1 if m else 0


def _flag(value, batch: int, device) -> torch.Tensor:
    if value is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    value = torch.as_tensor(value, device=device).to(torch.bool)
    if value.shape != (batch,):
        raise InputError(f"has_pois / has_image must be bool [{batch}], got shape {tuple(value.shape)}")
    return value


def init_weights_(m: nn.Module) -> None:
    """Official ``_init_weights``: N(0, 0.02) for Linear and Embedding weights, zero biases,
    zero padding row, LayerNorm (1, 0). (timm's ``trunc_normal_(std=0.02)`` truncates at +-2
    absolute, i.e. +-100 sigma: the same distribution, but ~20x slower on CPU because of erfinv.)"""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
