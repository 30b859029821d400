"""A tiny labelled region dataset and a tiny ReFound checkpoint, built in-test (seeded)."""
from pathlib import Path

import numpy as np

from refound_core.data.dataset import RegionDataset, RegionDatasetWriter
from refound_core.data.sample import RegionSample

CATS = ["eatery", "rental", "office", "park"]


def make_dataset(folder: Path, n: int = 36, image_size: int = 64, seed: int = 0) -> RegionDataset:
    """Cells whose labels depend on both modalities: urban_village = many eateries AND a bright
    (dense-roof) image; population grows with rentals and brightness."""
    rng = np.random.default_rng(seed)
    with RegionDatasetWriter(folder, crs="EPSG:32650", cell_size=256.0, image_size=image_size,
                             poi_value_fields=["reviews"], label_names=["urban_village", "population", "commercial"],
                             provenance={"kind": "synthetic test fixture", "seed": seed}) as w:
        for i in range(n):
            col, row = i % 6, i // 6
            x0, y0 = col * 256.0, row * 256.0
            k = int(rng.integers(0, 12))
            cats = list(rng.choice(CATS, size=k, p=[0.4, 0.3, 0.2, 0.1])) if k else []
            names = [f"{c} {j}" for j, c in enumerate(cats)]
            xy = np.stack([x0 + rng.uniform(0, 256, k), y0 + rng.uniform(0, 256, k)], axis=1) if k else np.zeros((0, 2))
            bright = float(rng.uniform(0, 1))
            img = (rng.uniform(0, 60, (image_size, image_size, 3)) + 180 * bright).astype(np.uint8) if i % 9 else None
            eateries = sum(c == "eatery" for c in cats)
            rentals = sum(c == "rental" for c in cats)
            reviews = rng.integers(0, 50, k).astype(float)
            labels = {"urban_village": float(eateries >= 2 and bright > 0.4),
                      "population": float(100 * rentals + 300 * bright),
                      "commercial": float(reviews.sum())}
            w.add(RegionSample(cell_id=f"EPSG:32650/256/{col}_{row}", bounds=(x0, y0, x0 + 256, y0 + 256),
                               crs="EPSG:32650", poi_names=names, poi_categories=cats, poi_xy=xy,
                               image=img, image_coverage=1.0 if img is not None else 0.0, labels=labels,
                               poi_values={"reviews": reviews}))
    return RegionDataset(folder)


def make_checkpoint(folder: Path, ds: RegionDataset, seed: int = 0) -> Path:
    import torch

    from refound_core.model.checkpoint import save_checkpoint
    from refound_core.model.config import refound_tiny
    from refound_core.model.refound import ReFound

    torch.manual_seed(seed)
    tok, vocab = ds.load_tokenizer(), ds.load_vocab()
    cfg = refound_tiny(vocab_size=len(tok), num_categories=len(vocab), image_size=ds.image_size)
    return save_checkpoint(folder, ReFound(cfg), tokenizer_dir=ds.tokenizer_path, category_vocab=ds.vocab_path,
                           provenance={"training_data": "random init (test)"})
