"""Visual tokenizer for Masked Geospatial Data Modeling (paper 4.2.2, Eq. 6; A.2.1).

The paper predicts, at each masked image patch, the discrete token of the public DALL-E dVAE
(8,192 codes), with the image resized so that tokens and patches coincide. No such tokenizer ships
offline, so we follow BEiT v2 / VQ-KD: the codebook is a k-means clustering of per-patch features of
a teacher (or of raw pixels when no teacher is given), fitted once per dataset and saved with the
model as safetensors. The feature map is produced at exactly the model's patch grid
(``patches_per_side x patches_per_side``), so token ``i`` is the target of patch ``i``.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

from refound_core.errors import InputError
from refound_core.teachers.base import PatchFeaturizer

log = logging.getLogger(__name__)
CODEBOOK_FORMAT = "refound-codebook/1"


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_centroid(features, centroids, chunk: int = 16384, device: str = "cpu"):
    """Index of the nearest centroid (squared Euclidean) for each row; torch, chunked.

    Works on numpy or torch inputs and returns ``int64`` numpy indices.
    """
    import torch

    x = torch.as_tensor(features if isinstance(features, torch.Tensor) else np.asarray(features, dtype=np.float32))
    c = torch.as_tensor(centroids if isinstance(centroids, torch.Tensor) else np.asarray(centroids, dtype=np.float32))
    x, c = x.float(), c.float().to(device)
    c_sq = (c * c).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk].to(device)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 does not change the argmin.
        out[s:s + chunk] = (c_sq[None, :] - 2.0 * xb @ c.T).argmin(1).cpu()
    return out.numpy()


def kmeans(features: np.ndarray, k: int, iters: int = 20, seed: int = 0, tol: float = 1e-4,
           init_sample: int = 32768, device: str = "cpu") -> np.ndarray:
    """Lloyd's k-means with k-means++ initialisation (on at most ``init_sample`` points); deterministic.

    Empty clusters are re-seeded with the points farthest from their centroids. When there are
    fewer distinct points than ``k``, the spare codes copy data points with a tiny offset (they stay
    valid codes that simply win no patch) so the MGDM classifier keeps its configured size.
    ``device`` only moves the distance computations (e.g. to a GPU). Returns ``float32 [k, C]``.
    """
    import torch

    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    m = x.shape[0]
    if m == 0:
        raise InputError("no patch features to fit the visual tokenizer on: the dataset has no images; "
                         "use a dataset with satellite images or give a fitted codebook")
    g = torch.Generator().manual_seed(seed)
    if m <= k:
        log.warning("only %d patch features for %d codes: spare codes duplicate data points", m, k)
        idx = torch.arange(k) % m
        jitter = 1e-3 * torch.randn(k, x.shape[1], generator=g) * (torch.arange(k) >= m)[:, None]
        return (x[idx] + jitter).numpy()
    sub = x[torch.randperm(m, generator=g)[:init_sample]].to(device)
    # k-means++: each next centre drawn with probability proportional to squared distance.
    centres = torch.empty(k, x.shape[1], device=device)
    centres[0] = sub[torch.randint(sub.shape[0], (1,), generator=g)]
    d2 = ((sub - centres[0]) ** 2).sum(1)
    for j in range(1, k):
        p = d2.cpu()
        pick = torch.multinomial(p / p.sum(), 1, generator=g) if p.sum() > 0 else torch.randint(sub.shape[0], (1,), generator=g)
        centres[j] = sub[pick.to(device)]
        d2 = torch.minimum(d2, ((sub - centres[j]) ** 2).sum(1))
    centres = centres.cpu()
    for _ in range(iters):
        assign = torch.as_tensor(nearest_centroid(x, centres, device=device))
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        new = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = ((x - centres[assign]) ** 2).sum(1).topk(len(empty)).indices
            new[empty] = x[far]
        shift = ((new - centres) ** 2).sum(1).max().item()
        centres = new
        if shift < tol ** 2 and not len(empty):
            break
    return centres.numpy().astype(np.float32)


class Codebook:
    """A fitted visual codebook: ``centroids [K, C]``; ``assign`` maps features to token ids."""

    def __init__(self, centroids: np.ndarray, normalize: bool = True, source: str = ""):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.normalize = bool(normalize)
        self.source = source

    @property
    def num_codes(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.centroids.shape[1])

    def identity(self) -> str:
        import hashlib

        digest = hashlib.sha256(self.centroids.tobytes()).hexdigest()[:16]
        return f"codebook(k={self.num_codes},dim={self.feature_dim},normalize={self.normalize},sha={digest})"

    def assign(self, features: np.ndarray) -> np.ndarray:
        """``[..., C]`` features -> ``int64 [...]`` token ids."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape[-1] != self.feature_dim:
            raise InputError(f"patch features have {features.shape[-1]} dims but the codebook has {self.feature_dim}: "
                             "the codebook was fitted on another teacher's features")
        flat = features.reshape(-1, self.feature_dim)
        if self.normalize:
            flat = _l2n(flat)
        return nearest_centroid(flat, self.centroids).reshape(features.shape[:-1])

    def save(self, path) -> None:
        """Write ``path`` (safetensors) atomically."""
        from safetensors.numpy import save_file

        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({"centroids": self.centroids}, tmp,
                  metadata={"format": CODEBOOK_FORMAT, "normalize": str(int(self.normalize)), "source": self.source})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "Codebook":
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"codebook {path!r} does not exist: give a codebook.safetensors written by refound")
        with safe_open(path, framework="numpy") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != CODEBOOK_FORMAT or "centroids" not in fh.keys():
                raise InputError(f"{path} is not a refound codebook ({CODEBOOK_FORMAT})")
            centroids = fh.get_tensor("centroids")
        return cls(centroids, normalize=meta.get("normalize", "1") == "1", source=meta.get("source", ""))


