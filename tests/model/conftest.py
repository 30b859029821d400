"""Shared fixtures of the model tests: the official golden fixture and random collate-style batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refound_core.model.config import refound_tiny
from refound_core.model.refound import ReFound

OFFICIAL_INPUT_KEYS = ("poi_name_token_ids", "word_level_pos_ids", "poi_level_pos_ids", "grid_level_pos_ids",
                       "poi_cate_ids", "attn_mask_poi", "img")


def random_batch(cfg, batch: int = 4, num_pois=(3, 0, 5, 2), seed: int = 0, with_image=True) -> dict:
    """A batch dict shaped like ``refound_core.data.collate``'s output, built from random POIs.

    Every POI has 1-3 name tokens plus a [SEP]; the batch is padded to its longest sequence."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        k = num_pois[b % len(num_pois)]
        tok, wp, pp, gp, cat = [101], [0], [0], [0], [0]
        for j in range(1, k + 1):
            n = int(torch.randint(1, 4, (1,), generator=g))
            cell = int(torch.randint(1, cfg.grid_cells ** 2 + 1, (1,), generator=g))
            c = int(torch.randint(2, cfg.num_categories, (1,), generator=g))
            ids = torch.randint(104, cfg.vocab_size, (n,), generator=g).tolist() + [102]
            tok += ids
            wp += list(range(n + 1))
            pp += [j] * (n + 1)
            gp += [cell] * (n + 1)
            cat += [c] * (n + 1)
        rows.append((tok, wp, pp, gp, cat))
    lp = max(len(r[0]) for r in rows)
    out = {k: torch.zeros(batch, lp, dtype=torch.long) for k in ("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids")}
    out["poi_mask"] = torch.zeros(batch, lp, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(r[0])
        for key, vals in zip(("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids"), r):
            out[key][b, :n] = torch.tensor(vals)
        out["poi_mask"][b, :n] = True
        out["grid_pos"][b, n:] = cfg.grid_cells ** 2 + 1
    s = cfg.image_size
    out["image"] = torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8)
    out["has_pois"] = torch.tensor([num_pois[b % len(num_pois)] > 0 for b in range(batch)])
    out["has_image"] = torch.full((batch,), bool(with_image))
    out["image_coverage"] = out["has_image"].float()
    out["cell_ids"] = [f"cell_{b}" for b in range(batch)]
    return out


@pytest.fixture(scope="session")
def official(parity_dir):
    """(inputs as tensors in our argument names, outputs as numpy arrays)."""
    raw = np.load(parity_dir / "official_tiny_inputs.npz")
    t = {k: torch.from_numpy(raw[k]) for k in OFFICIAL_INPUT_KEYS}
    inputs = dict(token_ids=t["poi_name_token_ids"], word_pos=t["word_level_pos_ids"], poi_pos=t["poi_level_pos_ids"],
                  grid_pos=t["grid_level_pos_ids"], category_ids=t["poi_cate_ids"], poi_mask=t["attn_mask_poi"].bool(),
                  image=t["img"])
    outputs = dict(np.load(parity_dir / "official_tiny_outputs.npz"))
    return inputs, outputs


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return ReFound(refound_tiny(vocab_size=400, num_categories=12)).eval()


@pytest.fixture
def make_batch():
    """``make_batch(cfg, batch=4, num_pois=(3, 0, 5, 2), seed=0, with_image=True)`` -> collate-style dict."""
    return random_batch
