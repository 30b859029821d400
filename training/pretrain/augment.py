"""Photometric augmentation of the student's image during pre-training.

Teacher targets (DVFM u_S, DVLFM similarities, MGDM visual tokens) are cached once per dataset from
the clean image (docs/TEACHERS.md); the student sees a recoloured copy and must still match them,
so it learns what the teachers see (objects, layout) rather than one renderer's or one sensor's
palette, sun and exposure. Only colour changes: every pixel stays where it was, so per-patch
targets, patch masks and the POI-to-patch labels of CMSA stay aligned. The paper (A.2.1) states no
augmentation; this is our choice, documented in docs/EVALUATION.md with its measured effect.

Hand-written (five numpy lines) rather than torchvision's ColorJitter because every draw must be a
function of (seed, epoch, index), as the rest of the pipeline (training/pretrain/data.py): resumable
runs and any worker count give the same augmentation; torchvision draws from the global RNG.
"""
from __future__ import annotations

import numpy as np


def photometric_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A recoloured ``uint8 [3, H, W]`` copy of ``image``; ``strength`` 0 returns it unchanged, 1 is
    brightness and contrast x U(0.6, 1.4), saturation x U(0.5, 1.5), per-channel gain x U(0.9, 1.1)
    (white balance) and gamma exp(U(-0.3, 0.3)), each range scaled by ``strength``."""
    if strength <= 0 or image is None:
        return image
    s = float(strength)

    def u(half):  # a factor drawn from U(1 - half * s, 1 + half * s)
        return rng.uniform(1.0 - half * s, 1.0 + half * s)

    x = image.astype(np.float32) / 255.0
    x = x * (u(0.4) * np.array([u(0.1), u(0.1), u(0.1)], np.float32)[:, None, None])  # brightness, gains
    grey = x.mean(axis=0, keepdims=True)
    x = grey + (x - grey) * u(0.5)  # saturation
    x = (x - grey.mean()) * u(0.4) + grey.mean()  # contrast about the mean grey level
    x = np.clip(x, 0.0, 1.0) ** np.float32(np.exp(rng.uniform(-0.3 * s, 0.3 * s)))  # gamma
    return np.round(x * 255.0).astype(np.uint8)
