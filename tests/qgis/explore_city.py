"""A synthetic city, its twin changed in one known block, and their region embeddings written by
the real ``refound embed`` path with a small untrained ReFound (shared by the Explore tests).

Ground truth comes from the generator's own files: urban-village polygons (a cell is an urban
village when at least half of it lies in one) and district polygons (a cell's land use is the
district kind covering most of it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

SEED, SIZE_KM, CELL = 3, 2.56, 256
# the changed block of the twin city: pixel rows/cols 512..1280 = cells 2..4 x 2..4 from the top-left
BLOCK = (512, 1280)
SOURCE = (1536, 2304)  # its new content is copied from this block (another part of the city)


def tiny_backbone(root: Path, categories) -> Path:
    import torch

    from refound_core.data.tokenizer import PoiTokenizer
    from refound_core.data.vocab import CategoryVocab
    from refound_core.model.checkpoint import save_checkpoint
    from refound_core.model.config import refound_tiny
    from refound_core.model.refound import ReFound

    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = PoiTokenizer(tokens + list("abcdefghijklmnopqrstuvwxyz"))
    tok.save(root / "tokenizer")
    vocab = CategoryVocab.build(categories)
    cfg = refound_tiny(vocab_size=len(tok), num_categories=len(vocab))
    torch.manual_seed(0)
    return save_checkpoint(root / "backbone", ReFound(cfg).eval(), None, tokenizer_dir=root / "tokenizer",
                           category_vocab=vocab)


def make_twin(city: Path, twin: Path) -> None:
    """Copy ``city`` and replace one block's imagery and POIs with another block's (nothing else changes)."""
    import geopandas as gpd
    import rasterio

    shutil.copytree(city, twin)
    meta = json.loads((city / "meta.json").read_text())
    ox, oy = meta["origin_x"], meta["origin_y"]
    (a, b), (s, t) = BLOCK, SOURCE
    with rasterio.open(twin / "imagery.tif", "r+") as ds:
        src = ds.read(window=((s, t), (s, t)))
        ds.write(src, window=((a, b), (a, b)))
    pois = gpd.read_file(city / "pois.gpkg", layer="pois")
    x, y = pois.geometry.x, pois.geometry.y
    in_block = (x >= ox + a) & (x < ox + b) & (y <= oy - a) & (y > oy - b)
    in_src = (x >= ox + s) & (x < ox + t) & (y <= oy - s) & (y > oy - t)
    moved = pois[in_src].copy()
    moved.geometry = moved.geometry.translate(a - s, s - a)
    out = gpd.GeoDataFrame(pd_concat([pois[~in_block], moved]), crs=pois.crs)
    (twin / "pois.gpkg").unlink()
    out.to_file(twin / "pois.gpkg", layer="pois", driver="GPKG", engine="pyogrio", dataset_options={"VERSION": "1.2"})


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def embed(city: Path, checkpoint: Path, out: Path) -> Path:
    from training.cli import main

    meta = json.loads((city / "meta.json").read_text())
    ox, oy, size = meta["origin_x"], meta["origin_y"], meta["size_px"] if "size_px" in meta else 2560
    extent = f"{ox},{oy - size},{ox + size},{oy},{meta['crs']}"
    rc = main(["embed", "--checkpoint", str(checkpoint), "--pois", str(city / "pois.gpkg"), "--imagery",
               str(city / "imagery.tif"), "--extent", extent, "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    return out


def changed_cells(city: Path) -> set:
    meta = json.loads((city / "meta.json").read_text())
    c0, r0 = int(meta["origin_x"]) // CELL, int(meta["origin_y"]) // CELL
    lo, hi = BLOCK[0] // CELL, BLOCK[1] // CELL
    return {f"{meta['crs']}/{CELL}/{c0 + c}_{r0 - 1 - r}" for c in range(lo, hi) for r in range(lo, hi)}


def truth(city: Path, wkb) -> tuple:
    """(is_urban_village bool [n], land-use kind [n]) of cells given as WKB polygons."""
    import geopandas as gpd
    import shapely

    cells = shapely.from_wkb(np.asarray(wkb, dtype=object))
    uv = gpd.read_file(city / "urban_villages.gpkg").geometry.union_all()
    is_uv = shapely.area(shapely.intersection(cells, uv)) / shapely.area(cells) >= 0.5
    d = gpd.read_file(city / "districts.gpkg")
    kinds = np.array([d["kind"].iloc[int(np.argmax(d.geometry.intersection(c).area.to_numpy()))] for c in cells])
    return is_uv, kinds


def build(root: Path) -> dict:
    from refound_core.data.synthcity import generate_city

    city, twin = root / "city", root / "twin"
    generate_city(city, SEED, SIZE_KM)
    make_twin(city, twin)
    ckpt = tiny_backbone(root / "ckpt", json.loads((city / "meta.json").read_text())["poi_categories"])
    return {"city": city, "twin": twin, "checkpoint": ckpt,
            "emb": embed(city, ckpt, root / "city.parquet"), "twin_emb": embed(twin, ckpt, root / "twin.parquet"),
            "changed": changed_cells(city)}
