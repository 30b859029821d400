"""POIs of the synthetic city: how many, which categories, where, how many reviews.

Story (docs/SYNTHCITY.md):
- Each district draws ``density(kind) x area`` POIs (x a lognormal district factor) and splits
  them over categories with the kind's mix (urban villages: rentals, eateries, repair shops;
  old towns: tourism, heritage, boutiques; industry: factories, warehouses...).
- A POI stands on a building of its district chosen by use affinity (offices on office towers,
  rentals on residential roofs, factories on sheds), weighted by footprint x sqrt(floors); bus
  stops and parkings stand beside an internal street; parks on open ground. So POIs and roofs
  are co-located, which the cross-modal spatial alignment objective needs (paper 4.2.4, CMSA).
- Buildings whose use the image cannot show get a POI that reveals it: every residential CBD
  tower an apartment complex, every industrial dormitory a dormitory, every school building a
  school. Population (labels.py) depends on those uses.
- Reviews ~ Poisson(base(category) x centrality x LogNormal(0, 0.8)), centrality =
  0.25 + 1.75 exp(-d / 1500 m) with d the distance to the CBD centre (commercial activeness,
  paper 5.1.2, CAP).
"""
from __future__ import annotations

import numpy as np

from .layout import KINDS, STOREY_M, U, USES, Layout
from .names import N_DRAWS, NOUNS, make_names

# category -> (review base, anchor). Anchor: "street", "ground", or {use: weight}.
_SHOP = {"commercial": 3.0, "residential": 1.0, "hotel": 0.5, "office": 0.5}
_PUBLIC = {"public": 4.0, "commercial": 0.5, "residential": 0.3, "office": 0.3}
_HERITAGE = {"heritage": 5.0, "public": 1.0, "commercial": 0.3}
CATEGORIES = {
    "restaurant": (60, _SHOP), "fast_food": (40, _SHOP), "noodle_shop": (25, _SHOP),
    "street_food": (8, _SHOP), "cafe": (45, _SHOP), "tea_house": (20, _SHOP), "bakery": (20, _SHOP),
    "bar": (35, _SHOP), "convenience_store": (6, _SHOP),
    "supermarket": (30, {"commercial": 2.0, "residential": 1.0}),
    "shopping_mall": (300, {"commercial": 1.0}), "clothing_store": (12, _SHOP), "boutique": (15, _SHOP),
    "electronics_store": (10, _SHOP), "phone_repair": (4, _SHOP), "hardware_store": (3, _SHOP),
    "pharmacy": (6, _SHOP), "market": (40, {"commercial": 2.0, "residential": 0.5}),
    "bookstore": (20, _SHOP), "souvenir_shop": (15, _SHOP), "hair_salon": (10, _SHOP),
    "laundry": (3, _SHOP), "bank": (8, {"office": 2.0, "commercial": 2.0, "residential": 0.5}),
    "real_estate_agency": (3, _SHOP), "courier": (2, {**_SHOP, "warehouse": 1.0}),
    "car_repair": (4, {"commercial": 1.0, "industrial": 1.0, "warehouse": 0.5, "residential": 0.3}),
    "print_shop": (2, _SHOP), "internet_cafe": (8, _SHOP),
    "hotel": (120, {"hotel": 4.0, "commercial": 1.0, "office": 0.3}),
    "hostel": (30, {"commercial": 1.0, "residential": 1.0, "hotel": 1.0}),
    "guesthouse": (25, {"commercial": 1.0, "residential": 1.0, "hotel": 1.0}),
    "rental_apartment": (1.5, {"residential": 1.0}),
    "residential_complex": (5, {"residential": 1.0}),
    "dormitory": (0.5, {"residential": 1.0}),
    "office": (3, {"office": 4.0, "commercial": 0.5, "industrial": 0.3, "warehouse": 0.1}),
    "coworking": (10, {"office": 2.0, "commercial": 1.0}),
    "school": (10, _PUBLIC), "kindergarten": (5, _PUBLIC), "hospital": (80, _PUBLIC),
    "clinic": (8, {**_SHOP, "public": 1.0}), "government": (3, _PUBLIC), "police_station": (2, _PUBLIC),
    "post_office": (4, _PUBLIC), "library": (15, _PUBLIC),
    "museum": (150, _HERITAGE), "temple": (60, _HERITAGE), "heritage_site": (90, _HERITAGE),
    "art_gallery": (40, {"heritage": 1.0, "commercial": 1.0}),
    "gym": (15, {"commercial": 1.0, "residential": 0.3, "office": 0.5}),
    "cinema": (120, {"commercial": 1.0}),
    "park": (100, "ground"), "bus_stop": (1, "street"), "parking": (3, "street"),
    "gas_station": (5, "street"),
    "factory": (1, {"industrial": 1.0}), "warehouse": (0.5, {"warehouse": 1.0}),
    "logistics_center": (1, {"warehouse": 1.0, "industrial": 0.3}),
}
CATEGORY_NAMES = tuple(CATEGORIES)
C = {name: i for i, name in enumerate(CATEGORY_NAMES)}
assert set(CATEGORY_NAMES) == set(NOUNS), "every category needs a name vocabulary"

