"""Tiny deterministic stand-in teachers with the real interfaces, for tests and smoke runs.

They load nothing, run in microseconds, and count their calls so tests can prove that the teacher
cache reuses results instead of recomputing them. Outputs still carry signal (similar texts get
similar vectors, similar images similar features), so a pre-training smoke run has something to learn.
"""
from __future__ import annotations

import zlib

import numpy as np

from refound_core.teachers.base import ImageTeacher, PatchFeaturizer, SentenceEmbedder, Teachers
from refound_core.teachers.describe import TemplateDescriber


class StubDescriber(TemplateDescriber):
    """The template describer, counting the regions it describes."""

    def __init__(self, tag: str = "", **kwargs):
        super().__init__(**kwargs)
        self.tag = tag
        self.calls = 0

    def identity(self) -> str:
        return f"stub-{super().identity()}{self.tag}"

    def describe(self, names, categories):
        self.calls += 1
        return super().describe(names, categories)


class StubSentenceEmbedder(SentenceEmbedder):
    """Hashed character-trigram counts, L2-normalised: texts sharing trigrams are close."""

    def __init__(self, dim: int = 16, max_chunk_chars: int = 64, tag: str = ""):
        self.dim, self.max_chunk_chars, self.tag = dim, max_chunk_chars, tag
        self.calls = 0
        self.texts_seen = 0

    def identity(self) -> str:
        return f"stub-sentence(dim={self.dim},chunk={self.max_chunk_chars}){self.tag}"

    def embed_texts(self, texts):
        self.calls += 1
        self.texts_seen += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            padded = f"  {text} "
            for j in range(len(padded) - 2):
                out[i, zlib.crc32(padded[j:j + 3].encode("utf-8")) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class StubImageTeacher(ImageTeacher, PatchFeaturizer):
    """Per-patch mean and standard deviation of RGB through a fixed random linear map.

    ``embed_images`` is the average of a 4 x 4 grid of patch features mapped to ``dim``.
    """

    def __init__(self, dim: int = 8, feature_dim: int = 6, seed: int = 0, tag: str = ""):
        self.dim, self.feature_dim, self.seed, self.tag = dim, feature_dim, seed, tag
        rng = np.random.default_rng(seed)
        self._w_patch = rng.standard_normal((6, feature_dim)).astype(np.float32)
        self._w_embed = rng.standard_normal((feature_dim, dim)).astype(np.float32)
        self.embed_calls = 0
        self.patch_calls = 0
        self.images_seen = 0

    def identity(self) -> str:
        return f"stub-image(dim={self.dim},features={self.feature_dim},seed={self.seed}){self.tag}"

    def _stats(self, images, grid):
        from refound_core.teachers.visual import images_to_tensor

        x = images_to_tensor(images, grid * 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).numpy()
        b = x.shape[0]
        x = x.reshape(b, 3, grid, 4, grid, 4).transpose(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, 3, 16)
        return np.concatenate([x.mean(-1), x.std(-1)], axis=-1) @ self._w_patch

    def patch_features(self, images, grid):
        self.patch_calls += 1
        self.images_seen += len(images)
        return self._stats(images, grid).astype(np.float32)

    def embed_images(self, images):
        self.embed_calls += 1
        self.images_seen += len(images)
        return (self._stats(images, 4).mean(1) @ self._w_embed).astype(np.float32)


def stub_teachers(codebook_size: int = 8, seed: int = 0, tag: str = "") -> Teachers:
    """A full set of stand-in teachers (template describer, trigram embedder, pixel-stat images)."""
    from refound_core.teachers.tokenizer_vq import KMeansTokenizer

    visual = StubImageTeacher(seed=seed, tag=tag)
    return Teachers(describer=StubDescriber(tag=tag), sentence=StubSentenceEmbedder(tag=tag), visual=visual,
                    tokenizer=KMeansTokenizer(visual, num_codes=codebook_size, iters=10, seed=seed),
                    spec={"preset": "stub"})
