"""Regions of a dataset -> model batches, with the checkpoint's vocabularies.

A downstream city is encoded with the tokenizer and category vocabulary stored in the
*checkpoint* (those the model was pre-trained with), never the downstream dataset's own: an
unseen character or category then maps to [UNK]/UNK exactly as at inference time.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from refound_core.data.featurize import Featurizer, length_bucketed_batches
from refound_core.data.tokenizer import PoiTokenizer
from refound_core.data.vocab import CategoryVocab
from refound_core.errors import CheckpointError


def featurizer_for_checkpoint(loaded, truncation: str = "random") -> Featurizer:
    """The Featurizer matching a loaded checkpoint (``refound_core.model.checkpoint.LoadedCheckpoint``)."""
    files = loaded.files
    if "tokenizer" not in files or "category_vocab" not in files:
        raise CheckpointError(f"checkpoint {loaded.path} stores no tokenizer / category vocabulary; "
                              "it cannot encode POIs (was it written by `refound pretrain` or `refound finetune`?)")
    tokenizer = PoiTokenizer.load(files["tokenizer"])
    vocab = CategoryVocab.load(files["category_vocab"])
    cfg = loaded.config
    return Featurizer(tokenizer, vocab, max_poi_tokens=cfg.max_poi_tokens, grid_cells=cfg.grid_cells,
                      truncation=truncation)


class RegionBatches:
    """``(indices, shuffle, epoch) -> iterator of (batch dict, positions)`` for the training loop.

    Batches group regions of similar POI-sequence length (no padding to 512). Featurisation is
    seeded by (seed, epoch, region), so a run is reproducible and evaluation (epoch -1) is
    deterministic.
    """

    def __init__(self, dataset, featurizer: Featurizer, image_size: int, batch_size: int, seed: int = 0):
        self.dataset, self.featurizer = dataset, featurizer
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        # token count upper bound per region, for bucketing: one [SEP] per POI + ~3 tokens per name
        self.length_hint = np.minimum(1 + 4 * np.asarray(dataset.poi_count), featurizer.max_poi_tokens)

    def __call__(self, indices: np.ndarray, shuffle: bool, epoch: int) -> Iterator[tuple]:
        indices = np.asarray(indices)
        rng = np.random.default_rng([self.seed, epoch + 1])
        groups = length_bucketed_batches(self.length_hint[indices], self.batch_size, shuffle=shuffle,
                                         rng=rng if shuffle else None)
        for pos in groups:
            encoded = [self.featurizer.encode(self.dataset[int(indices[p])],
                                              np.random.default_rng([self.seed, epoch + 1, int(indices[p])]))
                       for p in pos]
            yield self.featurizer.collate(encoded, self.image_size), np.asarray(pos)
