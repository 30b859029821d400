"""Explore at city scale: similarity search and PCA colouring of N cells x D-dim embeddings
(issue: 100,000 x 768 within 30 s on 2 cores, bounded memory).

Writes a synthetic embedding GeoParquet in the `refound embed` layout (clustered random vectors on a
square grid; not timed), then times, in one process limited to ``--threads`` BLAS threads:
read (into a float32 memmap) + similarity to a 5-cell query + top-k + GeoPackage output, and read +
PCA colours + GeoPackage output. Peak RSS is the process's maximum resident set (memmap pages
included).

Usage: ``python benchmarks/bench_explore.py [--cells 100000] [--dim 768] [--threads 2] [--work DIR]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def write_layer(path: Path, n: int, d: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyproj
    import shapely

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    col, row = np.arange(n) % side + 1000, np.arange(n) // side + 10000
    centres = rng.normal(size=(12, d)).astype(np.float32)
    which = rng.integers(0, 12, n)
    ids = pa.array([f"EPSG:32650/256/{c}_{r}" for c, r in zip(col, row)])
    geo = {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": {
        "encoding": "WKB", "geometry_types": ["Polygon"], "crs": pyproj.CRS("EPSG:32650").to_json_dict()}}}
    meta = {b"geo": json.dumps(geo).encode(), b"refound": json.dumps({"model": "bench", "grid_crs": "EPSG:32650"}).encode()}
    schema = pa.schema([("cell_id", pa.string()), ("fused", pa.list_(pa.float32(), d)), ("geometry", pa.binary())],
                       metadata=meta)
    with pq.ParquetWriter(str(path), schema) as w:
        for i in range(0, n, 8192):
            s = slice(i, min(n, i + 8192))
            k = s.stop - s.start
            vec = centres[which[s]] + 0.5 * rng.normal(size=(k, d)).astype(np.float32)
            g = shapely.to_wkb(shapely.box(col[s] * 256.0, row[s] * 256.0, col[s] * 256.0 + 256, row[s] * 256.0 + 256))
            w.write_table(pa.table([ids[s], pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), d),
                                    pa.array(list(g), pa.binary())], schema=schema))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bench_explore")
    args = ap.parse_args(argv)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import resource

    from refound_core.explore.colours import embedding_colours
    from refound_core.explore.io import read_embeddings, write_result
    from refound_core.explore.similar import find_similar

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"emb_{args.cells}x{args.dim}.parquet"
    if not src.exists():
        write_layer(src, args.cells, args.dim)
    t0 = time.perf_counter()
    table = read_embeddings(src)
    t_read = time.perf_counter() - t0
    res = find_similar(table, [str(c) for c in table.cell_ids[:5]], k=50)
    write_result(work / "similar.gpkg", table, {"similarity": res["similarity"], "rank": res["rank"]})
    t_sim = time.perf_counter() - t0
    t1 = time.perf_counter()
    table = read_embeddings(src)
    col = embedding_colours(table)
    write_result(work / "colours.gpkg", table, {"colour": col["colour"]})
    t_col = time.perf_counter() - t1
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"cells": args.cells, "dim": args.dim, "threads": args.threads, "read_s": round(t_read, 2),
           "similar_total_s": round(t_sim, 2), "colours_total_s": round(t_col, 2),
           "both_s": round(t_sim + t_col, 2), "peak_rss_mb": round(rss_mb), "matrix_mb": round(args.cells * args.dim * 4 / 2**20),
           "load_avg": round(os.getloadavg()[0], 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
