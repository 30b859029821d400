"""Small interfaces of the teacher roles in ReFound pre-training, and their identity strings.

Roles (paper 4.2.1, 4.2.2, A.2.1):

* :class:`Describer` -- ``LLM(.)`` of Eq. 2: POI names of a region -> a region-function description.
* :class:`SentenceEmbedder` -- ``SenEmb(.)`` of Eq. 2: the description -> the LLM-feature ``u_P``.
* :class:`ImageTeacher` -- ``VFM(.)`` of Eq. 4 (``u_S``) and the VLFM image encoder of Eq. 5 (``v_S``).
* :class:`PatchFeaturizer` -- per-patch features from which the visual tokenizer (MGDM, Eq. 6)
  derives one discrete token per image patch.

Every teacher has an ``identity()`` string that names everything its output depends on (model,
weights file, package version, preprocessing, options). The teacher cache
(:mod:`refound_core.teachers.cache`) hashes these strings: a changed teacher gives a new cache folder,
so a stale target can never be read back for a different teacher.
"""
from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


def stable_hash(obj, length: int = 16) -> str:
    """Short SHA-256 hex digest of ``obj`` serialised as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def package_version(dist_name: str) -> str:
    """Installed version of a distribution, or ``"absent"`` (never imports the package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return "absent"


def file_signature(path) -> str:
    """Content signature of a weights file (``name:size:sha256 of its first and last MiB``), or of a
    folder's weight/config files.

    Cheap (no hashing of gigabytes), stable when a dataset and its cache are copied to another machine,
    and changed whenever a user swaps the weights in place.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        parts = [file_signature(os.path.join(path, name)) for name in sorted(os.listdir(path))
                 if name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".npz", ".model"))
                 and os.path.isfile(os.path.join(path, name))]
        return f"dir:{len(parts)}:{stable_hash(parts, 12)}"
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            digest.update(fh.read(1 << 20))
    return f"{os.path.basename(path)}:{size}:{digest.hexdigest()[:12]}"


class Describer(ABC):
    """``LLM(.)`` of paper Eq. 2: writes a region-function description from the region's POIs."""

    @abstractmethod
    def identity(self) -> str:
        """Everything the description depends on (model, prompt version, decoding options)."""

    @abstractmethod
    def describe(self, names: Sequence[str], categories: Sequence[str]) -> str:
        """Description of one region from its POI names and raw category labels (same length)."""

    def describe_batch(self, regions: Sequence[tuple]) -> list:
        """``[(names, categories), ...] -> [description, ...]``; override to batch a model."""
        return [self.describe(names, cats) for names, cats in regions]


class SentenceEmbedder(ABC):
    """``SenEmb(.)`` of paper Eq. 2. ``embed_texts`` sees texts of at most ``max_chunk_chars``
    characters; longer descriptions are chunked by :func:`refound_core.teachers.sentence.embed_long_texts`
    (paper A.2.1)."""

    dim: int
    max_chunk_chars: int = 512

    @abstractmethod
    def identity(self) -> str:
        """Model, weights and pooling of the embedder."""

    @abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``float32 [len(texts), dim]``."""


class ImageTeacher(ABC):
    """Image encoder of a visual (DVFM, Eq. 4) or visual-language (DVLFM, Eq. 5) foundation model."""

    dim: int

    @abstractmethod
    def identity(self) -> str:
        """Model, weights, input size and normalisation."""

    @abstractmethod
    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``uint8 [H, W, 3]`` images (any size) -> ``float32 [len(images), dim]``."""


class PatchFeaturizer(ABC):
    """Per-patch features for the visual tokenizer of MGDM (paper 4.2.2, A.2.1).

    ``patch_features(images, grid)`` returns ``float32 [B, grid*grid, feature_dim]`` in row-major
    order (row 0 = north, as the model's patches), so token ``i`` belongs to the model's patch ``i``.
    """

    feature_dim: int

    @abstractmethod
    def identity(self) -> str:
        """Source of the features (teacher identity and layer, or raw pixels)."""

    @abstractmethod
    def patch_features(self, images: Sequence[np.ndarray], grid: int) -> np.ndarray:
        """``float32 [len(images), grid*grid, feature_dim]``."""


# Paper choices per role (A.2.1), recorded next to ours in every cache's meta.json and checkpoint.
PAPER_CHOICES = {
    "describer": "ChatGLM-6B prompted with the region's POI names (A.4)",
    "sentence": "M3E-base, chunked and length-weighted averaged (A.2.1)",
    "visual": "CN-CLIP ViT-L/14 image encoder (A.2.1)",
    "vl": "CN-CLIP ViT-L/14 image embeddings, image-image cosine (4.2.1, last paragraph)",
    "tokenizer": "DALL-E dVAE, 8,192 codes, image resized so tokens match patches (A.2.1)",
}


@dataclass
class Teachers:
    """The five teacher roles of pre-training (paper 4.2.1, 4.2.2).

    ``vl=None`` (or the same object as ``visual``) means the DVLFM teacher matrix is built from the
    visual teacher's image embeddings, as the paper itself does with CN-CLIP's image encoder.
    ``tokenizer`` is a :class:`refound_core.teachers.tokenizer_vq.KMeansTokenizer`.
    """

    describer: Describer
    sentence: SentenceEmbedder
    visual: ImageTeacher
    tokenizer: object
    vl: Optional[ImageTeacher] = None
    spec: dict = field(default_factory=dict)

    @property
    def vl_is_visual(self) -> bool:
        return self.vl is None or self.vl is self.visual

    @property
    def vl_teacher(self) -> ImageTeacher:
        return self.visual if self.vl_is_visual else self.vl

    def image_targets(self, images: Sequence[np.ndarray], grid: int) -> tuple:
        """``(u_S [B, dim], patch features [B, grid*grid, feature_dim])`` of ``images``: the visual
        teacher's embedding (DVFM) and the tokenizer's patch features (MGDM). A visual teacher that is
        also the patch featurizer and defines ``embed_and_patch_features`` gives both from one
        forward pass; otherwise each is computed on its own."""
        featurizer = self.tokenizer.featurizer
        both = getattr(self.visual, "embed_and_patch_features", None)
        if featurizer is self.visual and both is not None:
            return both(images, grid)
        return self.visual.embed_images(images), featurizer.patch_features(images, grid)

    def identity(self) -> dict:
        """Identity strings of every role: what the cache folder name is hashed from."""
        return {
            "describer": self.describer.identity(),
            "sentence": self.sentence.identity(),
            "visual": self.visual.identity(),
            "vl": "same-as-visual" if self.vl_is_visual else self.vl.identity(),
            "tokenizer": self.tokenizer.identity(),
        }

    def provenance(self) -> dict:
        """Per role: what we used and what the paper used (for meta.json and checkpoints)."""
        ours = self.identity()
        return {role: {"used": ours[role], "paper": PAPER_CHOICES[role]} for role in PAPER_CHOICES}
