"""Ground-truth labels of the synthetic city: urban villages and population (paper 5.1.2).

Urban villages (UVD): the polygons of the districts of kind ``urban_village``. Old towns look
much the same from above (same footprints and alleys, palettes that overlap) but are not urban
villages; their POI mix (tourism, heritage, boutiques) is what tells them apart. Mixed
residential districts have an urban-village-like POI mix but ordinary slab housing. So neither
modality alone separates the classes.

Population (POP), persons per building, summed into ~100 m pixels like WorldPop:

    persons_b = 1[use_b = residential] x footprint_b x floors_b / m2_per_person_b x LogNormal(0, 0.15)
    floors_b  = max(1, round(height_b / 3 m))
    m2_per_person_b = M2_PER_PERSON[kind of b's district], and in urban villages
                      18 / (1 + 0.5 x min(rentals_b, 2)) with rentals_b the rental-apartment POIs on b

Footprint and height are in the image (roof size, shadow length); the residential use is revealed
by POIs where the image is silent (CBD residential towers carry an apartment-complex POI, factory
dormitories a dormitory POI), and rental POIs mark the crowded village buildings.
"""
from __future__ import annotations

import numpy as np

from .layout import K, KINDS, STOREY_M, U, Layout

POP_PIXEL_M = 100
M2_PER_PERSON = {"cbd": 45.0, "residential": 32.0, "mixed_residential": 32.0, "urban_village": 18.0,
                 "old_town": 35.0, "industrial": 10.0, "suburb": 50.0, "park": 40.0, "water": 40.0}


def building_persons(rng: np.random.Generator, layout: Layout, rentals: np.ndarray) -> np.ndarray:
    """Residents per building (float64), following the formula in the module docstring."""
    b = layout.buildings
    kind = layout.districts["kind"][b["district"]]
    area = (b["x1"] - b["x0"]).astype(np.float64) * (b["y1"] - b["y0"])
    floors = np.maximum(1.0, np.round(b["height"].astype(np.float64) / STOREY_M))
    m2pp = np.array([M2_PER_PERSON[k] for k in KINDS])[kind]
    uv = kind == K["urban_village"]
    m2pp = np.where(uv, m2pp / (1.0 + 0.5 * np.minimum(rentals, 2)), m2pp)
    noise = rng.lognormal(0.0, 0.15, len(area))
    resident = b["use"] == U["residential"]
    return np.where(resident, area * floors / m2pp * noise, 0.0)


def population_raster(layout: Layout, persons: np.ndarray, pixel_m: int = POP_PIXEL_M) -> np.ndarray:
    """``float32 [rows, cols]`` persons per pixel; each building's residents are split over the
    pixels its footprint overlaps, in proportion to the overlap area (so the total is kept)."""
    n = layout.size_px
    rows = cols = -(-n // pixel_m)
    out = np.zeros((rows, cols), dtype=np.float64)
    b = layout.buildings
    sel = persons > 0
    x0, x1 = b["x0"][sel].astype(np.float64), b["x1"][sel].astype(np.float64)
    y0, y1 = b["y0"][sel].astype(np.float64), b["y1"][sel].astype(np.float64)
    dens = persons[sel] / ((x1 - x0) * (y1 - y0))
    span_x = int(np.max(np.floor((x1 - 1) / pixel_m) - np.floor(x0 / pixel_m))) + 1 if len(x0) else 0
    span_y = int(np.max(np.floor((y1 - 1) / pixel_m) - np.floor(y0 / pixel_m))) + 1 if len(y0) else 0
    cx0, cy0 = np.floor(x0 / pixel_m), np.floor(y0 / pixel_m)
    for i in range(span_x):
        ci = cx0 + i
        ox = np.clip(np.minimum(x1, (ci + 1) * pixel_m) - np.maximum(x0, ci * pixel_m), 0, None)
        for j in range(span_y):
            cj = cy0 + j
            oy = np.clip(np.minimum(y1, (cj + 1) * pixel_m) - np.maximum(y0, cj * pixel_m), 0, None)
            w = ox * oy * dens
            ok = w > 0
            np.add.at(out, (cj[ok].astype(np.int64), ci[ok].astype(np.int64)), w[ok])
    return out.astype(np.float32)


def urban_village_districts(layout: Layout) -> np.ndarray:
    """Indices of the districts that are urban villages (the UVD ground truth)."""
    return np.nonzero(layout.districts["kind"] == K["urban_village"])[0]
