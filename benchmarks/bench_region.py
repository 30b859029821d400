#!/usr/bin/env python
"""Whole-region benchmark (issue 17; run on request, not a test): one ``refound predict`` command
over a synthetic square city, the default 32 x 32 km = 16,384 cells of 256 m, with a random-init
``refound_small`` checkpoint, on the CPU threads given (default 2). Reports wall time, cells/s and
peak RSS of the run at 1x cells (a quarter of the area) and 4x cells (the whole area), each in a
fresh process (peak RSS from the run's own summary), and the 4x/1x peak-RSS ratio (target <= 1.2:
memory flat in the number of cells, because every shard reads only its own POIs and windows).

The city is generated here (seeded; ``generate_city`` stops at 20 km): clustered POIs (one
GeoPackage with a spatial index) and an RGB GeoTIFF (tiled, 8 m pixels, so the raster stays small;
chips are resampled to the model's 256 px as for any raster).

Usage::

    nice .venv/bin/python benchmarks/bench_region.py                 # 16,384 cells, 2 threads
    nice .venv/bin/python benchmarks/bench_region.py --km 8          # a smaller run (1,024 cells)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CRS = "EPSG:32650"
X0, Y0 = 500_000.0, 3_000_000.0
CATS = ["amenity=cafe", "shop=bakery", "amenity=school", "leisure=park", "shop=supermarket", "amenity=restaurant"]
WORDS = ["central", "market", "cafe", "school", "park", "bakery", "hotel", "river", "north", "garden"]


def make_city(folder: Path, km: float, pois_per_km2: int, seed: int = 0) -> dict:
    import geopandas as gpd
    import rasterio
    import shapely
    from rasterio.transform import from_bounds

    folder.mkdir(parents=True, exist_ok=True)
    side = km * 1000
    tif, gpkg = folder / "imagery.tif", folder / "pois.gpkg"
    if not tif.exists():
        rng = np.random.default_rng(seed)
        px = int(side / 8)
        with rasterio.open(tif, "w", driver="GTiff", width=px, height=px, count=3, dtype="uint8", crs=CRS,
                           tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                           transform=from_bounds(X0, Y0, X0 + side, Y0 + side, px, px)) as dst:
            for r0 in range(0, px, 512):
                h = min(512, px - r0)
                dst.write(rng.integers(0, 255, size=(3, h, px), dtype=np.uint8),
                          window=rasterio.windows.Window(0, r0, px, h))
    if not gpkg.exists():
        rng = np.random.default_rng(seed + 1)
        n = int(pois_per_km2 * km * km)
        centres = rng.uniform(0, side, size=(max(1, int(km * km / 4)), 2))
        pick = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 600, size=(n, 2))
        pick = np.clip(pick, 1, side - 1)
        names = [" ".join(rng.choice(WORDS, size=rng.integers(1, 4))) for _ in range(n)]
        gpd.GeoDataFrame({"name": names, "category": [CATS[i % len(CATS)] for i in range(n)]},
                         geometry=shapely.points(X0 + pick[:, 0], Y0 + pick[:, 1]), crs=CRS).to_file(gpkg)
    return {"tif": tif, "gpkg": gpkg, "side": side}


def make_checkpoint(folder: Path) -> Path:
    path = folder / "refound_small_uv"
    if (path / "config.json").exists():
        return path
    import torch

    from refound_core.data.tokenizer import PoiTokenizer
    from refound_core.data.vocab import CategoryVocab
    from refound_core.model.checkpoint import save_checkpoint
    from refound_core.model.config import refound_small
    from refound_core.model.heads import TaskHead
    from refound_core.model.refound import ReFound

    torch.manual_seed(0)
    tok = PoiTokenizer.default()
    vocab = CategoryVocab.build(CATS)
    cfg = refound_small(vocab_size=len(tok), num_categories=len(vocab))
    tok.save(folder / "tok")
    save_checkpoint(path, ReFound(cfg).eval(), TaskHead(cfg.hidden_size, kind="binary").eval(),
                    task={"name": "urban_village", "kind": "binary"}, tokenizer_dir=folder / "tok",
                    category_vocab=vocab)
    return path


def run_one(ckpt, city, side, out: Path, threads: int) -> dict:
    ext = f"{X0},{Y0},{X0 + side},{Y0 + side},{CRS}"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "training.cli", "predict", "--quiet", "--overwrite", "--fresh", "--device", "cpu",
           "--checkpoint", ckpt, "--pois", city["gpkg"], "--imagery", city["tif"], "--extent", ext, "--out", out]
    t0 = time.perf_counter()
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    cells = int(re.search(r": (\d+) cells", res.stdout).group(1))
    rss = float(re.search(r"peak RSS (\d+) MB", res.stdout).group(1))
    return {"cells": cells, "wall_s": round(wall, 1), "cells_per_s": round(cells / wall, 2), "peak_rss_mb": rss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--km", type=float, default=32.0, help="side of the square city in km (default 32: 16,384 cells)")
    p.add_argument("--pois-per-km2", type=int, default=60, help="POI density (default 60 per km2)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS, default 2)")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "results" / "region_work"), help="work folder")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "region.json"), help="result JSON")
    args = p.parse_args(argv)
    work = Path(args.work)
    city = make_city(work / f"city_{args.km:g}km", args.km, args.pois_per_km2)
    ckpt = make_checkpoint(work)
    rows = {}
    for label, side in (("1x", city["side"] / 2), ("4x", city["side"])):
        rows[label] = run_one(ckpt, city, side, work / f"region_{label}.gpkg", args.threads)
        print(label, rows[label], flush=True)
    ratio = rows["4x"]["peak_rss_mb"] / rows["1x"]["peak_rss_mb"]
    result = {"km": args.km, "threads": args.threads, "model": "refound_small (random init)", "runs": rows,
              "rss_ratio_4x_1x": round(ratio, 3), "load": os.getloadavg()}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
