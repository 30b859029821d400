"""Featurisation: RegionSample -> EncodedRegion -> padded model batch (paper 4.1.1, A.2.1).

POI side of a region (paper 4.1.1): the POIs are serialised along the Z-curve, each POI's name is
tokenised and closed by one ``[SEP]``, and a ``[P]`` CLS token (``[CLS]``, id 101) heads the
sequence. Every token carries four ids besides its token id:

* word_pos: position inside its POI's name, restarting at 0 for every POI (its [SEP] included);
* poi_pos:  1..K, the POI's rank in the Z-ordered sequence (0 for [P]);
* grid_pos: 1..G*G, the G x G sub-cell of the region holding the POI, row 0 at the north edge
  (0 for [P], G*G+1 for padding);
* category: the POI's category id on all its tokens (PAD for [P] and padding).

The conventions (expression order of the grid formula, padding values, the stop-at-first-overflow
truncation) follow the official implementation exactly (shared/parity/SEMANTICS.md 2.2); the
choices the paper leaves open are listed in docs/DATA-SEQUENCE.md.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

import numpy as np

from refound_core.data.sample import EncodedRegion, RegionSample
from refound_core.errors import InputError
from refound_core.data.zorder import zorder_permutation

TRUNCATIONS = ("random", "official")
ORDERS = ("zorder", "given")
#: default share of valid pixels below which a cell counts as having no image (see Featurizer)
DEFAULT_MIN_IMAGE_COVERAGE = 0.25


class NameTokenizer(Protocol):
    """What the featurizer needs from a tokenizer (``PoiTokenizer`` is the real one).

    ``encode_names`` returns each name's token ids *without* special tokens (names lower-cased);
    ``cls_id``/``sep_id`` are the [P] and [SEP] ids.
    """

    cls_id: int
    sep_id: int

    def encode_names(self, names: list) -> list: ...


def _as_list(values) -> list:
    return values if isinstance(values, list) else list(values)


class Featurizer:
    """Turn one region into model-ready arrays (see module docstring).

    Args:
        tokenizer: a :class:`~refound_core.data.tokenizer.PoiTokenizer` or any ``NameTokenizer``.
        category_vocab: a :class:`~refound_core.data.vocab.CategoryVocab` mapping raw labels to ids;
            ``None`` passes integer category ids through unchanged (the official loader's
            ``poi_cate_id``; used for parity with the official fixture).
        max_poi_tokens: L_P incl. the [P] token (paper A.2.1: 512).
        grid_cells: G, sub-cells per side for the grid-level position (paper A.2.1: 16).
        truncation: what to do when the POIs do not fit in ``max_poi_tokens``:
            ``'random'`` (paper A.2.1): randomly exclude whole POIs until the rest fits, keeping
            the rest in Z-order; ``'official'``: walk the sequence and stop at the first POI that
            overflows (SEMANTICS.md 2.2).
        order: ``'zorder'`` (paper 4.1.1) or ``'given'`` (keep the input order, as the official
            loader does with its pre-sorted files).
        zorder_unit_m: raster unit of the Z-ordering in CRS units (paper: 1 m).
        category_pad_id: category id of [P] and padding; default ``category_vocab.PAD_ID`` (0).
        min_image_coverage: below this share of valid pixels the image modality counts as
            missing (``has_image`` False, as for a cell outside the imagery): a sliver of image
            says little about the region and would be read as if it were the whole cell.
    """

    def __init__(self, tokenizer: NameTokenizer, category_vocab=None, max_poi_tokens: int = 512,
                 grid_cells: int = 16, truncation: str = "random", *, order: str = "zorder",
                 zorder_unit_m: float = 1.0, category_pad_id: Optional[int] = None,
                 min_image_coverage: float = DEFAULT_MIN_IMAGE_COVERAGE):
        if truncation not in TRUNCATIONS:
            raise InputError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if order not in ORDERS:
            raise InputError(f"order must be one of {ORDERS}, got {order!r}")
        if max_poi_tokens < 2:
            raise InputError(f"max_poi_tokens must be at least 2 ([P] plus one [SEP]), got {max_poi_tokens}")
        if grid_cells < 1:
            raise InputError(f"grid_cells must be positive, got {grid_cells}")
        if not 0.0 <= float(min_image_coverage) <= 1.0:
            raise InputError(f"min_image_coverage must lie in [0, 1], got {min_image_coverage}")
        self.min_image_coverage = float(min_image_coverage)
        self.tokenizer = tokenizer
        self.category_vocab = category_vocab
        self.max_poi_tokens = int(max_poi_tokens)
        self.grid_cells = int(grid_cells)
        self.truncation = truncation
        self.order = order
        self.zorder_unit_m = float(zorder_unit_m)
        if category_pad_id is None:
            category_pad_id = category_vocab.PAD_ID if category_vocab is not None else 0
        self.category_pad_id = int(category_pad_id)
        self.cls_id = int(getattr(tokenizer, "cls_id", 101))
        self.sep_id = int(getattr(tokenizer, "sep_id", 102))
        self.pad_token_id = int(getattr(tokenizer, "pad_id", 0))

    # -- public ----------------------------------------------------------------------------------
    def encode(self, sample: RegionSample, rng: np.random.Generator) -> EncodedRegion:
        """Encode one region. ``rng`` drives the Z-order tie breaks and the random truncation."""
        xmin, ymin, xmax, ymax = self._check_bounds(sample)
        names = _as_list(sample.poi_names)
        n = len(names)
        xy = np.asarray(sample.poi_xy, dtype=np.float64).reshape(-1, 2) if n else np.zeros((0, 2))
        n_cat = len(sample.poi_categories)
        if xy.shape[0] != n or n_cat != n:
            raise InputError(f"region {sample.cell_id}: {n} POI names but {n_cat} categories and "
                             f"{xy.shape[0]} locations; every POI needs a name, a category and x, y")
        if n and not np.isfinite(xy).all():
            raise InputError(f"region {sample.cell_id}: {int((~np.isfinite(xy)).any(1).sum())} POIs have "
                             "missing or non-finite coordinates; drop POIs without a geometry before encoding")

        # 1. serialise (paper 4.1.1): position in the sequence -> POI index
        if self.order == "zorder" and n:
            local = np.column_stack([xy[:, 0] - xmin, ymax - xy[:, 1]])  # x east, y south of the NW corner
            sequence = zorder_permutation(local, rng, self.zorder_unit_m)
        else:
            sequence = np.arange(n, dtype=np.int64)

        # 2. keep what fits in L_P - 1 tokens (paper A.2.1 / SEMANTICS.md 2.2)
        kept, token_lists = self._select(names, sequence, rng)
        kept_idx = sequence[kept]

        # 3. per-POI ids, then spread over each POI's tokens
        grid = self._grid_ids(xy[kept_idx], (xmin, ymin, xmax, ymax))
        cats = self._category_ids(sample, kept_idx)
        arrays = self._assemble(token_lists, grid, cats)

        image = self._image_chw(sample)
        coverage = float(sample.image_coverage) if image is not None else 0.0
        usable = image is not None and coverage > 0.0 and coverage >= self.min_image_coverage
        valid = None
        if usable and sample.image_valid is not None:
            valid = np.asarray(sample.image_valid, dtype=bool)
            if valid.shape != image.shape[1:]:
                raise InputError(f"region {sample.cell_id}: image_valid mask {list(valid.shape)} does not match "
                                 f"its image {list(image.shape[1:])}")
            if valid.all():
                valid = None
        return EncodedRegion(
            cell_id=sample.cell_id, **arrays, image=image if usable else None,
            has_pois=len(kept_idx) > 0, has_image=usable, image_coverage=coverage,
            num_pois=len(kept_idx), num_pois_total=n, labels=dict(sample.labels or {}), image_valid=valid)

    def collate(self, encoded: Sequence[EncodedRegion], image_size: int, pad_to_multiple: int = 8,
                pad_to_length: Optional[int] = None) -> dict:
        """:func:`collate` with this featurizer's grid size, category PAD and PAD token."""
        return collate(encoded, image_size, pad_to_multiple, grid_cells=self.grid_cells,
                       category_pad_id=self.category_pad_id, pad_token_id=self.pad_token_id,
                       pad_to_length=pad_to_length)

    # -- steps -----------------------------------------------------------------------------------
    @staticmethod
    def _check_bounds(sample: RegionSample) -> tuple:
        try:
            xmin, ymin, xmax, ymax = (float(v) for v in sample.bounds)
        except (TypeError, ValueError):
            raise InputError(f"region {sample.cell_id}: bounds must be (xmin, ymin, xmax, ymax), "
                             f"got {sample.bounds!r}") from None
        if not (math.isfinite(xmin + ymin + xmax + ymax) and xmax > xmin and ymax > ymin):
            raise InputError(f"region {sample.cell_id}: bounds {sample.bounds!r} are not a non-empty "
                             "(xmin, ymin, xmax, ymax) box; check the grid cell")
        return xmin, ymin, xmax, ymax

    def _select(self, names: list, sequence: np.ndarray, rng: np.random.Generator):
        """Positions (in ``sequence``) of the kept POIs, ascending, and their name token ids.

        Every POI costs at least one token (its [SEP]), so at most ``L_P - 1`` POIs can fit and
        only those candidates are ever tokenised: a cell with 100k POIs costs the same as one with
        a few hundred.
        """
        budget = self.max_poi_tokens - 1
        n = sequence.shape[0]
        if self.truncation == "official":
            # SEMANTICS.md 2.2: append while it fits, stop at the first POI that overflows.
            candidates = np.arange(n, dtype=np.int64)
        else:
            # Paper A.2.1 "random exclude some POIs": drop POIs in a random order until the rest
            # fits. Dropping from the front of a random order until the remainder fits is the same
            # as keeping the longest fitting prefix of a random order. With no overflow everything
            # is kept, whatever the order. The permutation is over *sequence positions*, so the
            # result does not depend on the input order of the POIs.
            candidates = rng.permutation(n).astype(np.int64)
        count, token_lists = self._fitting_prefix(names, sequence, candidates, budget)
        chosen = candidates[:count]
        order = np.argsort(chosen, kind="stable")  # back to Z-order
        return chosen[order], [token_lists[i] for i in order]

    def _fitting_prefix(self, names, sequence, candidates, budget):
        token_lists: list = []
        used, start, chunk = 0, 0, 128
        limit = min(candidates.shape[0], budget)
        while start < limit:
            idx = sequence[candidates[start:min(start + chunk, limit)]]
            for ids in self.tokenizer.encode_names([names[i] for i in idx]):
                used += len(ids) + 1  # + [SEP]
                if used > budget:
                    return len(token_lists), token_lists
                token_lists.append(ids)
            start += chunk
            chunk *= 2
        return len(token_lists), token_lists

    def _grid_ids(self, xy: np.ndarray, bounds: tuple) -> np.ndarray:
        """Grid-level position 1..G*G (paper 4.1.1), computed exactly as SEMANTICS.md 2.2.

        Same float64 expression order as the official code (it matters on cell borders), int()
        truncation toward zero, upper clamp to G-1 (POIs on the east/south border). We also clamp
        below at 0, which the official code does not: a POI more than one cell outside the
        west/north edge would otherwise get an invalid id.
        """
        xmin, ymin, xmax, ymax = bounds
        g = self.grid_cells
        gx = np.trunc(g * (xy[:, 0] - xmin) / (xmax - xmin))
        gy = np.trunc(g * (ymax - xy[:, 1]) / (ymax - ymin))
        gx = np.clip(gx, 0, g - 1).astype(np.int64)
        gy = np.clip(gy, 0, g - 1).astype(np.int64)
        return g * gy + gx + 1

    def _category_ids(self, sample: RegionSample, kept_idx: np.ndarray) -> np.ndarray:
        cats = sample.poi_categories
        picked = [cats[i] for i in kept_idx]
        if self.category_vocab is not None:
            return self.category_vocab.encode(picked)
        try:
            ids = np.asarray(picked, dtype=np.float64)
        except (TypeError, ValueError):
            ids = None
        if ids is None or (ids.size and (not np.isfinite(ids).all() or (ids != np.round(ids)).any() or ids.min() < 0)):
            raise InputError(f"region {sample.cell_id}: POI categories must be non-negative integer ids when "
                             "no category vocabulary is given; pass category_vocab=CategoryVocab.build(...)")
        return ids.astype(np.int64)

    def _assemble(self, token_lists: list, grid: np.ndarray, cats: np.ndarray) -> dict:
        """Lay the kept POIs out after [P] (SEMANTICS.md 2.2 step 1-2), all arrays int64 [Lp]."""
        name_len = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        poi_len = name_len + 1  # + [SEP]
        total = 1 + int(poi_len.sum())
        k = len(token_lists)
        starts = 1 + np.concatenate([[0], np.cumsum(poi_len)[:-1]]).astype(np.int64) if k else np.zeros(0, np.int64)

        token_ids = np.full(total, self.sep_id, dtype=np.int64)
        token_ids[0] = self.cls_id
        is_name = np.ones(total, dtype=bool)
        is_name[0] = False
        is_name[starts + name_len] = False  # the [SEP] slots
        if k:
            token_ids[is_name] = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int64,
                                             count=int(name_len.sum()))
        word_pos = np.zeros(total, dtype=np.int64)
        word_pos[1:] = np.arange(total - 1, dtype=np.int64) - np.repeat(starts - 1, poi_len)
        poi_pos = np.zeros(total, dtype=np.int64)
        poi_pos[1:] = np.repeat(np.arange(1, k + 1, dtype=np.int64), poi_len)
        grid_pos = np.zeros(total, dtype=np.int64)
        grid_pos[1:] = np.repeat(np.asarray(grid, dtype=np.int64), poi_len)
        category_ids = np.full(total, self.category_pad_id, dtype=np.int64)
        category_ids[1:] = np.repeat(np.asarray(cats, dtype=np.int64), poi_len)
        return dict(token_ids=token_ids, word_pos=word_pos, poi_pos=poi_pos, grid_pos=grid_pos,
                    category_ids=category_ids)

    @staticmethod
    def _image_chw(sample: RegionSample) -> Optional[np.ndarray]:
        img = sample.image
        if img is None:
            return None
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
            raise InputError(f"region {sample.cell_id}: image must be uint8 [H, W, 3] RGB, got "
                             f"{img.dtype} {list(img.shape)}; convert the chip to 8-bit RGB")
        return np.ascontiguousarray(img[:, :, :3].transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------------
def collate(encoded: Sequence[EncodedRegion], image_size: int, pad_to_multiple: int = 8, *,
            grid_cells: int = 16, category_pad_id: int = 0, pad_token_id: int = 0,
            pad_to_length: Optional[int] = None) -> dict:
    """Pad a list of encoded regions into the model's batch (official padding, SEMANTICS.md 2.2 step 3).

    POI arrays are padded to the longest region rounded up to ``pad_to_multiple`` (or exactly to
    ``pad_to_length``, e.g. 512 for the official fixed length). Padding: token ``pad_token_id``,
    word_pos ``0, 1, ...`` over the pad run, poi_pos = kept POIs + 1, grid ``G*G + 1``, category
    ``category_pad_id``. Images that are not ``image_size`` square are resized (bilinear,
    antialiased); missing images are zeros.

    Returns a dict: ``token_ids, word_pos, poi_pos, grid_pos, category_ids`` int64 ``[B, Lp]``;
    ``poi_mask`` bool ``[B, Lp]`` (True = real token); ``image`` uint8 ``[B, 3, S, S]``;
    ``image_valid`` bool ``[B, S, S]`` pixel validity (only when some region has a partial image;
    resized nearest-neighbour with its image);
    ``has_pois, has_image`` bool ``[B]``; ``image_coverage`` float32 ``[B]``; ``num_pois`` int64 ``[B]``;
    ``cell_ids`` list of str; ``labels`` dict task -> float32 ``[B]`` (NaN where a region has none).
    """
    import torch

    if not encoded:
        raise InputError("collate: got an empty list of regions; nothing to batch")
    b = len(encoded)
    lengths = np.array([e.num_tokens for e in encoded], dtype=np.int64)
    longest = int(lengths.max())
    if pad_to_length is not None:
        if pad_to_length < longest:
            raise InputError(f"collate: pad_to_length {pad_to_length} is shorter than the longest region "
                             f"({longest} tokens); raise it or lower the featurizer's max_poi_tokens")
        width = int(pad_to_length)
    else:
        m = max(1, int(pad_to_multiple))
        width = -(-longest // m) * m

    pad_fill = {"token_ids": pad_token_id, "grid_pos": grid_cells * grid_cells + 1, "category_ids": category_pad_id}
    out = {key: np.empty((b, width), dtype=np.int64)
           for key in ("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids")}
    pad_run = np.arange(width, dtype=np.int64)
    for row, e in enumerate(encoded):
        n = e.num_tokens
        for key, arr in out.items():
            arr[row, :n] = getattr(e, key)
        for key, value in pad_fill.items():
            out[key][row, n:] = value
        out["word_pos"][row, n:] = pad_run[: width - n]
        out["poi_pos"][row, n:] = e.num_pois + 1
    batch = {key: torch.from_numpy(arr) for key, arr in out.items()}
    batch["poi_mask"] = torch.from_numpy(pad_run[None, :] < lengths[:, None])

    images = torch.zeros((b, 3, image_size, image_size), dtype=torch.uint8)
    for row, e in enumerate(encoded):
        if e.image is not None:
            images[row] = _resize_chw(torch.from_numpy(np.ascontiguousarray(e.image)), image_size)
    batch["image"] = images
    if any(e.image_valid is not None for e in encoded):
        valid = torch.ones((b, image_size, image_size), dtype=torch.bool)
        for row, e in enumerate(encoded):
            if e.image_valid is not None:
                valid[row] = _resize_mask(torch.from_numpy(np.ascontiguousarray(e.image_valid)), image_size)
        batch["image_valid"] = valid
    batch["has_pois"] = torch.tensor([bool(e.has_pois) for e in encoded], dtype=torch.bool)
    batch["has_image"] = torch.tensor([bool(e.has_image) for e in encoded], dtype=torch.bool)
    batch["image_coverage"] = torch.tensor([float(e.image_coverage) for e in encoded], dtype=torch.float32)
    batch["num_pois"] = torch.tensor([int(e.num_pois) for e in encoded], dtype=torch.int64)
    batch["cell_ids"] = [e.cell_id for e in encoded]
    tasks = sorted({t for e in encoded for t in (e.labels or {})})
    batch["labels"] = {t: torch.tensor([float((e.labels or {}).get(t, float("nan"))) for e in encoded],
                                       dtype=torch.float32) for t in tasks}
    return batch


def _resize_chw(img, size: int):
    """uint8 [3, H, W] -> uint8 [3, size, size]; a no-op when it already has that size."""
    import torch
    import torch.nn.functional as F

    if img.shape[-2:] == (size, size):
        return img
    x = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def _resize_mask(mask, size: int):
    """bool [H, W] -> bool [size, size] (nearest neighbour; a no-op at that size)."""
    import torch.nn.functional as F

    if mask.shape == (size, size):
        return mask
    return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0.5


def length_bucketed_batches(lengths, batch_size: int, shuffle: bool = False,
                            rng: Optional[np.random.Generator] = None, pool_batches: int = 50,
                            drop_last: bool = False) -> list:
    """Batches of indices that group regions of similar POI-sequence length (less padding).

    ``shuffle=False`` (inference): sort by length, longest first (a memory problem shows up on
    the first batch), and cut into batches. ``shuffle=True`` (training): shuffle, sort inside
    pools of ``pool_batches * batch_size`` regions, cut, then shuffle the batch order; ``rng`` is
    required so an epoch is reproducible from its seed.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    n = lengths.shape[0]
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    else:
        if rng is None:
            raise InputError("length_bucketed_batches: shuffle=True needs an rng (np.random.default_rng(seed))")
        perm = rng.permutation(n)
        pool = max(1, int(pool_batches)) * batch_size
        batches = []
        for p in range(0, n, pool):
            chunk = perm[p:p + pool]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + batch_size] for i in range(0, chunk.shape[0], batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
    if drop_last:
        batches = [bt for bt in batches if bt.shape[0] == batch_size]
    return [bt.astype(np.int64).tolist() for bt in batches]
