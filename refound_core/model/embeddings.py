"""Multi-modal geospatial data embedding (paper 4.1.1).

POI side (Eq. 1): word + geo-aware position (word-level + POI-level + grid-level) + category,
then LayerNorm and dropout, then the modality embedding E_m(P).
Image side: ViT-style patch embedding, [S] CLS, learnable 1-D positions, LayerNorm, dropout,
then E_m(S).

Official-code details kept for exact parity (shared/parity/SEMANTICS.md section 3):
- a token-type row 0 is added to every POI token (the official code always uses type id 0);
- word id 0 ([PAD]) yields a zero vector (Paddle ``padding_idx`` forward semantics);
- patches are flattened pixel-major, channel-minor: ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``;
- the modality embedding is added AFTER the per-modality LayerNorm and is not normalised again.
"""
from __future__ import annotations

import torch
from torch import nn

from refound_core.model.config import ModelConfig

POI_MODALITY, IMAGE_MODALITY = 0, 1


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split images into flattened patches in the official order.

    Args:
        images: ``[B, C, H, W]``.
    Returns:
        ``[B, N, p*p*C]`` with row-major patches and vectors ordered (pixel row, pixel column,
        channel): ``out[b, r*w + c, (i*p + j)*C + ch] == images[b, ch, r*p + i, c*p + j]``.
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def normalize_image(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,3,H,W]`` -> float32 ``(x/255 - mean)/std``, in the same float32 steps as the
    official loader (SEMANTICS.md 2.5); a floating-point image is taken as already normalised."""
    if image.dtype == torch.uint8:
        x = image.to(torch.float32) / 255.0
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    if not torch.is_floating_point(image):
        raise TypeError(f"image must be uint8 or floating point, got {image.dtype}")
    return image


class POIEmbedding(nn.Module):
    """POI token embedding before the modality term (paper Eq. 1 without E_m(P)).

    ``forward`` returns LayerNorm(word + type[0] + E_wp + E_pp + E_gp + E_c), then dropout.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.word_embed = nn.Embedding(cfg.vocab_size, h, padding_idx=0)
        # Official checkpoints carry a 2-row token-type table; only row 0 is ever added.
        self.token_type_embed = nn.Parameter(torch.zeros(cfg.type_vocab_size, h))
        self.word_pos_embed = nn.Embedding(cfg.max_word_pos, h)
        self.poi_pos_embed = nn.Embedding(cfg.max_poi_pos, h)
        self.grid_pos_embed = nn.Embedding(cfg.num_grid_ids, h)
        self.category_embed = nn.Embedding(cfg.num_categories, h)
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, token_ids, word_pos, poi_pos, grid_pos, category_ids) -> torch.Tensor:
        """All inputs ``int64 [B, Lp]``; returns ``[B, Lp, H]``."""
        # Paddle padding_idx semantics: [PAD] reads a zero vector whatever row 0 holds.
        words = self.word_embed(token_ids) * (token_ids != 0).unsqueeze(-1).to(self.word_embed.weight.dtype)
        x = (words + self.token_type_embed[0] + self.word_pos_embed(word_pos) + self.poi_pos_embed(poi_pos)
             + self.grid_pos_embed(grid_pos) + self.category_embed(category_ids))
        return self.dropout(self.norm(x))


class SatelliteEmbedding(nn.Module):
    """Satellite image patch embedding before the modality term (paper 4.1.1, "Satellite Image
    Embedding"). Returns ``[B, 1 + N, H]`` with the [S] CLS first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Linear(cfg.patch_size * cfg.patch_size * cfg.in_chans, h)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h))
        # BEiT-style [M] embedding for masked patches (pre-training, paper 4.2.2).
        self.mask_token = nn.Parameter(torch.zeros(h))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, h))
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, images: torch.Tensor, masked_patches: torch.Tensor | None = None) -> torch.Tensor:
        """images: normalised float ``[B, C, H, W]``; masked_patches: optional bool ``[B, N]``
        (True = replace that patch embedding with the mask embedding, before positions)."""
        x = self.patch_embed(patchify(images, self.patch_size))
        if masked_patches is not None:
            x = torch.where(masked_patches.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.dropout(self.norm(x + self.pos_embed))


class MultiModalEmbedding(nn.Module):
    """Unified multi-modal embedding sequence X = [X_P; X_S] (paper 4.1.1, last paragraph)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.poi = POIEmbedding(cfg)
        self.image = SatelliteEmbedding(cfg)
        self.modality_embed = nn.Embedding(2, cfg.hidden_size)

    def forward(self, token_ids, word_pos, poi_pos, grid_pos, category_ids, images,
                masked_patches=None) -> torch.Tensor:
        """Returns ``[B, Lp + 1 + N, H]``: POI positions first, then the [S] CLS and the patches."""
        x_p = self.poi(token_ids, word_pos, poi_pos, grid_pos, category_ids)
        x_s = self.image(images, masked_patches)
        x_p = x_p + self.modality_embed.weight[POI_MODALITY]
        x_s = x_s + self.modality_embed.weight[IMAGE_MODALITY]
        return torch.cat([x_p, x_s], dim=1)