# POIs per 256 m x 256 m cell, by district kind (paper 5.1.1 regions). Urban villages carry
# hundreds, parks almost none.
DENSITY_PER_CELL = {"cbd": 160, "residential": 35, "mixed_residential": 110, "urban_village": 300,
                    "old_town": 170, "industrial": 6, "suburb": 10, "park": 0.6, "water": 0.2}

# Category mix by kind (relative weights). Mixed residential shares the urban-village mix at a
# third of its density, but looks like ordinary slab housing: POIs alone confuse the two.
MIX = {
    "cbd": {"restaurant": 8, "fast_food": 5, "cafe": 8, "bar": 3, "bakery": 2, "convenience_store": 4,
            "supermarket": 1, "shopping_mall": 2, "clothing_store": 5, "boutique": 3, "electronics_store": 2,
            "pharmacy": 1, "bookstore": 1, "hair_salon": 2, "bank": 5, "real_estate_agency": 1, "courier": 1,
            "print_shop": 1, "hotel": 4, "residential_complex": 2, "office": 22, "coworking": 3,
            "hospital": 0.5, "clinic": 1, "government": 1, "post_office": 0.5, "library": 0.3, "museum": 0.5,
            "art_gallery": 0.5, "gym": 2, "cinema": 1, "bus_stop": 2, "parking": 2, "gas_station": 0.2},
    "residential": {"restaurant": 8, "fast_food": 3, "noodle_shop": 3, "cafe": 3, "bakery": 2,
                    "convenience_store": 8, "supermarket": 3, "clothing_store": 2, "pharmacy": 3,
                    "hair_salon": 4, "laundry": 2, "bank": 2, "real_estate_agency": 4, "courier": 2,
                    "residential_complex": 10, "rental_apartment": 2, "kindergarten": 3, "school": 2,
                    "clinic": 2, "post_office": 1, "gym": 2, "bus_stop": 4, "parking": 3, "park": 1,
                    "tea_house": 1, "bookstore": 0.5},
    "mixed_residential": {"restaurant": 10, "street_food": 6, "noodle_shop": 7, "fast_food": 4,
                          "convenience_store": 9, "phone_repair": 4, "hair_salon": 6, "laundry": 2,
                          "hardware_store": 2, "clothing_store": 4, "internet_cafe": 1, "market": 2,
                          "pharmacy": 2, "clinic": 1, "real_estate_agency": 4, "courier": 2,
                          "rental_apartment": 8, "residential_complex": 5, "kindergarten": 1, "bus_stop": 2,
                          "supermarket": 2, "bakery": 1},
    "urban_village": {"restaurant": 10, "street_food": 8, "noodle_shop": 8, "fast_food": 4,
                      "convenience_store": 9, "rental_apartment": 16, "phone_repair": 5, "hair_salon": 6,
                      "laundry": 3, "hardware_store": 3, "clothing_store": 3, "internet_cafe": 2, "market": 1,
                      "pharmacy": 2, "clinic": 1.5, "real_estate_agency": 3, "courier": 2, "car_repair": 1,
                      "print_shop": 1, "bakery": 1, "guesthouse": 2, "kindergarten": 0.5, "bus_stop": 0.5,
                      "electronics_store": 1},
    "old_town": {"restaurant": 10, "tea_house": 6, "cafe": 8, "bar": 4, "street_food": 4, "noodle_shop": 3,
                 "bakery": 2, "souvenir_shop": 12, "boutique": 8, "art_gallery": 4, "museum": 3, "temple": 3,
                 "heritage_site": 4, "guesthouse": 8, "hostel": 4, "hotel": 2, "bookstore": 3,
                 "convenience_store": 3, "clothing_store": 3, "hair_salon": 1, "pharmacy": 1,
                 "rental_apartment": 0.8, "residential_complex": 0.5, "bus_stop": 1, "parking": 1,
                 "phone_repair": 0.3},
    "industrial": {"factory": 30, "warehouse": 20, "logistics_center": 8, "office": 6, "dormitory": 8,
                   "car_repair": 4, "gas_station": 2, "fast_food": 4, "restaurant": 3, "convenience_store": 4,
                   "courier": 3, "hardware_store": 3, "parking": 3, "bus_stop": 2},
    "suburb": {"residential_complex": 10, "convenience_store": 6, "restaurant": 6, "cafe": 2, "supermarket": 2,
               "school": 3, "kindergarten": 3, "clinic": 2, "gas_station": 2, "car_repair": 2, "hair_salon": 2,
               "real_estate_agency": 2, "bus_stop": 4, "park": 2, "gym": 1, "bakery": 2},
    "park": {"park": 10, "cafe": 2, "tea_house": 2, "museum": 1, "temple": 1, "parking": 1, "bus_stop": 1},
    "water": {"park": 1},
}
TOURISM = ("souvenir_shop", "boutique", "art_gallery", "museum", "temple", "heritage_site", "guesthouse",
           "hostel", "tea_house")

