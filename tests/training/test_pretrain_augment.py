"""Photometric augmentation of the student's image (training/pretrain/augment.py)."""
from __future__ import annotations

import numpy as np

from training.pretrain.augment import photometric_jitter


def _two_tone(h=16, w=16):
    img = np.zeros((3, h, w), np.uint8)
    img[:, :, : w // 2] = 40  # a dark grey left half ...
    img[0, :, w // 2:], img[1, :, w // 2:], img[2, :, w // 2:] = 200, 180, 160  # ... and a bright right one
    return img


def test_strength_zero_returns_the_image_unchanged():
    img = _two_tone()
    assert photometric_jitter(img, np.random.default_rng(0), 0.0) is img


def test_jitter_recolours_but_keeps_every_pixel_in_place():
    img = _two_tone()
    outs = [photometric_jitter(img, np.random.default_rng(seed), 1.0) for seed in range(8)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, img) for o in outs) == 8  # every draw changes the colours
    assert len({o.tobytes() for o in outs}) == 8  # and each draw differently
    for o in outs:
        grey = o.astype(np.float32).mean(0)
        # geometry unchanged: each half stays uniform and the bright half stays brighter, the edge
        # between them where it was (per-patch teacher targets and CMSA labels stay aligned)
        assert np.ptp(grey[:, :8]) == 0 and np.ptp(grey[:, 8:]) == 0
        assert grey[0, 8] > grey[0, 7]


def test_the_same_rng_state_gives_the_same_jitter():
    img = _two_tone()
    a = photometric_jitter(img, np.random.default_rng(42), 1.0)
    b = photometric_jitter(img, np.random.default_rng(42), 1.0)
    assert np.array_equal(a, b)


def test_pretrain_dataset_jitters_per_seed_epoch_and_index(pretrain_ds):
    from refound_core.model.config import preset
    from training.pretrain.data import PretrainData, PretrainDataset

    mcfg = preset("tiny")
    data = PretrainData.open(pretrain_ds, mcfg.patches_per_side)
    fz = data.featurizer(mcfg.replace(vocab_size=data.vocab_size, num_categories=data.num_categories))
    plain, aug, aug2 = (PretrainDataset(data, fz, seed=0, photometric_aug=s) for s in (0.0, 1.0, 1.0))
    i = next(k for k in range(len(plain)) if plain[k][1].image is not None)
    clean = plain[i][1].image
    first = aug[i][1].image
    assert not np.array_equal(first, clean)
    assert np.array_equal(aug2[i][1].image, first)  # reproducible: a function of (seed, epoch, index)
    aug2.set_epoch(1)
    assert not np.array_equal(aug2[i][1].image, first)  # a new draw each epoch
    assert np.array_equal(aug[i][2]["u_S"], plain[i][2]["u_S"])  # teacher targets: the clean image's
