"""``refound synthcity``: generate a seeded synthetic city (imagery, POIs, labels).

    refound synthcity --out DIR --seed N --size-km K [--crs EPSG:32650] [--language en|zh]

Writes imagery.tif, pois.gpkg, urban_villages.gpkg, population.tif, districts.gpkg and meta.json
(docs/SYNTHCITY.md). The same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same bytes")
    parser.add_argument("--size-km", type=float, default=2.0, metavar="K",
                        help="side of the square city in km, 0.256 to 20 (default 2; 8 km takes about a minute)")
    parser.add_argument("--crs", default="EPSG:32650", help="projected CRS in metres (default EPSG:32650)")
    parser.add_argument("--language", choices=("en", "zh"), default="en", help="language of POI names")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from refound_core.data.synthcity import generate_city

    state = {"last": -1}

    def progress(fraction: float, message: str) -> None:
        pct = int(fraction * 100)
        if not args.quiet and pct // 10 != state["last"] // 10:
            state["last"] = pct
            print(f"synthcity: {pct:3d}% {message}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    meta = generate_city(args.out, seed=args.seed, size_km=args.size_km, crs=args.crs,
                         language=args.language, progress=progress)
    dt = time.perf_counter() - t0
    c = meta["counts"]
    kinds = ", ".join(f"{k} {v}" for k, v in meta["district_counts"].items() if v)
    print(f"synthetic city (seed {meta['seed']}, {meta['size_km']:g} km, {meta['crs']}, {meta['language']}) "
          f"written to {args.out} in {dt:.1f} s")
    print(f"  {c['districts']} districts ({kinds})")
    print(f"  {c['buildings']} buildings, {c['pois']} POIs, {c['urban_villages']} urban villages, "
          f"{c['population']:.0f} residents")
    return 0