class PixelPatchFeaturizer(PatchFeaturizer):
    """Raw pixels per patch (the image resized to ``grid * patch_px``): tokenizer features without a teacher."""

    def __init__(self, patch_px: int = 4):
        self.patch_px = int(patch_px)
        self.feature_dim = 3 * self.patch_px ** 2

    def identity(self) -> str:
        return f"pixels(patch_px={self.patch_px},bilinear-antialias,range=0..1)"

    def patch_features(self, images, grid):
        from refound_core.teachers.visual import images_to_tensor

        p = self.patch_px
        x = images_to_tensor(images, grid * p, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # [B, 3, g*p, g*p]
        b = x.shape[0]
        x = x.reshape(b, 3, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, 3 * p * p)
        return x.numpy()


class KMeansTokenizer:
    """k-means visual tokenizer (BEiT v2 / VQ-KD idea) over a :class:`PatchFeaturizer`'s features.

    Either fitted per dataset (``codebook=None``: the teacher cache fits it on the dataset's patches
    and stores it) or fixed (``codebook`` given, e.g. the one saved with a pre-trained model, so
    fine-tuning data gets the same token ids).
    """

    def __init__(self, featurizer: PatchFeaturizer, num_codes: int = 512, iters: int = 20, seed: int = 0,
                 max_fit_vectors: int = 200_000, normalize: bool = True, codebook: Optional[Codebook] = None,
                 device: str = "cpu"):
        if num_codes < 2 or num_codes > 32767:
            raise InputError(f"codebook size {num_codes} must be between 2 and 32767 (paper: 8192)")
        self.featurizer = featurizer
        self.num_codes = codebook.num_codes if codebook is not None else int(num_codes)
        self.iters, self.seed, self.max_fit_vectors = int(iters), int(seed), int(max_fit_vectors)
        self.normalize = codebook.normalize if codebook is not None else bool(normalize)
        self.codebook = codebook
        self.device = device  # where k-means runs; not part of the identity (same result)
        if codebook is not None and codebook.source and codebook.source != featurizer.identity():
            log.warning("codebook was fitted on %s but tokens will use %s", codebook.source, featurizer.identity())

    def identity(self) -> str:
        if self.codebook is not None:
            return f"fixed-{self.codebook.identity()}(features={self.featurizer.identity()})"
        return (f"kmeans-tokenizer(k={self.num_codes},iters={self.iters},seed={self.seed},"
                f"max_fit={self.max_fit_vectors},normalize={self.normalize},features={self.featurizer.identity()})")

    def fit(self, features: np.ndarray) -> Codebook:
        """Fit a codebook on ``[M, C]`` patch features (a seeded subsample of at most ``max_fit_vectors``)."""
        features = np.asarray(features, dtype=np.float32).reshape(-1, self.featurizer.feature_dim)
        if features.shape[0] > self.max_fit_vectors:
            rng = np.random.default_rng(self.seed)
            features = features[np.sort(rng.choice(features.shape[0], self.max_fit_vectors, replace=False))]
        if self.normalize:
            features = _l2n(features)
        if features.shape[0] == 0:
            log.warning("no images to fit the visual tokenizer on: an all-zero codebook is stored "
                        "(every region's tokens are ignored)")
            return Codebook(np.zeros((self.num_codes, self.featurizer.feature_dim), np.float32),
                            normalize=self.normalize, source=self.featurizer.identity())
        centroids = kmeans(features, self.num_codes, iters=self.iters, seed=self.seed, device=self.device)
        return Codebook(centroids, normalize=self.normalize, source=self.featurizer.identity())

    def tokens(self, images: Sequence[np.ndarray], grid: int, codebook: Optional[Codebook] = None) -> np.ndarray:
        """``int64 [B, grid*grid]`` visual tokens of the images (the MGDM targets)."""
        book = codebook or self.codebook
        if book is None:
            raise InputError("the visual tokenizer has no codebook yet: fit it on a dataset first "
                             "(`refound teachers`) or load a codebook.safetensors")
        return book.assign(self.featurizer.patch_features(images, grid))