# (district kind, building use) -> category every such building gets (reveals the use).
GUARANTEED = {("cbd", "residential"): "residential_complex",
              ("industrial", "residential"): "dormitory",
              ("residential", "public"): "school", ("mixed_residential", "public"): "school"}

CELL_AREA_M2 = 256.0 * 256.0


def _affinity_table() -> np.ndarray:
    """``[n_categories, n_uses]`` anchor weights (rows of street/ground categories are zero)."""
    t = np.zeros((len(CATEGORY_NAMES), len(USES)))
    for c, (_, anchor) in CATEGORIES.items():
        if isinstance(anchor, dict):
            for use, w in anchor.items():
                t[C[c], U[use]] = w
    return t


def generate_pois(rng: np.random.Generator, layout: Layout, places: list, language: str) -> dict:
    """Draw every POI of the city.

    Returns a dict of arrays: ``x``, ``y`` (float64 pixel col/row), ``category`` (int16 index into
    CATEGORY_NAMES), ``district`` (int32), ``building`` (int32, -1 when not on a building),
    ``reviews`` (int64), and ``names`` (list of str).
    """
    b = layout.buildings
    dist = layout.districts
    nd = len(dist["x0"])
    aff = _affinity_table()
    area = (b["x1"] - b["x0"]).astype(np.float64) * (b["y1"] - b["y0"])
    floors = np.maximum(1.0, np.round(b["height"] / STOREY_M))
    size_w = area * np.sqrt(floors)
    size_w[b["use"] == U["detail"]] = 0.0
    order = np.argsort(b["district"], kind="stable")
    starts = np.searchsorted(b["district"][order], np.arange(nd + 1))
    road_d = layout.roads["district"]

    xs, ys, cats, dists, blds = [], [], [], [], []
    for d in range(nd):
        kind = KINDS[int(dist["kind"][d])]
        x0, y0, x1, y1 = (int(dist[k][d]) for k in ("x0", "y0", "x1", "y1"))
        darea = float((x1 - x0) * (y1 - y0))
        lam = DENSITY_PER_CELL[kind] * darea / CELL_AREA_M2 * float(rng.lognormal(0.0, 0.25))
        n = int(rng.poisson(lam))
        mix = MIX[kind]
        p = np.zeros(len(CATEGORY_NAMES))
        for c, w in mix.items():
            p[C[c]] = w
        counts = rng.multinomial(n, p / p.sum())
        bidx = order[starts[d]:starts[d + 1]]
        guaranteed = [(u, c) for (k, u), c in GUARANTEED.items() if k == kind]
        for u, c in guaranteed:
            on = bidx[b["use"][bidx] == U[u]]
            if len(on):
                fx, fy = rng.random(len(on)), rng.random(len(on))
                xs.append(b["x0"][on] + fx * (b["x1"][on] - b["x0"][on]))
                ys.append(b["y0"][on] + fy * (b["y1"][on] - b["y0"][on]))
                cats.append(np.full(len(on), C[c]))
                dists.append(np.full(len(on), d))
                blds.append(on)
        rects = (x0, y0, x1, y1)
        street = np.nonzero(road_d == d)[0]
        for ci in np.nonzero(counts)[0].tolist():
            m = int(counts[ci])
            anchor = CATEGORIES[CATEGORY_NAMES[ci]][1]
            px, py, pb = None, None, np.full(m, -1)
            if isinstance(anchor, dict) and len(bidx):
                w = aff[ci][b["use"][bidx]] * size_w[bidx]
                if w.sum() <= 0:  # no building of a fitting use here: any building of the district
                    w = size_w[bidx]
                if w.sum() > 0:
                    pb = bidx[rng.choice(len(bidx), size=m, p=w / w.sum())]
                    fx, fy = rng.random(m), rng.random(m)
                    px = b["x0"][pb] + fx * (b["x1"][pb] - b["x0"][pb])
                    py = b["y0"][pb] + fy * (b["y1"][pb] - b["y0"][pb])
            if px is None and anchor != "ground":
                px, py = _beside_street(rng, layout, street, rects, m)
            if px is None:
                px, py = _open_ground(rng, rects, m)
            xs.append(px)
            ys.append(py)
            cats.append(np.full(m, ci))
            dists.append(np.full(m, d))
            blds.append(pb)

    x = np.concatenate(xs) if xs else np.zeros(0)
    y = np.concatenate(ys) if ys else np.zeros(0)
    cat = (np.concatenate(cats) if cats else np.zeros(0)).astype(np.int16)
    did = (np.concatenate(dists) if dists else np.zeros(0)).astype(np.int32)
    bid = (np.concatenate(blds) if blds else np.zeros(0)).astype(np.int32)

    # reviews: category popularity x centrality x a heavy-tailed POI factor
    base = np.array([CATEGORIES[c][0] for c in CATEGORY_NAMES], dtype=np.float64)
    dcbd = np.hypot(x - layout.cbd_xy[0], y - layout.cbd_xy[1])
    centrality = 0.25 + 1.75 * np.exp(-dcbd / 1500.0)
    lam = base[cat] * centrality * rng.lognormal(0.0, 0.8, len(cat))
    reviews = rng.poisson(lam).astype(np.int64)

    draws = rng.integers(0, 2**31 - 1, size=(len(cat), N_DRAWS), dtype=np.int64)
    names = make_names([CATEGORY_NAMES[c] for c in cat.tolist()], [places[d] for d in did.tolist()],
                       draws, language)
    return {"x": x, "y": y, "category": cat, "district": did, "building": bid, "reviews": reviews,
            "names": names}


