"""Shared by tests/inference and tests/backend: a tiny random checkpoint and a small synthetic city
(an RGB GeoTIFF and a GeoPackage of POIs), generated with fixed seeds."""
from __future__ import annotations

import numpy as np

CRS = "EPSG:32650"
CELL = 256.0
# Extent covering cells col 1953..1957 x row 11718..11722 (5 x 5 = 25 cells of 256 m).
EXTENT = (500000.0, 3000000.0, 501000.0, 3001000.0)
COLS, ROWS = range(1953, 1958), range(11718, 11723)
# The raster covers exactly cells col 1953..1954 x row 11718..11719 (4 cells).
RASTER_BOUNDS = (1953 * CELL, 11718 * CELL, 1955 * CELL, 11720 * CELL)
# POIs sit in these cells (col, row): one shared with the raster, the others without imagery.
POI_CELLS = [(1953, 11718), (1956, 11721), (1957, 11722), (1955, 11722), (1957, 11719)]
CATEGORIES = ["amenity=cafe", "shop=bakery", "amenity=school", "leisure=park"]
WORDS = ["central", "market", "cafe", "school", "park", "bakery", "hotel", "river", "north", "garden"]


def expected_sufficient_cells() -> set:
    raster = {(c, r) for c in (1953, 1954) for r in (11718, 11719)}
    return raster | set(POI_CELLS)


def build_tiny_checkpoint(path, task="urban_village", kind="binary", fusion="attention", seed=0, target=None):
    import torch

    from refound_core.data.tokenizer import PoiTokenizer
    from refound_core.data.vocab import CategoryVocab
    from refound_core.model.checkpoint import save_checkpoint
    from refound_core.model.config import refound_tiny
    from refound_core.model.heads import TaskHead
    from refound_core.model.refound import ReFound

    torch.manual_seed(seed)
    tok = PoiTokenizer.default()
    vocab = CategoryVocab.build(CATEGORIES)
    cfg = refound_tiny(vocab_size=len(tok), num_categories=len(vocab))
    model = ReFound(cfg).eval()
    head = None if task is None else TaskHead(cfg.hidden_size, kind=kind, fusion=fusion).eval()
    if head is not None:  # a random head's outputs barely vary; widen them so tests can tell cells apart
        with torch.no_grad():
            head.mlp.fc2.weight.mul_(200.0)
    tok_dir = path.parent / f"{path.name}_tok"
    tok.save(tok_dir)
    meta = None if task is None else {"name": task, "kind": kind, **(target or {})}
    save_checkpoint(path, model, head, task=meta, tokenizer_dir=tok_dir, category_vocab=vocab)
    return path


def make_city(folder):
    """``{"tif", "gpkg", "n_pois"}``: a 2 m RGB GeoTIFF and 30 POIs in EPSG:32650."""
    import geopandas as gpd
    import rasterio
    import shapely
    from rasterio.transform import from_bounds

    rng = np.random.default_rng(7)
    xmin, ymin, xmax, ymax = RASTER_BOUNDS
    w = h = int((xmax - xmin) / 2)
    data = rng.integers(0, 255, size=(3, h, w), dtype=np.uint8)
    tif = folder / "city.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=CRS,
                       transform=from_bounds(xmin, ymin, xmax, ymax, w, h)) as dst:
        dst.write(data)
    rows = []
    for k in range(30):
        c, r = POI_CELLS[k % len(POI_CELLS)]
        x = c * CELL + rng.uniform(5, CELL - 5)
        y = r * CELL + rng.uniform(5, CELL - 5)
        name = " ".join(rng.choice(WORDS, size=rng.integers(1, 4)))
        rows.append({"name": name, "category": CATEGORIES[k % len(CATEGORIES)], "geometry": shapely.Point(x, y)})
    gpkg = folder / "pois.gpkg"
    gpd.GeoDataFrame(rows, crs=CRS).to_file(gpkg, driver="GPKG")
    return {"tif": tif, "gpkg": gpkg, "n_pois": len(rows), "folder": folder}
