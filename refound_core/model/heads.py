"""Region fusion and task heads (paper 4.3, A.2.2, A.2.3).

A task head turns the two CLS vectors (h[P], h[S]) into a prediction:
fusion (average or attentional pooling) -> 2-layer MLP ``dense(H->H) -> GELU -> dropout -> decoder``.
The same module serves fine-tuning (on ``ReFoundOutput``) and feature-based prediction (on a
stored ``[B, 2, H]`` region embedding), like the official ``*_FT`` and ``FeatureBased*`` models.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import Mlp
from torch import nn

from refound_core.model.refound import ReFound, ReFoundOutput, average_fusion, init_weights_, usable_presence

KINDS = ("binary", "regression", "multiclass")
FUSIONS = ("average", "attention")
ATTN_POOL_WIDTH = 32  # hard-coded in the official AttnPool


class AttnPool(nn.Module):
    """Attentional fusion of (h[P], h[S]) (paper 4.3, ref [58]; official ``AttnPool``):
    ``beta = softmax_over_2(l2(tanh(l1(z))))``, result ``sum(beta * z)``; l2 has no bias.
    Absent modalities get ``beta = 0``."""

    def __init__(self, hidden_size: int, width: int = ATTN_POOL_WIDTH):
        super().__init__()
        self.l1 = nn.Linear(hidden_size, width)
        self.l2 = nn.Linear(width, 1, bias=False)

    def forward(self, z: torch.Tensor, presence: Optional[torch.Tensor] = None, return_weights: bool = False):
        """z: ``[B, 2, H]``; presence: optional bool ``[B, 2]``. Returns ``[B, H]`` (and beta ``[B, 2]``)."""
        w = self.l2(torch.tanh(self.l1(z))).squeeze(-1)
        if presence is not None:
            keep = usable_presence(presence, z.shape[0], z.device)
            w = w.masked_fill(~keep, float("-inf"))
        beta = w.softmax(dim=1)
        pooled = (beta.unsqueeze(-1) * z).sum(dim=1)
        return (pooled, beta) if return_weights else pooled


class TaskHead(nn.Module):
    """Fusion + 2-layer MLP predictor (A.2.2).

    Args:
        hidden_size: H of the backbone.
        kind: ``binary`` (one logit; ``predict`` applies the sigmoid, like the official UVD head),
            ``regression`` (raw value, official POP/CAP) or ``multiclass`` (``num_classes`` logits).
        num_classes: outputs of the decoder (1 for binary/regression).
        fusion: ``average`` or ``attention`` (AttnPool).
        dropout: dropout between GELU and decoder (official ``fdrop``).
    """

    def __init__(self, hidden_size: int, kind: str = "regression", num_classes: int = 1,
                 fusion: str = "average", dropout: float = 0.1):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"head kind {kind!r} is not one of {KINDS}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion {fusion!r} is not one of {FUSIONS}")
        if kind != "multiclass" and num_classes != 1:
            raise ValueError(f"a {kind} head has one output, got num_classes={num_classes}")
        if kind == "multiclass" and num_classes < 2:
            raise ValueError("a multiclass head needs num_classes >= 2")
        self.hidden_size, self.kind, self.num_classes = hidden_size, kind, num_classes
        self.fusion, self.dropout = fusion, dropout
        self.pool = AttnPool(hidden_size) if fusion == "attention" else None
        self.mlp = Mlp(hidden_size, hidden_size, num_classes, act_layer=nn.GELU, drop=(dropout, 0.0))
        self.apply(init_weights_)

    def spec(self) -> dict:
        """Constructor arguments (stored in a checkpoint's config.json)."""
        return {"hidden_size": self.hidden_size, "kind": self.kind, "num_classes": self.num_classes,
                "fusion": self.fusion, "dropout": self.dropout}

    @classmethod
    def from_spec(cls, spec: dict, state: Optional[dict] = None) -> "TaskHead":
        """Rebuild from :meth:`spec`; with ``state``, adopt its tensors without a random init."""
        if state is None:
            return cls(**spec)
        with torch.device("meta"):
            head = cls(**spec)
        head.load_state_dict(state, strict=True, assign=True)
        return head

    def fuse(self, features, presence: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Region representation ``[B, H]`` from a ``ReFoundOutput`` or a ``[B, 2, H]`` tensor."""
        z, presence = _region_tokens(features, presence)
        if self.pool is not None:
            return self.pool(z, presence)
        return average_fusion(z, presence)

    def forward(self, features, presence: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (binary/multiclass) or values (regression), ``[B, num_classes]``.

        features: ``ReFoundOutput`` (fine-tuning) or a stored ``[B, 2, H]`` region embedding
        (feature-based prediction); presence: optional bool ``[B, 2]`` for the tensor case.
        """
        return self.mlp(self.fuse(features, presence))

    @torch.no_grad()
    def predict(self, features, presence: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Probabilities (sigmoid / softmax) or regression values."""
        out = self(features, presence)
        if self.kind == "binary":
            return out.sigmoid()
        if self.kind == "multiclass":
            return out.softmax(dim=-1)
        return out


def token_standardization(z: torch.Tensor, presence: torch.Tensor, rows, floor_share: float = 0.05):
    """``(mu, sigma)`` ``[H]`` of the present region tokens of ``rows`` (both modalities pooled, so
    one affine map serves h[P] and h[S] and folds through either fusion, see
    :func:`fold_token_standardization`). sigma has a floor of ``floor_share`` of the tokens' RMS:
    dimensions that barely vary would otherwise get huge weights that bf16 inference cannot
    reproduce."""
    sel = z[rows][presence[rows].bool()]
    if sel.shape[0] == 0:
        return torch.zeros(z.shape[-1]), torch.ones(z.shape[-1])
    sel = sel.double()
    floor = floor_share * sel.pow(2).mean().sqrt().clamp_min(1e-6)
    mu, sigma = sel.mean(0), torch.sqrt(sel.var(0, unbiased=False) + floor ** 2)
    return mu.float(), sigma.float()


@torch.no_grad()
def fold_token_standardization(head: TaskHead, mu: torch.Tensor, sigma: torch.Tensor) -> TaskHead:
    """Turn a head trained on standardised tokens ``(z - mu) / sigma`` into the same function of the
    raw tokens, in place: both fusions commute with a shared affine map (AttnPool's and the
    average's weights sum to 1), so ``l1`` of AttnPool and the MLP's first layer absorb it
    (``W' = W / sigma, b' = b - W' mu``). The saved head stays a plain TaskHead on raw embeddings."""
    layers = [head.mlp.fc1] + ([head.pool.l1] if head.pool is not None else [])
    for layer in layers:
        layer.weight.div_(sigma.to(layer.weight))
        layer.bias.sub_(layer.weight @ mu.to(layer.weight))
    return head


class ReFoundWithHead(nn.Module):
    """Backbone + task head for fine-tuning (trainable backbone) or linear/MLP probing on a
    frozen backbone (``freeze_backbone=True``: no gradients, backbone kept in eval mode)."""

    def __init__(self, backbone: ReFound, head: TaskHead, freeze_backbone: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, batch: dict) -> torch.Tensor:
        """Head output ``[B, num_classes]`` for a collated batch dict."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            out = self.backbone.forward_batch(batch)
        return self.head(out)

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        return self.head.predict(self.backbone.forward_batch(batch))


def _region_tokens(features, presence):
    if isinstance(features, ReFoundOutput):
        return features.region_tokens, features.presence if presence is None else presence
    if features.dim() != 3 or features.shape[1] != 2:
        raise ValueError(f"region embedding must be [B, 2, H] (h[P], h[S]), got {tuple(features.shape)}")
    return features, presence
