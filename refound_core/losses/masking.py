"""Input corruption for Masked Geospatial Data Modeling (paper 4.2.2, A.2.1).

Two small pure functions, both driven by an explicit ``torch.Generator`` so that a batch's masks
depend only on the seed handed to them (the data pipeline seeds it from (run seed, epoch, sample
index), which makes masks independent of worker count and reproducible after ``--resume``):

* :func:`mask_poi_tokens` - BERT-style masking of POI *name* tokens: 15% of them are chosen;
  of those, 80% become [M] (id 103), 10% a random regular token, 10% stay unchanged. [P]/CLS,
  [SEP] and [PAD] are never chosen. Only ``token_ids`` change: the geo-aware position ids
  (word / POI / grid level) and the category ids are left as they are (paper 4.2.2: "we only
  mask POI names and satellite image patches, while keeping the geo-aware position embedding
  unchanged").
* :func:`blockwise_patch_mask` - BEiT's blockwise masking of 40% of the image patches.
"""
from __future__ import annotations

import math
import random
from typing import Iterable, Optional

import torch

# bert-base-{chinese,uncased} special ids, which the project's tokenizer keeps (SEMANTICS.md 2.3).
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103


def _random_regular_ids(shape, vocab_size: int, special_ids: torch.Tensor, generator) -> torch.Tensor:
    """Uniform draws over ``[0, vocab_size)`` minus ``special_ids`` (sorted, unique).

    Draw in the reduced range, then shift each draw past every special id at or below it: an
    exact uniform over the regular ids without rejection loops.
    """
    n_regular = vocab_size - int(special_ids.numel())
    if n_regular <= 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no regular token besides the special ids")
    ids = torch.randint(0, n_regular, shape, generator=generator, dtype=torch.int64)
    for s in special_ids.tolist():  # ascending: each shift can push past the next special
        ids += (ids >= s).to(torch.int64)
    return ids


def mask_poi_tokens(token_ids: torch.Tensor, poi_mask: torch.Tensor, generator: torch.Generator, *,
                    vocab_size: int, mask_ratio: float = 0.15, mask_token_prob: float = 0.8,
                    random_token_prob: float = 0.1, mask_id: int = MASK_ID,
                    special_ids: Iterable[int] = (PAD_ID, CLS_ID, SEP_ID, MASK_ID)):
    """Choose and corrupt POI name tokens for MGDM (paper 4.2.2 and A.2.1).

    Every name token is chosen independently with probability ``mask_ratio`` (BERT / Hugging
    Face convention), so the expected share is 15% and short regions may get none.

    Args:
        token_ids: ``int64 [B, Lp]``, [P] at position 0 (collate's layout).
        poi_mask: ``bool [B, Lp]``, True on real tokens (padding False).
        generator: CPU generator; all draws are full-shape so the result depends only on its state.
        vocab_size: size of the name vocabulary (random replacements are drawn from it).
        special_ids: ids that are never chosen and never drawn as random replacements.

    Returns:
        ``(corrupted int64 [B, Lp], masked bool [B, Lp])``: ``masked`` marks M_P, the positions
        whose original id the MGDM head must predict (also those left unchanged).
    """
    if token_ids.dim() != 2 or token_ids.shape != poi_mask.shape:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} and poi_mask {tuple(poi_mask.shape)} must be equal [B, Lp]")
    specials = torch.tensor(sorted(set(int(s) for s in special_ids)), dtype=torch.int64)
    candidates = poi_mask.bool() & ~torch.isin(token_ids, specials)
    candidates[:, 0] = False  # the [P] slot, whatever id it holds
    shape = tuple(token_ids.shape)
    chosen = (torch.rand(shape, generator=generator) < mask_ratio) & candidates
    how = torch.rand(shape, generator=generator)
    to_mask = chosen & (how < mask_token_prob)
    to_random = chosen & (how >= mask_token_prob) & (how < mask_token_prob + random_token_prob)
    random_ids = _random_regular_ids(shape, vocab_size, specials, generator)
    out = token_ids.clone()
    out[to_mask] = mask_id
    out[to_random] = random_ids[to_random]
    return out, chosen


def _one_block_mask(side: int, num_masking: int, rng: random.Random, min_block: int,
                    log_aspect: tuple) -> torch.Tensor:
    """BEiT's ``MaskingGenerator`` for one image: place random rectangles until ``num_masking``
    patches are masked or ten placements in a row fail; then top up with single random patches.

    The top-up is our addition (BEiT leaves the last few patches unmasked when no block fits):
    every image then has exactly ``num_masking`` masked patches, so the MGDM image term weighs
    every image the same.
    """
    mask = torch.zeros(side, side, dtype=torch.bool)
    count = 0
    while count < num_masking:
        budget = num_masking - count
        delta = 0
        for _ in range(10):
            target = rng.uniform(min(min_block, budget), budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < side and 0 < w < side:
                top, left = rng.randint(0, side - h), rng.randint(0, side - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    if count < num_masking:
        free = (~mask).flatten().nonzero().flatten().tolist()
        for idx in rng.sample(free, num_masking - count):
            mask.view(-1)[idx] = True
    return mask.flatten()


def blockwise_patch_mask(batch_size: int, patches_per_side: int, generator: torch.Generator, *,
                         mask_ratio: float = 0.4, min_block_patches: int = 16, min_aspect: float = 0.3,
                         max_aspect: Optional[float] = None, has_image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BEiT blockwise masking of ``mask_ratio`` of the patches (paper 4.2.2: 40%).

    Args:
        batch_size, patches_per_side: mask shape is ``[batch_size, patches_per_side**2]``, row-major.
        generator: one seed per image is drawn from it, then a ``random.Random`` places the blocks
            (the scalar draws of the rectangle loop are much cheaper in pure Python than as tensors).
        min_block_patches, min_aspect, max_aspect: BEiT's block shape limits (16, 0.3, 1/0.3).
        has_image: optional ``bool [B]``; images that are missing get no masked patch.

    Returns:
        ``bool [B, N]``, True = patch replaced by the mask embedding (the set M_S); each image with
        ``has_image`` has exactly ``round(mask_ratio * N)`` True entries.
    """
    n = patches_per_side * patches_per_side
    num_masking = int(round(mask_ratio * n))
    max_aspect = max_aspect or 1.0 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    seeds = torch.randint(0, 2 ** 62, (batch_size,), generator=generator, dtype=torch.int64).tolist()
    out = torch.zeros(batch_size, n, dtype=torch.bool)
    for b, seed in enumerate(seeds):
        if has_image is not None and not bool(has_image[b]):
            continue
        if num_masking > 0:
            out[b] = _one_block_mask(patches_per_side, num_masking, random.Random(seed), min_block_patches, log_aspect)
    return out
