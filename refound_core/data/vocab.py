"""POI category vocabulary (paper 4.1.1, "Category Embedding").

The paper maps each POI's category-id through a trainable table E_c. Our sources hand over raw
category *labels* (strings such as ``"amenity=cafe"``), so this vocabulary turns them into ids:
``0 = [PAD]`` (the CLS token and padding use it, as ``poi_cate_vocab['PAD']`` does in the official
code, SEMANTICS.md 2.2), ``1 = [UNK]`` (a label not seen when the vocabulary was built), then the
data's labels in sorted order so the same data always gives the same ids.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from refound_core.errors import InputError

_FORMAT = "refound-category-vocab"
_VERSION = 1


def _label(value) -> str | None:
    """A category as a clean string, or None when it is missing (None, NaN, empty)."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from pandas
        return None
    text = str(value).strip()
    return text or None


class CategoryVocab:
    """Raw category label <-> integer id. ``len(vocab)`` is the embedding table size."""

    PAD = "[PAD]"
    UNK = "[UNK]"
    PAD_ID = 0
    UNK_ID = 1

    def __init__(self, labels: Iterable[str]):
        """Build from the data's labels (specials excluded); see :meth:`build`."""
        self._tokens: list[str] = [self.PAD, self.UNK]
        self._index: dict[str, int] = {self.PAD: self.PAD_ID, self.UNK: self.UNK_ID}
        for text in labels:
            if text in self._index:
                raise InputError(f"category vocabulary: label {text!r} appears twice; labels must be unique")
            self._index[text] = len(self._tokens)
            self._tokens.append(text)

    @classmethod
    def build(cls, raw_categories: Iterable) -> "CategoryVocab":
        """Vocabulary of every distinct non-empty label in ``raw_categories``, sorted (deterministic)."""
        labels = {lab for lab in map(_label, raw_categories) if lab is not None}
        labels -= {cls.PAD, cls.UNK}
        return cls(sorted(labels))

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, label) -> bool:
        return _label(label) in self._index

    @property
    def labels(self) -> list[str]:
        """All entries by id, specials included."""
        return list(self._tokens)

    def id_of(self, label) -> int:
        """Id of one label; missing or unseen labels map to ``[UNK]``."""
        text = _label(label)
        return self._index.get(text, self.UNK_ID) if text is not None else self.UNK_ID

    def encode(self, labels: Iterable) -> np.ndarray:
        """``int64 [N]`` ids of ``labels`` (unknown -> UNK)."""
        labels = labels if isinstance(labels, (list, tuple)) else list(labels)
        get, unk = self._index.get, self.UNK_ID
        # Fast path for clean strings; _label only for the odd value (None, NaN, numbers, padding).
        ids = [get(lab, -1) if type(lab) is str else -1 for lab in labels]
        out = np.asarray(ids, dtype=np.int64)
        if (out < 0).any():
            for i in np.flatnonzero(out < 0):
                out[i] = self.id_of(labels[i])
        out[out < 0] = unk
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self._tokens[int(i)] for i in ids]

    # -- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "pad_id": self.PAD_ID, "unk_id": self.UNK_ID,
                "labels": self._tokens}

    def save(self, path) -> Path:
        """Write the vocabulary as JSON (atomically: temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path) -> "CategoryVocab":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"category vocabulary {path} does not exist; build one with CategoryVocab.build "
                             "or point to the checkpoint's category_vocab.json") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"category vocabulary {path} is not readable JSON ({exc}); "
                             "rebuild it with CategoryVocab.build(...).save(path)") from None
        labels = data.get("labels") if isinstance(data, dict) else None
        if (data.get("format") if isinstance(data, dict) else None) != _FORMAT or not isinstance(labels, list) \
                or labels[:2] != [cls.PAD, cls.UNK]:
            raise InputError(f"{path} is not a ReFound category vocabulary (format {_FORMAT!r}, "
                             "labels starting with [PAD], [UNK]); rebuild it with CategoryVocab.build")
        return cls(labels[2:])

    def __repr__(self) -> str:
        return f"CategoryVocab({len(self)} entries)"
