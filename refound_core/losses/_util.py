"""Small helpers shared by the objectives.

Losses are written as masked means over the whole batch rather than by boolean selection, so
they need no device-to-host synchronisation and stay connected to every head parameter even when
a batch has nothing for an objective (then the loss is an exact zero with zero gradients, and
DDP's gradient reduction sees the same parameters on every rank and step).
"""
from __future__ import annotations

import torch


def flag(source, key: str, like: torch.Tensor) -> torch.Tensor:
    """``bool [B]`` flag from a batch dict or a model output, all True when it is absent."""
    value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
    if value is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    return value.to(device=like.device, dtype=torch.bool)


def teacher(batch: dict, key: str, objective: str, valid: torch.Tensor) -> torch.Tensor:
    """The teacher target ``batch[key]`` as float32, zeroed on invalid rows.

    Zeroing (rather than leaving NaN placeholders of a cache in place) matters: a NaN target
    would leak into the gradient through the cosine even on a masked-out row.
    """
    value = batch.get(key)
    if value is None:
        raise KeyError(f"{objective} needs the teacher target {key!r} in the batch, but the teacher cache has "
                       f"none; build it, or disable the objective (--no-{objective.lower()})")
    value = value.to(device=valid.device, dtype=torch.float32)
    return torch.where(valid.view(-1, *([1] * (value.dim() - 1))), value, torch.zeros_like(value))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (same shape); exactly 0 (with a graph) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def full_precision(device: torch.device):
    """Autocast off: small similarity matrices are computed in float32 even inside a bf16
    autocast region (a bf16 cosine / 0.07 would be off by up to ~0.05 per logit)."""
    return torch.autocast(device_type=device.type, enabled=False)
