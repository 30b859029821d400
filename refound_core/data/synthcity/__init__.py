"""Seeded synthetic city: 1 m RGB imagery, POIs with names and reviews, and region labels.

No open ~1 m imagery co-located with POIs exists on these machines (shared/data/README.md), so
training, evaluation and benchmarks at scale, and the plugin's try-it-without-data path, use this
generator. It produces the two modalities ReFound reads (paper 3: POI names/categories/locations
and a satellite image per 256 m region) and the ground truth of its three downstream tasks
(paper 5.1.2: urban villages, commercial activeness from POI reviews, ~100 m population).
The generative story and what each label depends on: docs/SYNTHCITY.md.

    generate_city(out_dir, seed, size_km, crs="EPSG:32650", language="en", progress=None) -> dict

Same seed and arguments -> byte-identical files. One ``numpy.random.Generator`` built from the
seed is used for everything, in a fixed order: layout, place names, POIs, population, pixels.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from refound_core.errors import InputError

from .layout import KINDS, U, Layout, build_layout

GENERATOR_VERSION = "1.0"
LICENCE = "synthetic, CC0 1.0 (public domain dedication): generated data, no third-party content"
OUTPUT_FILES = ("imagery.tif", "pois.gpkg", "urban_villages.gpkg", "population.tif", "districts.gpkg",
                "meta.json")
GRID_M = 256  # the region size of paper 5.1.1; the image origin is snapped to it
MIN_SIZE_KM, MAX_SIZE_KM = 0.256, 20.0

__all__ = ["generate_city", "make_layout", "city_origin", "GENERATOR_VERSION", "OUTPUT_FILES", "KINDS"]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}: pass e.g. --seed 0")
    return int(seed)


def _size_px(size_km) -> int:
    try:
        s = float(size_km)
    except (TypeError, ValueError):
        s = float("nan")
    if not (MIN_SIZE_KM <= s <= MAX_SIZE_KM):
        raise InputError(f"size_km must be between {MIN_SIZE_KM} and {MAX_SIZE_KM} km, got {size_km!r}: "
                         f"pass e.g. --size-km 2")
    return int(round(s * 1000))


def _check_crs(crs):
    """A projected CRS in metres (the image has 1 m pixels); returns (pyproj CRS, text for GDAL)."""
    import pyproj

    try:
        c = pyproj.CRS.from_user_input(crs)
    except (pyproj.exceptions.CRSError, TypeError) as exc:
        raise InputError(f"unknown CRS {crs!r} ({exc}): pass a projected CRS such as 'EPSG:32650'") from None
    units = {a.unit_name for a in c.axis_info}
    if not c.is_projected or not units <= {"metre", "meter"}:
        raise InputError(f"CRS {crs!r} is not a projected CRS in metres: pass a UTM zone such as "
                         f"'EPSG:32650' (the image has 1 m pixels)")
    epsg = c.to_epsg()
    return c, (f"EPSG:{epsg}" if epsg else c.to_wkt())


def city_origin(crs, size_px: int) -> tuple:
    """Top-left corner (x, y) of the image: the city is centred on the middle of the CRS's area
    of use, and both coordinates are multiples of 256 m so the region grid aligns with pixels."""
    import pyproj

    c = pyproj.CRS.from_user_input(crs)
    cx, cy = 0.0, 0.0
    aou = c.area_of_use
    if aou is not None:
        lon, lat = (aou.west + aou.east) / 2.0, (aou.south + aou.north) / 2.0
        t = pyproj.Transformer.from_crs("EPSG:4326", c, always_xy=True)
        x, y = t.transform(lon, lat)
        if math.isfinite(x) and math.isfinite(y):
            cx, cy = x, y
    ox = GRID_M * math.floor((cx - size_px / 2.0) / GRID_M)
    oy = GRID_M * math.ceil((cy + size_px / 2.0) / GRID_M)
    return float(ox), float(oy)


def make_layout(seed: int, size_km: float) -> Layout:
    """The layout ``generate_city`` draws for this seed and size (it is drawn first, from the same
    generator), for tests and debugging."""
    return build_layout(np.random.default_rng(_check_seed(seed)), _size_px(size_km))


def generate_city(out_dir, seed: int, size_km: float, crs: str = "EPSG:32650", language: str = "en",
                  progress: Optional[Callable[[float, str], None]] = None) -> dict:
    """Generate a synthetic city into ``out_dir`` (created if missing; files there are replaced).

    Args:
        out_dir: output folder; receives OUTPUT_FILES.
        seed: non-negative integer; the same seed gives byte-identical files.
        size_km: side of the square city in km (0.256 to 20); 8 km takes under 2 minutes on 2 cores.
        crs: projected CRS in metres for all outputs.
        language: "en" or "zh" POI and place names.
        progress: optional ``callback(fraction in [0, 1], message)``.

    Returns:
        The content of meta.json plus ``"paths"`` (file name -> absolute path).
    """
    import shapely
    from affine import Affine

    from . import writer
    from .labels import POP_PIXEL_M, building_persons, population_raster, urban_village_districts
    from .names import place_names
    from .pois import C, CATEGORY_NAMES, generate_pois
    from .render import Renderer

    seed = _check_seed(seed)
    n = _size_px(size_km)
    if language not in ("en", "zh"):
        raise InputError(f"language must be 'en' or 'zh', got {language!r}")
    pcrs, crs_text = _check_crs(crs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {str(out)!r} is a file: pass a folder path to --out")
    out.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda f, m: None)

    ox, oy = city_origin(pcrs, n)
    rng = np.random.default_rng(seed)
    report(0.0, "layout")
    layout = build_layout(rng, n)
    nd = len(layout.districts["x0"])
    places = place_names(rng, nd)
    report(0.04, "POIs")
    pois = generate_pois(rng, layout, places, language)
    report(0.08, "population")
    nb = len(layout.buildings["x0"])
    on_b = pois["building"][(pois["category"] == C["rental_apartment"]) & (pois["building"] >= 0)]
    rentals = np.bincount(on_b, minlength=nb)
    persons = building_persons(rng, layout, rentals)
    pop = population_raster(layout, persons, POP_PIXEL_M)

    report(0.1, "imagery")
    renderer = Renderer(layout, rng)
    done = [0]

    def on_strip(r0, r1):
        done[0] += r1 - r0
        report(0.1 + 0.8 * done[0] / n, "imagery")

    paths = {name: out / name for name in OUTPUT_FILES}
    image_transform = Affine(1.0, 0.0, ox, 0.0, -1.0, oy)
    pop_transform = Affine(float(POP_PIXEL_M), 0.0, ox, 0.0, -float(POP_PIXEL_M), oy)
    writer.write_rgb(paths["imagery.tif"], renderer.strips(), n, image_transform, crs_text, on_strip)
    writer.write_float(paths["population.tif"], pop, pop_transform, crs_text)

    report(0.92, "vectors")
    lang = 1 if language == "zh" else 0
    writer.write_gpkg(paths["pois.gpkg"], "pois",
                      {"name": pois["names"],
                       "category": [CATEGORY_NAMES[c] for c in pois["category"].tolist()],
                       "reviews": pois["reviews"]},
                      shapely.points(ox + pois["x"], oy - pois["y"]), crs_text)
    d = layout.districts
    boxes = shapely.box(ox + d["x0"], oy - d["y1"], ox + d["x1"], oy - d["y0"])
    kinds = [KINDS[k] for k in d["kind"].tolist()]
    writer.write_gpkg(paths["districts.gpkg"], "districts",
                      {"district_id": np.arange(nd, dtype=np.int32), "kind": kinds,
                       "name": [p[lang] for p in places]}, boxes, crs_text)
    uv = urban_village_districts(layout)
    writer.write_gpkg(paths["urban_villages.gpkg"], "urban_villages",
                      {"district_id": uv.astype(np.int32), "name": [places[i][lang] for i in uv.tolist()]},
                      boxes[uv], crs_text)

    meta = {
        "generator": "refound synthcity",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size_km": n / 1000.0,
        "size_px": n,
        "pixel_size_m": 1.0,
        "population_pixel_m": POP_PIXEL_M,
        "crs": crs_text,
        "origin_x": ox,
        "origin_y": oy,
        "origin_note": "top-left corner of imagery.tif and population.tif; multiples of 256 m",
        "language": language,
        "sun_elevation_deg": round(layout.sun_elevation_deg, 3),
        "cbd_center": [round(ox + layout.cbd_xy[0], 3), round(oy - layout.cbd_xy[1], 3)],
        "district_counts": {k: int(v) for k, v in layout.counts.items()},
        "counts": {"districts": nd, "buildings": int((layout.buildings["use"] != U["detail"]).sum()),
                   "pois": len(pois["names"]), "urban_villages": int(len(uv)),
                   "population": round(float(pop.sum(dtype=np.float64)), 1)},
        "poi_categories": list(CATEGORY_NAMES),
        "files": list(OUTPUT_FILES),
        "licence": LICENCE,
    }
    writer.write_json(paths["meta.json"], meta)
    report(1.0, "done")
    return {**meta, "paths": {k: str(v.resolve()) for k, v in paths.items()}}
