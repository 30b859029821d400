"""Mixture-of-Geospatial-Experts (MoGE) transformer (paper 4.1.2, Figure 2b).

BERT-style post-LN layers with one multi-head self-attention shared by both modalities over the
whole sequence, and modality "experts" in place of the single FFN:

- layers ``i < fusion_start``: P-FFN on the POI positions ``[:num_poi_tokens]``, S-FFN on the
  image positions ``[num_poi_tokens:]``;
- layers ``i >= fusion_start`` (the paper's "top-two layers"): the fused PS-FFN on every position.

Routing is positional, with no learned router, as in VLMo/BEiT-3 multiway transformers. The split
index is passed to ``forward`` explicitly (batches are padded to their own longest POI sequence,
not to a fixed 512). Every layer owns a P and an S expert and the fusion layers also own a PS
expert, which is the official parameter layout (the P/S experts of fusion layers are unused but
kept so that official checkpoints load). ``use_moge=False`` gives the paper's "w/o MoGE"
ablation: one shared FFN in every layer.

Layout (speed, issue 18): by default the encoder runs *token-major*, ``[S, B, H]``. Then the POI
positions of the whole batch, ``x[:num_poi_tokens]``, are one contiguous block, so each expert is
one dense matmul over a contiguous ``[L_P*B, H]`` view (no gather, no strided copy), and the two
expert outputs are joined by one contiguous concatenation. Attention goes through
``scaled_dot_product_attention`` on a strided view of the packed QKV projection. The batch-major
reference path (``MoGETransformer.fused = False``) is the original formulation; both give the same
numbers (tests/model/test_fused.py) and use the same parameters, so checkpoints are unchanged.
No step of either path syncs with the host (no ``.item()``, ``nonzero`` or boolean indexing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from refound_core.model.config import ModelConfig


class SharedSelfAttention(nn.Module):
    """Multi-head self-attention shared across modalities, post-LN: ``LN(x + drop(W_o·attn(x)))``.

    Heads split the hidden vector head-major (``H -> (heads, H/heads)``), as BERT and the official
    code do. The key-padding mask masks keys only: every query, padded ones included, gets an output.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = h // cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.attn_drop = cfg.attention_dropout
        self.proj_drop = nn.Dropout(cfg.hidden_dropout)
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor, return_probs: bool = False,
                token_major: bool = False):
        """x: ``[B, S, H]`` (``[S, B, H]`` when ``token_major``); key_valid: bool ``[B, S]``
        (True = may be attended to).

        Returns ``(y, probs)``, y in the layout of x; probs is ``[B, heads, S, S]`` when
        ``return_probs`` else None.
        """
        if token_major:
            s, b, h = x.shape
            qkv = self.qkv(x).view(s, b, 3, self.num_heads, self.head_dim).permute(2, 1, 3, 0, 4)
        else:
            b, s, h = x.shape
            qkv = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, S, head_dim], a strided view (no copy)
        mask = key_valid[:, None, None, :]
        drop = self.attn_drop if self.training else 0.0
        probs = None
        if return_probs:
            scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            ctx = F.dropout(probs, drop, self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        if token_major:
            ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, h)
        else:
            ctx = ctx.transpose(1, 2).reshape(b, s, h)
        return self.norm(x + self.proj_drop(self.proj(ctx))), probs


class Expert(nn.Module):
    """One feed-forward expert (P-FFN, S-FFN or PS-FFN), post-LN: ``LN(x + drop(W2·gelu(W1·x)))``
    with the exact (erf) GELU, as BERT and the official code."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = Mlp(cfg.hidden_size, cfg.intermediate_size, act_layer=nn.GELU, drop=(0.0, cfg.hidden_dropout))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.mlp(x))


class MoGELayer(nn.Module):
    """One MoGE layer: shared attention, then positional routing to experts."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.attn = SharedSelfAttention(cfg)
        self.use_moge = cfg.use_moge
        self.is_fusion = cfg.use_moge and index >= cfg.fusion_start
        if cfg.use_moge:
            self.ffn_poi = Expert(cfg)
            self.ffn_img = Expert(cfg)
            if self.is_fusion:
                self.ffn_ps = Expert(cfg)
        else:
            self.ffn = Expert(cfg)

    def forward(self, x, key_valid, num_poi_tokens: int, return_probs: bool = False, token_major: bool = False):
        """x: ``[B, S, H]`` (``[S, B, H]`` when ``token_major``); positions ``[:num_poi_tokens]``
        are POI tokens, the rest image tokens."""
        a, probs = self.attn(x, key_valid, return_probs, token_major)
        if not self.use_moge:
            return self.ffn(a), probs
        if self.is_fusion:
            return self.ffn_ps(a), probs
        if token_major:  # contiguous [L_P, B, H] and [1+N, B, H] blocks: one dense matmul per expert
            y = torch.cat([self.ffn_poi(a[:num_poi_tokens]), self.ffn_img(a[num_poi_tokens:])], dim=0)
        else:
            y = torch.cat([self.ffn_poi(a[:, :num_poi_tokens]), self.ffn_img(a[:, num_poi_tokens:])], dim=1)
        return y, probs


class MoGETransformer(nn.Module):
    """Stack of ``cfg.num_layers`` MoGE layers; no final LayerNorm and no pooler (official code).

    ``fused`` (default True) runs the layers token-major (module docstring); False runs the
    batch-major reference path, whose per-layer hooks see ``[B, S, H]`` tensors (parity tests).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(MoGELayer(cfg, i) for i in range(cfg.num_layers))
        self.fused = True

    def forward(self, x, key_valid, num_poi_tokens: int, attentions_layer: int | None = None):
        """Returns ``(hidden [B,S,H], probs or None)``; ``attentions_layer`` (an index, negative
        allowed) selects the layer whose attention probabilities are returned."""
        want = None if attentions_layer is None else range(len(self.layers))[attentions_layer]
        probs = None
        fused = self.fused
        if fused:
            x = x.transpose(0, 1).contiguous()  # [S, B, H]: one copy in, one copy out
        for i, layer in enumerate(self.layers):
            x, p = layer(x, key_valid, num_poi_tokens, return_probs=(i == want), token_major=fused)
            if p is not None:
                probs = p
        if fused:
            x = x.transpose(0, 1).contiguous()
        return x, probs
