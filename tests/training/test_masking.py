"""MGDM masking rules (paper 4.2.2, A.2.1) and CMSA labels from a hand-made example (Eq. 7)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refound_core.losses.cmsa import cmsa_targets
from refound_core.losses.masking import blockwise_patch_mask, mask_poi_tokens

PAD, CLS, SEP, MASK = 0, 101, 102, 103
VOCAB = 1000


def _sequences(b=2048, length=64, seed=0):
    """[P] name... [SEP] name... [SEP] ... [PAD]...: realistic layout of collate's token_ids."""
    rng = np.random.default_rng(seed)
    tokens = np.full((b, length), PAD, dtype=np.int64)
    mask = np.zeros((b, length), dtype=bool)
    for r in range(b):
        n = int(rng.integers(length // 2, length + 1))
        row = rng.integers(104, VOCAB, n)
        row[0] = CLS
        seps = rng.choice(np.arange(2, n), size=max(1, n // 5), replace=False)
        row[seps] = SEP
        tokens[r, :n] = row
        mask[r, :n] = True
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def test_poi_masking_never_touches_cls_sep_pad_and_hits_15_percent_with_80_10_10():
    tokens, poi_mask = _sequences()
    g = torch.Generator().manual_seed(0)
    out, chosen = mask_poi_tokens(tokens, poi_mask, g, vocab_size=VOCAB)
    name = poi_mask & (tokens != CLS) & (tokens != SEP) & (tokens != PAD)
    name[:, 0] = False
    assert not (chosen & ~name).any(), "only name tokens may be chosen"
    assert torch.equal(out[~chosen], tokens[~chosen]), "unchosen positions must stay as they are"
    n_name, n_chosen = int(name.sum()), int(chosen.sum())
    assert n_chosen / n_name == pytest.approx(0.15, abs=0.005)
    to_mask = chosen & (out == MASK)
    kept = chosen & (out == tokens)
    random = chosen & (out != MASK) & (out != tokens)
    assert int(to_mask.sum()) / n_chosen == pytest.approx(0.8, abs=0.02)
    assert int(kept.sum()) / n_chosen == pytest.approx(0.1, abs=0.015)
    assert int(random.sum()) / n_chosen == pytest.approx(0.1, abs=0.015)
    assert not torch.isin(out[random], torch.tensor([PAD, CLS, SEP, MASK])).any()
    assert int(out[random].min()) >= 0 and int(out[random].max()) < VOCAB


def test_poi_masking_is_a_function_of_the_generator_seed():
    tokens, poi_mask = _sequences(b=8)
    a = mask_poi_tokens(tokens, poi_mask, torch.Generator().manual_seed(5), vocab_size=VOCAB)
    b = mask_poi_tokens(tokens, poi_mask, torch.Generator().manual_seed(5), vocab_size=VOCAB)
    c = mask_poi_tokens(tokens, poi_mask, torch.Generator().manual_seed(6), vocab_size=VOCAB)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def _components(mask2d: np.ndarray) -> int:
    seen = np.zeros_like(mask2d)
    count = 0
    for r, c in zip(*np.nonzero(mask2d)):
        if seen[r, c]:
            continue
        count += 1
        stack = [(r, c)]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask2d.shape[0] and 0 <= x < mask2d.shape[1] and mask2d[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return count


def test_blockwise_patch_mask_masks_40_percent_in_blocks_and_skips_missing_images():
    side = 16
    has_image = torch.tensor([True] * 30 + [False, True])
    m = blockwise_patch_mask(32, side, torch.Generator().manual_seed(0), has_image=has_image)
    assert m.shape == (32, side * side) and m.dtype == torch.bool
    counts = m.sum(1)
    assert int(counts[30]) == 0
    assert (counts[has_image] == round(0.4 * side * side)).all()
    # BEiT blocks: the masked patches form a few large connected regions, not scattered patches
    comps = [_components(m[i].view(side, side).numpy()) for i in range(32) if has_image[i]]
    assert np.mean(comps) < 12, comps
    # a random (non-block) mask of the same size has many more components
    rng = np.random.default_rng(0)
    scattered = np.zeros(side * side, bool)
    scattered[rng.choice(side * side, 102, replace=False)] = True
    assert _components(scattered.reshape(side, side)) > 2 * np.mean(comps)


def test_blockwise_patch_mask_small_grids_and_determinism():
    a = blockwise_patch_mask(4, 4, torch.Generator().manual_seed(3))
    b = blockwise_patch_mask(4, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a.sum(1) == round(0.4 * 16)).all()
    assert (blockwise_patch_mask(2, 1, torch.Generator().manual_seed(0)).sum(1) == 0).all()  # round(0.4) = 0


def test_cmsa_labels_hand_example_grid_4_patches_2():
    # G = 4 sub-cells per side, P = 2 patches per side: sub-cell (gy, gx) -> patch (gy // 2, gx // 2).
    # Masked patches: NW (0) and SE (3).
    grid = torch.tensor([[0, 1, 1, 4, 4, 9, 9, 16, 16, 17],
                         [0, 6, 6, 11, 11, 17, 17, 17, 17, 17]])
    #     pos:           0  1  2  3  4  5  6   7   8   9
    # row 0: CLS | POI in cell 1 (gy0,gx0 -> patch 0, masked) + SEP | cell 4 (gy0,gx3 -> patch 1) + SEP |
    #        cell 9 (gy2,gx0 -> patch 2) + SEP | cell 16 (gy3,gx3 -> patch 3, masked) + SEP | padding
    # row 1: cell 6 (gy1,gx1 -> patch 0, masked), cell 11 (gy2,gx2 -> patch 3, masked), padding; no image
    poi_mask = grid != 17
    mlm = torch.zeros_like(poi_mask)
    mlm[0, 3] = True  # masked name token of the POI in cell 4: excluded (Eq. 7: i not in M_P)
    masked = torch.tensor([[True, False, False, True], [True, False, False, True]])
    labels, eligible = cmsa_targets(grid, poi_mask, mlm, masked, torch.tensor([True, False]), 4, 2)
    assert eligible[0].tolist() == [False, True, True, False, True, True, True, True, True, False]
    assert not eligible[1].any()  # no image: no CMSA
    want = [1, 1, 0, 0, 0, 0, 1, 1]
    got = labels[0][eligible[0]].tolist()
    assert got == [float(v) for i, v in enumerate(want) if i != 2]


def test_cmsa_labels_when_patches_are_finer_than_grid_cells():
    # G = 2, P = 4: each sub-cell covers 2 x 2 patches; positive when any of them is masked.
    grid = torch.tensor([[0, 1, 2, 3, 4]])
    masked = torch.zeros(1, 16, dtype=torch.bool)
    masked[0, 4 * 3 + 1] = True  # patch (3, 1): inside sub-cell (1, 0) = id 3
    labels, eligible = cmsa_targets(grid, torch.ones(1, 5, dtype=torch.bool), None, masked, torch.tensor([True]), 2, 4)
    assert labels[0, 1:].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert eligible[0].tolist() == [False, True, True, True, True]
