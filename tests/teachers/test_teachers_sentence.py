"""Chunked, length-weighted sentence embedding of long descriptions (paper A.2.1)."""
import numpy as np
import pytest

from refound_core.teachers.base import SentenceEmbedder
from refound_core.teachers.sentence import chunk_text, embed_long_texts
from refound_core.teachers.stubs import StubSentenceEmbedder


class TableEmbedder(SentenceEmbedder):
    """Returns a vector looked up per chunk, and records every batch it gets."""

    def __init__(self, table, max_chunk_chars):
        self.table, self.max_chunk_chars = table, max_chunk_chars
        self.dim = len(next(iter(table.values())))
        self.batches = []

    def identity(self):
        return "table"

    def embed_texts(self, texts):
        self.batches.append(list(texts))
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_chunks_respect_the_limit_and_rebuild_the_text():
    text = "First sentence here. Second one! 第三句话很长很长很长很长很长很长。 Short. " + "x" * 50
    for m in (5, 12, 30, 1000):
        chunks = chunk_text(text, m)
        assert "".join(chunks) == text
        assert all(0 < len(c) <= m for c in chunks)
    # Sentences are kept whole when they fit: every chunk boundary falls after a sentence end
    # unless the sentence itself is longer than the limit.
    chunks = chunk_text("Aa. Bb. Cc.", 8)
    assert chunks == ["Aa. Bb. ", "Cc."]
    assert chunk_text("", 10) == []
    with pytest.raises(ValueError):
        chunk_text("abc", 0)


def test_weighted_average_matches_a_hand_computation():
    # max 10 chars: "aaaa. " (6) + "bbbbbbbbbbbb" (12 -> 10 + 2) ...
    text = "aaaa. bbbbbbbbbbbb"
    chunks = chunk_text(text, 10)
    assert chunks == ["aaaa. ", "bbbbbbbbbb", "bb"]
    table = {"aaaa. ": [1.0, 0.0, 0.0], "bbbbbbbbbb": [0.0, 2.0, 0.0], "bb": [0.0, 0.0, 4.0], "short": [3.0, 3.0, 3.0]}
    emb = TableEmbedder(table, max_chunk_chars=10)
    out = embed_long_texts(emb, [text, "", "short"])
    # (6*[1,0,0] + 10*[0,2,0] + 2*[0,0,4]) / 18
    expected = np.array([6 / 18, 20 / 18, 8 / 18])
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)  # empty description -> zero row
    np.testing.assert_allclose(out[2], [3.0, 3.0, 3.0])
    assert len(emb.batches) == 1 and len(emb.batches[0]) == 4  # one batched call for every chunk
    assert out.dtype == np.float32


def test_short_texts_are_embedded_unchanged():
    emb = StubSentenceEmbedder(dim=16, max_chunk_chars=1000)
    texts = ["a cafe and a bank", "schools and a library"]
    np.testing.assert_allclose(embed_long_texts(emb, texts), emb.embed_texts(texts), rtol=1e-6)
