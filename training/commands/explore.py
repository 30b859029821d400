"""``refound explore similar|cluster|colours|compare``: do something with region embeddings.

Inputs are embedding layers: the GeoParquet of ``refound embed`` (``--column`` picks ``fused``,
``h_P`` or ``h_S``) or a GeoPackage with ``emb_000...`` fields (the plugin's
``compute_region_embeddings``). Outputs are a GeoPackage (.gpkg) or GeoParquet (.parquet) with one
row per cell, written atomically (nothing is written on bad input).

Examples::

    refound explore similar --embeddings emb.parquet --cells EPSG:32650/256/1950_18160 --top-k 20 --out sim.gpkg
    refound explore cluster --embeddings emb.parquet --out clusters.gpkg          # k by silhouette
    refound explore colours --embeddings emb.parquet --out colours.gpkg
    refound explore compare --embeddings emb2019.parquet --other emb2023.parquet --out change.gpkg
"""
from __future__ import annotations

import argparse
import json


def _common(p, out_help):
    p.add_argument("--embeddings", required=True, help="embedding layer: .parquet from `refound embed` or .gpkg with emb_000... fields")
    p.add_argument("--column", default="fused", choices=("fused", "h_P", "h_S"),
                   help="which GeoParquet embedding column to use (default: fused; ignored for .gpkg)")
    p.add_argument("--layer", default=None, help="layer of a multi-layer GeoPackage (default: the first)")
    p.add_argument("--out", required=True, help=out_help + "; .gpkg or .parquet, written atomically")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="explore_command", metavar="ACTION", required=True)
    s = sub.add_parser("similar", help="cosine similarity of every cell to query cells; top-k list",
                       description="Cosine similarity of every cell to the mean embedding of the query cells.")
    _common(s, "per-cell similarity and rank")
    s.add_argument("--cells", nargs="+", default=[], help="query cell ids (cell_id values)")
    s.add_argument("--polygon", default=None,
                   help="query area: WKT in the layer's CRS, or a vector file whose features are unioned")
    s.add_argument("--top-k", type=int, default=20, help="how many most similar cells to list (default: 20)")
    s.add_argument("--target", default=None,
                   help="score the cells of this other embedding layer (another city) instead of the query's own")
    c = sub.add_parser("cluster", help="k-means (k by silhouette) or HDBSCAN typology of cells",
                       description="Cluster cells by embedding; per-cluster summary printed as JSON.")
    _common(c, "per-cell cluster id")
    c.add_argument("--k", type=int, default=None, help="number of clusters (default: best silhouette over 2..10)")
    c.add_argument("--method", choices=("kmeans", "hdbscan"), default="kmeans", help="clustering (default: kmeans)")
    c.add_argument("--min-cluster-size", type=int, default=5, help="HDBSCAN's smallest cluster (default: 5)")
    c.add_argument("--attributes", nargs="*", default=[], help="numeric fields to average per cluster (e.g. poi_count)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    c.add_argument("--pois", default=None,
                   help="POI file (GeoPackage, Shapefile, GeoJSON): name each cluster's top POI categories")
    c.add_argument("--poi-layer", default=None, help="layer of the POI file (default: the first)")
    c.add_argument("--category-field", default="category", help="POI category attribute (default: category)")
    o = sub.add_parser("colours", help="first 3 principal components (or UMAP) as an RGB colour per cell",
                       description="Similar places share a colour: 3 components -> #rrggbb per cell.")
    _common(o, "per-cell colour (#rrggbb) and components pc1..pc3")
    o.add_argument("--method", choices=("pca", "umap"), default="pca", help="projection (umap needs umap-learn)")
    o.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    m = sub.add_parser("compare", help="per-cell cosine distance between two layers of the same grid",
                       description="Change between two embedding layers of one grid (two dates / snapshots).")
    _common(m, "per-cell distance, rank (1 = most changed) and status")
    m.add_argument("--other", required=True, help="the second embedding layer (same grid and model)")


def _polygon(spec, crs):
    if spec is None:
        return None
    import os

    import shapely

    if os.path.exists(spec):
        import geopandas as gpd

        g = gpd.read_file(spec)
        if crs and g.crs is not None:
            g = g.to_crs(crs)
        return g.geometry.union_all()
    from refound_core.errors import InputError

    try:
        return shapely.from_wkt(spec)
    except Exception:  # noqa: BLE001 - shapely's message is GEOS's
        raise InputError(f"--polygon {spec[:60]!r} is neither an existing vector file nor WKT") from None


def run(args: argparse.Namespace) -> int:
    from refound_core.explore import cluster as cl, colours as co, compare as cm, similar as si
    from refound_core.explore.io import read_embeddings, write_result

    table = read_embeddings(args.embeddings, args.column, args.layer)
    report: dict = {"cells": int(len(table.cell_ids)), "with_embedding": int(table.valid.sum())}
    if args.explore_command == "similar":
        target = read_embeddings(args.target, args.column) if args.target else None
        res = si.find_similar(table, args.cells, _polygon(args.polygon, table.crs), args.top_k, target)
        out_t = target or table
        write_result(args.out, out_t, {"similarity": res["similarity"], "rank": res["rank"],
                                       "query": _mask(len(out_t.cell_ids), res["query"] if target is None else [])})
        report["top"] = [{"cell_id": str(out_t.cell_ids[i]), "similarity": round(float(res["similarity"][i]), 4)}
                         for i in res["top"]]
    elif args.explore_command == "cluster":
        pois = None
        if args.pois:
            from refound_core.explore.poi_categories import read_poi_points

            pois = read_poi_points(args.pois, table.crs, args.category_field, args.poi_layer)
        res = cl.cluster(table, args.k, args.method, args.seed, args.min_cluster_size, args.attributes, pois)
        write_result(args.out, table, {"cluster": res["cluster"]})
        report.update(k=res["k"], silhouette=res["silhouette"], summary=res["summary"])
    elif args.explore_command == "colours":
        res = co.embedding_colours(table, args.method, args.seed)
        comp = res["components"]
        write_result(args.out, table, {"colour": res["colour"], "pc1": comp[:, 0], "pc2": comp[:, 1], "pc3": comp[:, 2]})
    else:
        other = read_embeddings(args.other, args.column)
        res = cm.compare(table, other)
        write_result(args.out, table, {"distance": res["distance"], "rank": res["rank"], "status": res["status"]},
                     geometry=res["geometry"], cell_ids=res["cell_ids"])
        report["status"] = {s: int((res["status"] == s).sum()) for s in sorted(set(res["status"].tolist()))}
    if not args.quiet:
        print(json.dumps(report, indent=1))
    return 0


def _mask(n, rows):
    import numpy as np

    m = np.zeros(n, dtype=bool)
    m[np.asarray(rows, dtype=np.int64)] = True
    return m
