"""A small seeded region dataset with a stub-teacher cache, for the pre-training tests.

Regions are 256 m cells with 0-6 POIs named from a small word list (names and categories go
together, so the POI side carries learnable signal) and 64 px chips whose colour follows the
dominant category. A few regions have no POIs, a few no image: every "missing modality" branch
of the losses runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CATEGORIES = ["food", "shop", "school", "bank", "park"]
WORDS = {"food": ["noodle", "cafe", "pizza", "grill"], "shop": ["market", "store", "mall", "books"],
         "school": ["school", "college", "academy", "kinder"], "bank": ["bank", "credit", "atm", "finance"],
         "park": ["park", "garden", "green", "lake"]}
COLOURS = {"food": (200, 60, 40), "shop": (60, 60, 200), "school": (220, 200, 40), "bank": (120, 120, 120),
           "park": (40, 160, 60)}


def make_samples(n: int = 40, image_size: int = 64, seed: int = 0) -> list:
    from refound_core.data.sample import RegionSample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x0, y0 = 1000.0 + 256.0 * (i % 8), 5000.0 + 256.0 * (i // 8)
        k = 0 if i % 11 == 3 else int(rng.integers(1, 7))
        main = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        cats = [main if rng.random() < 0.7 else CATEGORIES[int(rng.integers(len(CATEGORIES)))] for _ in range(k)]
        names = [f"{rng.choice(WORDS[c])} {rng.choice(WORDS[c])}" for c in cats]
        xy = np.column_stack([x0 + rng.uniform(1, 255, k), y0 + rng.uniform(1, 255, k)]) if k else np.zeros((0, 2))
        if i % 13 == 5:
            image, coverage = None, 0.0
        else:
            image = np.empty((image_size, image_size, 3), np.uint8)
            image[:] = COLOURS[main]
            image = np.clip(image.astype(np.int16) + rng.integers(-30, 30, image.shape), 0, 255).astype(np.uint8)
            for (px, py) in xy:  # a bright dot at each POI: patches carry local structure
                c, r = int((px - x0) / 256 * image_size), int((y0 + 256 - py) / 256 * image_size)
                image[max(0, r - 2):r + 2, max(0, c - 2):c + 2] = 255
            coverage = 1.0
        out.append(RegionSample(cell_id=f"EPSG:32650/256/{i % 8}_{i // 8}", bounds=(x0, y0, x0 + 256, y0 + 256),
                                crs="EPSG:32650", poi_names=names, poi_categories=cats, poi_xy=xy, image=image,
                                image_coverage=coverage))
    return out


def build_dataset(folder, n: int = 40, image_size: int = 64, patches_per_side: int = 4, seed: int = 0) -> Path:
    """Write the dataset and its stub teacher cache; returns the dataset folder."""
    from refound_core.data.dataset import RegionDataset, RegionDatasetWriter
    from refound_core.teachers.cache import TeacherCache
    from refound_core.teachers.stubs import stub_teachers

    folder = Path(folder)
    with RegionDatasetWriter(folder, crs="EPSG:32650", cell_size=256.0, image_size=image_size) as writer:
        for s in make_samples(n, image_size, seed):
            writer.add(s)
    TeacherCache(folder).get_or_compute(RegionDataset(folder), stub_teachers(codebook_size=8, seed=seed),
                                        patches_per_side=patches_per_side, progress=False)
    return folder