def _beside_street(rng, layout, street, rect, m):
    """Points 1.5 m beside one of the district's internal streets (sidewalks), else None."""
    if len(street) == 0:
        return None, None
    r = layout.roads
    rx0, ry0 = r["x0"][street].astype(np.float64), r["y0"][street].astype(np.float64)
    rx1, ry1 = r["x1"][street].astype(np.float64), r["y1"][street].astype(np.float64)
    length = np.maximum(rx1 - rx0, ry1 - ry0)
    k = rng.choice(len(street), size=m, p=length / length.sum())
    t, side = rng.random(m), rng.random(m) < 0.5
    vertical = (ry1 - ry0)[k] > (rx1 - rx0)[k]
    along_x = rx0[k] + t * (rx1 - rx0)[k]
    along_y = ry0[k] + t * (ry1 - ry0)[k]
    off_x = np.where(side, rx0[k] - 1.5, rx1[k] + 1.5)
    off_y = np.where(side, ry0[k] - 1.5, ry1[k] + 1.5)
    px = np.where(vertical, off_x, along_x)
    py = np.where(vertical, along_y, off_y)
    x0, y0, x1, y1 = rect
    return np.clip(px, x0 + 0.5, x1 - 0.5), np.clip(py, y0 + 0.5, y1 - 0.5)


def _open_ground(rng, rect, m):
    """Points in the corners of a district (outside its central lake, if any)."""
    x0, y0, x1, y1 = rect
    w, h = x1 - x0, y1 - y0
    fx = rng.uniform(0.01, 0.15, m)
    fy = rng.uniform(0.01, 0.15, m)
    fx = np.where(rng.random(m) < 0.5, fx, 1.0 - fx)
    fy = np.where(rng.random(m) < 0.5, fy, 1.0 - fy)
    return x0 + fx * w, y0 + fy * h
