"""City layout: arterial grid, districts, internal streets, buildings, pads and lakes.

Everything here is an axis-aligned rectangle in *pixel* coordinates of the 1 m image
(``x`` = column, ``y`` = row, row 0 = north, half-open ``[x0, x1) x [y0, y1)``), so rendering is
numpy slicing (render.py) and the GeoTIFF transform maps it to CRS metres (writer.py).

Generative story (docs/SYNTHCITY.md has the whole of it):
1. Arterial roads cut the city into superblocks of 280-560 m; each superblock is one district.
2. A CBD centre is drawn near the middle; a district's kind is drawn from weights that depend on
   its distance to that centre (towers in the middle, urban villages and old towns in the inner
   ring, industry and suburbs outside), then small quotas make sure every key kind exists.
3. Each kind fills its district with its own street pattern and building fabric (below).
All randomness comes from the one ``numpy.random.Generator`` handed in, in a fixed order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

KINDS = ("cbd", "residential", "mixed_residential", "urban_village", "old_town",
         "industrial", "suburb", "park", "water")
K = {name: i for i, name in enumerate(KINDS)}

USES = ("residential", "office", "commercial", "hotel", "industrial", "warehouse",
        "public", "heritage", "detail")
U = {name: i for i, name in enumerate(USES)}

ROAD_CLASSES = ("arterial", "street", "lane", "path")
R = {name: i for i, name in enumerate(ROAD_CLASSES)}

PAD_TYPES = ("plaza", "field")

# Roof base colours (RGB); each kind draws from this palette with its own weights.
PALETTE = {
    "concrete": (150, 147, 140), "darkgrey": (96, 96, 100), "terracotta": (152, 92, 72),
    "tinblue": (96, 128, 158), "rust": (140, 102, 76), "white": (206, 205, 199),
    "green": (98, 128, 106), "lightgrey": (184, 183, 178), "brown": (118, 94, 76),
}
_PAL_NAMES = tuple(PALETTE)
_PAL = np.array([PALETTE[n] for n in _PAL_NAMES], dtype=np.float32)

# Urban villages and old towns draw from overlapping palettes on purpose: from above they should
# be hard to tell apart (the POI mix tells them apart; docs/SYNTHCITY.md "labels need both").
ROOF_WEIGHTS = {
    "cbd": {"darkgrey": 2.5, "tinblue": 2, "lightgrey": 1.5, "white": 1.5, "concrete": 1, "green": 0.5},
    "residential": {"concrete": 3, "lightgrey": 3, "terracotta": 1.5, "darkgrey": 1.5, "white": 1},
    "urban_village": {"concrete": 3, "tinblue": 1.5, "rust": 1.5, "white": 1.5, "darkgrey": 1,
                      "green": 0.5, "terracotta": 1},
    "old_town": {"concrete": 2.5, "darkgrey": 2.5, "terracotta": 1.8, "rust": 1.2, "white": 1,
                 "tinblue": 1},
    "industrial": {"lightgrey": 3, "tinblue": 3, "white": 2, "rust": 1, "concrete": 1},
    "suburb": {"terracotta": 4, "brown": 3, "darkgrey": 2, "concrete": 1},
    "park": {"terracotta": 1, "darkgrey": 1},
    "detail": {"white": 2, "lightgrey": 2, "tinblue": 1, "darkgrey": 1},
}
ROOF_WEIGHTS["mixed_residential"] = ROOF_WEIGHTS["residential"]

STOREY_M = 3.0  # metres per floor, used by population (labels.py) as well


@dataclass
class Layout:
    """The whole city as arrays of rectangles (pixel coordinates, 1 px = 1 m).

    districts: x0 y0 x1 y1 kind name_idx dist_cbd (metres from the CBD centre to the district centre)
    roads: x0 y0 x1 y1 cls district (-1 for arterials)
    buildings: x0 y0 x1 y1 height(m) use district roof(n,3 uint8) pitched; sorted by height
        ascending so taller roofs are drawn last; rooftop boxes have use 'detail'.
    pads: x0 y0 x1 y1 type district (paved plazas, school sports fields)
    lakes: cx cy rx ry district (ellipses, noisy shoreline at render time)
    """

    size_px: int
    sun_elevation_deg: float
    cbd_xy: tuple
    districts: dict
    roads: dict
    buildings: dict
    pads: dict
    lakes: dict
    counts: dict = field(default_factory=dict)

    @property
    def shadow_slope(self) -> float:
        """Metres of height lost per metre northwards along a shadow ray (tan of sun elevation)."""
        return math.tan(math.radians(self.sun_elevation_deg))

    def road_mask(self, y0: int = 0, y1: int = None, x0: int = 0, x1: int = None) -> np.ndarray:
        """Boolean ``[y1-y0, x1-x0]`` mask of road pixels (all classes) in a pixel window."""
        y1 = self.size_px if y1 is None else y1
        x1 = self.size_px if x1 is None else x1
        m = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        r = self.roads
        sel = np.nonzero((r["y0"] < y1) & (r["y1"] > y0) & (r["x0"] < x1) & (r["x1"] > x0))[0]
        for a, b, c, d in zip(r["x0"][sel].tolist(), r["y0"][sel].tolist(),
                              r["x1"][sel].tolist(), r["y1"][sel].tolist()):
            m[max(b, y0) - y0:min(d, y1) - y0, max(a, x0) - x0:min(c, x1) - x0] = True
        return m

    def building_volume(self, residential_only: bool = False) -> np.ndarray:
        """Footprint area x height (m^3) per building (0 for rooftop details)."""
        b = self.buildings
        v = (b["x1"] - b["x0"]).astype(np.float64) * (b["y1"] - b["y0"]) * b["height"]
        v[b["use"] == U["detail"]] = 0.0
        if residential_only:
            v[b["use"] != U["residential"]] = 0.0
        return v


class _Acc:
    """Collects rectangle batches (vectorised per call) and concatenates them once at the end."""

    def __init__(self, spec: dict):
        self.spec = spec  # field -> (dtype, trailing shape)
        self.parts = {k: [] for k in spec}

    def add(self, n: int, **cols):
        if n <= 0:
            return
        for k, (dtype, shape) in self.spec.items():
            v = np.asarray(cols[k], dtype=dtype)
            self.parts[k].append(np.broadcast_to(v, (n,) + shape).copy())

    def finish(self) -> dict:
        out = {}
        for k, (dtype, shape) in self.spec.items():
            p = self.parts[k]
            out[k] = np.concatenate(p) if p else np.zeros((0,) + shape, dtype=dtype)
        return out


_RECT = {"x0": (np.int32, ()), "y0": (np.int32, ()), "x1": (np.int32, ()), "y1": (np.int32, ())}


def _partition(rng, start, end, w_lo, w_hi, g_lo, g_hi):
    """Split ``[start, end)`` into segments of width w_lo..w_hi separated by gaps g_lo..g_hi.

    Returns (starts, ends) int arrays; the leftover is split evenly at both ends so the pattern
    sits centred in the span. Draws a fixed number of values for a given span (determinism).
    """
    span = int(end - start)
    if span < w_lo:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    k = span // (w_lo + g_lo) + 2
    w = rng.integers(w_lo, w_hi + 1, k)
    g = rng.integers(g_lo, g_hi + 1, k)
    s = np.concatenate([[0], np.cumsum(w + g)[:-1]])
    e = s + w
    keep = e <= span
    s, e = s[keep], e[keep]
    if len(e):
        shift = (span - int(e[-1])) // 2
        s, e = s + shift, e + shift
    return s + start, e + start


def _gap_roads(starts, ends):
    """The gaps between consecutive segments (as (a, b) pairs): streets between blocks."""
    return [(int(ends[i]), int(starts[i + 1])) for i in range(len(starts) - 1)]


def _roof_colours(rng, kind: str, n: int) -> np.ndarray:
    w = ROOF_WEIGHTS[kind]
    p = np.array([w.get(name, 0.0) for name in _PAL_NAMES], dtype=np.float64)
    idx = rng.choice(len(_PAL_NAMES), size=n, p=p / p.sum())
    jitter = rng.uniform(0.86, 1.12, size=(n, 1)) * rng.uniform(0.95, 1.05, size=(n, 3))
    return np.clip(_PAL[idx] * jitter, 0, 255).astype(np.uint8)


class _Builder:
    """Fills districts; owns the accumulators and the generator."""

    def __init__(self, rng, n):
        self.rng = rng
        self.n = n
        self.b = _Acc({**_RECT, "height": (np.float32, ()), "use": (np.int8, ()),
                       "district": (np.int32, ()), "roof": (np.uint8, (3,)), "pitched": (bool, ())})
        self.roads = _Acc({**_RECT, "cls": (np.int8, ()), "district": (np.int32, ())})
        self.pads = _Acc({**_RECT, "type": (np.int8, ()), "district": (np.int32, ())})
        self.lakes = _Acc({"cx": (np.float32, ()), "cy": (np.float32, ()), "rx": (np.float32, ()),
                           "ry": (np.float32, ()), "district": (np.int32, ())})

    # -- helpers -----------------------------------------------------------------------------
    def add_buildings(self, d, kind, x0, y0, x1, y1, height, use, pitched=False):
        x0, y0, x1, y1 = (np.asarray(v, np.int64) for v in (x0, y0, x1, y1))
        ok = (x1 - x0 >= 3) & (y1 - y0 >= 3)
        n = int(ok.sum())
        if n == 0:
            return
        height = np.broadcast_to(np.asarray(height, np.float32), x0.shape)[ok]
        use = np.broadcast_to(np.asarray(use, np.int8), x0.shape)[ok]
        pitched = np.broadcast_to(np.asarray(pitched, bool), x0.shape)[ok]
        roof = _roof_colours(self.rng, kind, n)
        self.b.add(n, x0=x0[ok], y0=y0[ok], x1=x1[ok], y1=y1[ok], height=height, use=use,
                   district=d, roof=roof, pitched=pitched)

    def add_road(self, d, x0, y0, x1, y1, cls):
        if x1 > x0 and y1 > y0:
            self.roads.add(1, x0=x0, y0=y0, x1=x1, y1=y1, cls=cls, district=d)

    def block_grid(self, d, rect, b_lo, b_hi, s_lo, s_hi, cls):
        """Cut a district into blocks by internal streets; returns block rects, adds the streets."""
        x0, y0, x1, y1 = rect
        xs, xe = _partition(self.rng, x0, x1, b_lo, b_hi, s_lo, s_hi)
        ys, ye = _partition(self.rng, y0, y1, b_lo, b_hi, s_lo, s_hi)
        if len(xs) == 0 or len(ys) == 0:
            return [rect]
        # stretch the outer blocks to the district edge (no dead margin along arterials)
        xs[0], xe[-1], ys[0], ye[-1] = x0, x1, y0, y1
        for a, b in _gap_roads(xs, xe):
            self.add_road(d, a, y0, b, y1, cls)
        for a, b in _gap_roads(ys, ye):
            self.add_road(d, x0, a, x1, b, cls)
        return [(int(a), int(c), int(b), int(e)) for c, e in zip(ys, ye) for a, b in zip(xs, xe)]

    # -- district kinds ------------------------------------------------------------------------
    def fill_cbd(self, d, rect, dn):
        rng = self.rng
        for bx0, by0, bx1, by1 in self.block_grid(d, rect, 80, 140, 12, 16, R["street"]):
            r = rng.random()
            bw, bh = bx1 - bx0, by1 - by0
            if r < 0.08 or bw < 50 or bh < 50:  # public plaza with a kiosk
                self.pads.add(1, x0=bx0 + 4, y0=by0 + 4, x1=bx1 - 4, y1=by1 - 4, type=0, district=d)
                cx, cy = (bx0 + bx1) // 2, (by0 + by1) // 2
                self.add_buildings(d, "cbd", [cx - 6], [cy - 5], [cx + 6], [cy + 5], [5.0], U["commercial"])
                continue
            if r < 0.18:  # shopping mall: one big, mid-height box
                m = int(rng.integers(6, 13))
                self.add_buildings(d, "cbd", [bx0 + m], [by0 + m], [bx1 - m], [by1 - m],
                                   [float(rng.uniform(20, 42))], U["commercial"])
                continue
            # towers on a grid of ~65 m lots, three lots in four built
            nx, ny = max(1, round(bw / 65)), max(1, round(bh / 65))
            sw, sh = bw // nx, bh // ny
            cells = np.nonzero(rng.random(nx * ny) < 0.75)[0]
            k = len(cells)
            if k == 0:
                continue
            tw = rng.integers(26, max(27, min(58, sw - 8)), k)
            th = rng.integers(26, max(27, min(58, sh - 8)), k)
            tw, th = np.minimum(tw, sw - 8), np.minimum(th, sh - 8)
            cx0 = bx0 + (cells % nx) * sw
            cy0 = by0 + (cells // nx) * sh
            ox = (cx0 + (sw - tw) // 2 + rng.integers(-3, 4, k)).clip(cx0 + 4, cx0 + sw - tw - 4)
            oy = (cy0 + (sh - th) // 2 + rng.integers(-3, 4, k)).clip(cy0 + 4, cy0 + sh - th - 4)
            # taller towards the CBD centre: lognormal around 150 m, scaled by centrality
            h = np.exp(rng.normal(math.log(150.0), 0.4, k)) * (1.25 - 0.6 * min(dn, 1.0))
            h = np.clip(h, 60, 360).astype(np.float32)
            use = rng.choice([U["office"], U["residential"], U["hotel"], U["commercial"]], size=k,
                             p=[0.6, 0.22, 0.1, 0.08])
            podium = (rng.random(k) < 0.4) & (use != U["residential"])
            e = rng.integers(6, 17, k)
            if podium.any():
                px0 = np.maximum(ox - e, cx0 + 3)[podium]
                py0 = np.maximum(oy - e, cy0 + 3)[podium]
                px1 = np.minimum(ox + tw + e, cx0 + sw - 3)[podium]
                py1 = np.minimum(oy + th + e, cy0 + sh - 3)[podium]
                self.add_buildings(d, "cbd", px0, py0, px1, py1,
                                   rng.uniform(12, 22, int(podium.sum())), U["commercial"])
            self.add_buildings(d, "cbd", ox, oy, ox + tw, oy + th, h, use)

    def fill_residential(self, d, rect, kind):
        rng = self.rng
        for cx0, cy0, cx1, cy1 in self.block_grid(d, rect, 140, 240, 10, 14, R["street"]):
            w, h = cx1 - cx0, cy1 - cy0
            r = rng.random()
            if r < 0.12 and w >= 110 and h >= 130:  # school: sports field + teaching slab
                fx0, fy0 = cx0 + 8, cy1 - 8 - 100
                self.pads.add(1, x0=fx0, y0=fy0, x1=fx0 + 70, y1=fy0 + 100, type=1, district=d)
                self.add_buildings(d, kind, [cx0 + 8], [cy0 + 8], [cx1 - 8], [cy0 + 24],
                                   [float(rng.integers(3, 6) * STOREY_M)], U["public"])
                continue
            if r < 0.65:  # mid-rise slabs in east-west rows, spaced for winter sun
                floors = int(rng.integers(6, 12))
                hgt = floors * STOREY_M
                depth = int(rng.integers(11, 16))
                pitch = depth + int(hgt * rng.uniform(1.0, 1.3))
                rows = np.arange(cy0 + 8, cy1 - 8 - depth + 1, pitch)
                for ry in rows.tolist():
                    xs, xe = _partition(rng, cx0 + 8, cx1 - 8, 35, 70, 10, 18)
                    n = len(xs)
                    hh = (floors + rng.integers(-1, 2, n)) * STOREY_M
                    self.add_buildings(d, kind, xs, np.full(n, ry), xe, np.full(n, ry + depth), hh,
                                       U["residential"])
            else:  # high-rise point towers
                side = int(rng.integers(24, 33))
                floors = int(rng.integers(25, 35))
                hgt = floors * STOREY_M
                pitch = side + int(max(30.0, 0.6 * hgt))
                rows = np.arange(cy0 + 10, cy1 - 10 - side + 1, pitch)
                for ry in rows.tolist():
                    xs, xe = _partition(rng, cx0 + 10, cx1 - 10, side, side, 20, 36)
                    n = len(xs)
                    hh = (floors + rng.integers(-2, 3, n)) * STOREY_M
                    self.add_buildings(d, kind, xs, np.full(n, ry), xe, np.full(n, ry + side), hh,
                                       U["residential"])

    def fill_fabric(self, d, rect, kind):
        """Dense, irregular small-roof fabric of urban villages and old towns.

        Both kinds use the same footprint and alley distributions (which is why they look alike
        from above); old towns are a little lower and have a heritage compound with a plaza.
        """
        rng = self.rng
        uv = kind == "urban_village"
        f_lo, f_hi = (4, 9) if uv else (3, 7)
        p_pitched = 0.1 if uv else 0.3
        x0, y0, x1, y1 = rect
        heritage = None
        if not uv and (x1 - x0) > 120 and (y1 - y0) > 120:
            s = int(rng.integers(36, 56))
            hx = int(rng.integers(x0 + 20, x1 - 20 - s))
            hy = int(rng.integers(y0 + 20, y1 - 20 - s))
            heritage = (hx, hy, hx + s, hy + s)
        for bx0, by0, bx1, by1 in self.block_grid(d, rect, 70, 130, 4, 7, R["lane"]):
            rs, re_ = _partition(rng, by0 + 1, by1 - 1, 7, 14, 1, 3)
            for ry0, ry1 in zip(rs.tolist(), re_.tolist()):
                xs, xe = _partition(rng, bx0 + 1, bx1 - 1, 6, 15, 1, 3)
                n = len(xs)
                if n == 0:
                    continue
                # irregular edges: each side pulled in by 0-1 m, a few plots left open
                ax0 = xs + rng.integers(0, 2, n)
                ax1 = xe - rng.integers(0, 2, n)
                ay0 = ry0 + rng.integers(0, 2, n)
                ay1 = ry1 - rng.integers(0, 2, n)
                keep = rng.random(n) > 0.04
                if heritage is not None:
                    hx0, hy0, hx1, hy1 = heritage
                    keep &= ~((ax0 < hx1) & (ax1 > hx0) & (ay0 < hy1) & (ay1 > hy0))
                hh = rng.integers(f_lo, f_hi + 1, n) * STOREY_M + rng.uniform(0, 1.2, n)
                use = np.where(rng.random(n) < (0.88 if uv else 0.4), U["residential"],
                               U["commercial"])
                pitched = rng.random(n) < p_pitched
                k = keep
                self.add_buildings(d, kind, ax0[k], ay0[k], ax1[k], ay1[k], hh[k], use[k], pitched[k])
        if heritage is not None:
            hx0, hy0, hx1, hy1 = heritage
            self.pads.add(1, x0=hx0, y0=hy0, x1=hx1, y1=hy1, type=0, district=d)
            s = hx1 - hx0
            self.add_buildings(d, "old_town", [hx0 + s // 4], [hy0 + 4], [hx1 - s // 4], [hy0 + 4 + s // 3],
                               [float(rng.uniform(8, 12))], U["heritage"], True)

    def fill_industrial(self, d, rect):
        rng = self.rng
        for bx0, by0, bx1, by1 in self.block_grid(d, rect, 180, 320, 12, 18, R["street"]):
            rs, re_ = _partition(rng, by0 + 6, by1 - 6, 50, 120, 14, 28)
            for ry0, ry1 in zip(rs.tolist(), re_.tolist()):
                xs, xe = _partition(rng, bx0 + 6, bx1 - 6, 40, 160, 12, 30)
                n = len(xs)
                if n == 0:
                    continue
                use = rng.choice([U["industrial"], U["warehouse"], U["office"], U["residential"]],
                                 size=n, p=[0.55, 0.33, 0.06, 0.06])
                hh = np.where(use == U["industrial"], rng.uniform(7, 14, n),
                              np.where(use == U["warehouse"], rng.uniform(8, 16, n),
                                       np.where(use == U["office"], rng.uniform(15, 30, n),
                                                rng.integers(5, 8, n) * STOREY_M)))
                y0s = np.full(n, ry0)
                y1s = np.full(n, ry1)
                small = (use == U["office"]) | (use == U["residential"])  # dorms and offices: slabs
                xe = np.where(small, np.minimum(xe, xs + 45), xe)
                y1s = np.where(small, np.minimum(y1s, y0s + 15), y1s)
                self.add_buildings(d, "industrial", xs, y0s, xe, y1s, hh, use)

    def fill_suburb(self, d, rect):
        rng = self.rng
        x0, y0, x1, y1 = rect
        xs, xe = _partition(rng, x0, x1, 180, 280, 7, 9)
        ys, ye = _partition(rng, y0, y1, 60, 90, 7, 9)
        if len(xs) and len(ys):
            xs[0], xe[-1], ys[0], ye[-1] = x0, x1, y0, y1
            for a, b in _gap_roads(xs, xe):
                self.add_road(d, a, y0, b, y1, R["street"])
            for a, b in _gap_roads(ys, ye):
                self.add_road(d, x0, a, x1, b, R["lane"])
            blocks = [(int(a), int(c), int(b), int(e)) for c, e in zip(ys, ye) for a, b in zip(xs, xe)]
        else:
            blocks = [rect]
        for bx0, by0, bx1, by1 in blocks:
            for north in (True, False):
                hs, he = _partition(rng, bx0 + 4, bx1 - 4, 9, 15, 7, 14)
                n = len(hs)
                if n == 0:
                    continue
                depth = rng.integers(9, 14, n)
                setback = rng.integers(5, 9, n)
                ya = by0 + setback if north else by1 - setback - depth
                use = np.where(rng.random(n) < 0.95, U["residential"], U["commercial"])
                self.add_buildings(d, "suburb", hs, ya, he, ya + depth, rng.uniform(5, 9, n), use, True)

    def fill_park(self, d, rect):
        rng = self.rng
        x0, y0, x1, y1 = rect
        w, h = x1 - x0, y1 - y0
        lake = None
        if rng.random() < 0.6:
            lake = ((x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * w, (y0 + y1) / 2 + rng.uniform(-0.1, 0.1) * h,
                    rng.uniform(0.18, 0.32) * w, rng.uniform(0.18, 0.32) * h)
            self.lakes.add(1, cx=lake[0], cy=lake[1], rx=lake[2], ry=lake[3], district=d)
        # footpaths cross the park once each way (a lake hides them where they meet it)
        px = int(rng.integers(x0 + w // 5, x1 - w // 5))
        py = int(rng.integers(y0 + h // 5, y1 - h // 5))
        self.add_road(d, px, y0, px + 3, y1, R["path"])
        self.add_road(d, x0, py, x1, py + 3, R["path"])
        n = int(rng.integers(2, 7))
        cx = rng.uniform(x0 + 12, x1 - 24, n)
        cy = rng.uniform(y0 + 12, y1 - 24, n)
        if lake is not None:  # keep pavilions on dry land
            keep = ((cx - lake[0]) / (lake[2] + 25)) ** 2 + ((cy - lake[1]) / (lake[3] + 25)) ** 2 > 1
            cx, cy = cx[keep], cy[keep]
        n = len(cx)
        bw, bh = rng.integers(6, 14, n), rng.integers(6, 12, n)
        bx0, by0 = cx.astype(np.int64), cy.astype(np.int64)
        self.add_buildings(d, "park", bx0, by0, bx0 + bw, by0 + bh, rng.uniform(4, 7, n), U["public"], True)

    def fill_water(self, d, rect):
        rng = self.rng
        x0, y0, x1, y1 = rect
        w, h = x1 - x0, y1 - y0
        self.lakes.add(1, cx=(x0 + x1) / 2, cy=(y0 + y1) / 2, rx=rng.uniform(0.38, 0.45) * w,
                       ry=rng.uniform(0.38, 0.45) * h, district=d)


# Kind weights by normalised distance to the CBD centre (dn = metres / half the city width).
def _kind_weights(dn: float) -> np.ndarray:
    def bump(x, mu, sd):
        return math.exp(-0.5 * ((x - mu) / sd) ** 2)

    def ramp(x, a, b):
        return min(1.0, max(0.0, (x - a) / (b - a)))

    w = {
        "cbd": 6.0 * (1.0 - ramp(dn, 0.12, 0.35)),
        "residential": 3.0,
        "mixed_residential": 0.8,
        "urban_village": 2.6 * bump(dn, 0.45, 0.3),
        "old_town": 0.9 * (1.0 - ramp(dn, 0.4, 0.7)),
        "industrial": 2.8 * ramp(dn, 0.45, 0.95),
        "suburb": 2.2 * ramp(dn, 0.6, 1.1),
        "park": 0.6,
        "water": 0.25,
    }
    return np.array([w[k] for k in KINDS], dtype=np.float64)


def _arterial_cuts(rng, n):
    """Arterial positions along one axis: superblocks of 280-560 m (smaller in small cities, so a
    1 km city still holds several district kinds)."""
    lo = min(280, max(120, n // 4))
    cuts = [0]
    while True:
        nxt = cuts[-1] + int(rng.integers(lo, 2 * lo + 1))
        if n - nxt < lo:
            break
        cuts.append(nxt)
    cuts.append(n)
    return cuts


def _assign_kinds(rng, centres, cbd_xy, half):
    d = np.hypot(centres[:, 0] - cbd_xy[0], centres[:, 1] - cbd_xy[1])
    dn = d / half
    nd = len(d)
    kinds = np.empty(nd, dtype=np.int64)
    for i in range(nd):
        w = _kind_weights(float(dn[i]))
        kinds[i] = rng.choice(len(KINDS), p=w / w.sum())
    kinds[int(np.argmin(d))] = K["cbd"]  # the district at the centre is always the CBD
    # quotas: the key kinds must exist whenever the city has room for them
    need = ["urban_village", "residential"]
    if nd >= 9:
        need += ["old_town", "industrial", "park"]
    order = np.argsort(d, kind="stable")
    for kname in need:
        k = K[kname]
        if (kinds == k).any():
            continue
        counts = np.bincount(kinds, minlength=len(KINDS))
        w_k = np.array([_kind_weights(float(x))[k] for x in dn])
        cand = [i for i in order if kinds[i] != K["cbd"] and counts[kinds[i]] > 1
                and KINDS[kinds[i]] not in need]
        if not cand:
            cand = [i for i in order if kinds[i] != K["cbd"] and counts[kinds[i]] > 1]
        if not cand:
            continue
        best = max(cand, key=lambda i: (w_k[i], -i))
        kinds[best] = k
    return kinds, d


def build_layout(rng: np.random.Generator, size_px: int) -> Layout:
    """Draw the whole city layout (paper-independent substrate for the synthetic regions)."""
    n = int(size_px)
    half = n / 2.0
    sun = float(rng.uniform(38.0, 50.0))
    cbd_xy = (half + rng.uniform(-0.1, 0.1) * n, half + rng.uniform(-0.1, 0.1) * n)
    bld = _Builder(rng, n)

    xc, yc = _arterial_cuts(rng, n), _arterial_cuts(rng, n)
    wx = [int(rng.choice([24, 30, 36, 42])) for _ in xc[1:-1]]
    wy = [int(rng.choice([24, 30, 36, 42])) for _ in yc[1:-1]]
    for c, w in zip(xc[1:-1], wx):
        bld.add_road(-1, c - w // 2, 0, c - w // 2 + w, n, R["arterial"])
    for c, w in zip(yc[1:-1], wy):
        bld.add_road(-1, 0, c - w // 2, n, c - w // 2 + w, R["arterial"])

    def edges(cuts, widths):
        lo = [0] + [c - w // 2 + w for c, w in zip(cuts[1:-1], widths)]
        hi = [c - w // 2 for c, w in zip(cuts[1:-1], widths)] + [cuts[-1]]
        return lo, hi

    xlo, xhi = edges(xc, wx)
    ylo, yhi = edges(yc, wy)
    rects = [(xlo[i], ylo[j], xhi[i], yhi[j]) for j in range(len(ylo)) for i in range(len(xlo))]
    centres = np.array([((a + c) / 2, (b + e) / 2) for a, b, c, e in rects])
    kinds, dist = _assign_kinds(rng, centres, cbd_xy, half)

    for d, (rect, k) in enumerate(zip(rects, kinds.tolist())):
        kind = KINDS[k]
        if kind == "cbd":
            bld.fill_cbd(d, rect, float(dist[d] / half))
        elif kind in ("residential", "mixed_residential"):
            bld.fill_residential(d, rect, kind)
        elif kind in ("urban_village", "old_town"):
            bld.fill_fabric(d, rect, kind)
        elif kind == "industrial":
            bld.fill_industrial(d, rect)
        elif kind == "suburb":
            bld.fill_suburb(d, rect)
        elif kind == "park":
            bld.fill_park(d, rect)
        else:
            bld.fill_water(d, rect)

    buildings = bld.b.finish()
    buildings = _add_rooftop_details(rng, buildings, kinds)
    order = np.argsort(buildings["height"], kind="stable")
    buildings = {k: v[order] for k, v in buildings.items()}

    r = np.array(rects, dtype=np.int32).reshape(-1, 4)
    districts = {"x0": r[:, 0], "y0": r[:, 1], "x1": r[:, 2], "y1": r[:, 3],
                 "kind": kinds.astype(np.int8), "dist_cbd": dist.astype(np.float64)}
    counts = {k: int((kinds == i).sum()) for i, k in enumerate(KINDS)}
    return Layout(size_px=n, sun_elevation_deg=sun, cbd_xy=(float(cbd_xy[0]), float(cbd_xy[1])),
                  districts=districts, roads=bld.roads.finish(), buildings=buildings,
                  pads=bld.pads.finish(), lakes=bld.lakes.finish(), counts=counts)


def _add_rooftop_details(rng, b, kinds) -> dict:
    """Water tanks on village roofs and plant boxes on towers: small boxes that cast small shadows."""
    n = len(b["x0"])
    kind_of = kinds[b["district"]] if n else np.zeros(0, np.int64)
    w = b["x1"] - b["x0"]
    h = b["y1"] - b["y0"]
    fabric = np.isin(kind_of, [K["urban_village"], K["old_town"]])
    tall = b["height"] >= 30
    p = np.where(fabric, 0.35, np.where(tall, 0.8, 0.0))
    p = np.where(b["use"] == U["heritage"], 0.0, p)
    pick = (rng.random(n) < p) & (w >= 7) & (h >= 7)
    idx = np.nonzero(pick)[0]
    m = len(idx)
    big = tall[idx] & ~fabric[idx]
    dw = np.where(big, rng.integers(4, 9, m), rng.integers(2, 4, m))
    dh = np.where(big, rng.integers(4, 9, m), rng.integers(2, 4, m))
    dw = np.minimum(dw, w[idx] - 4)
    dh = np.minimum(dh, h[idx] - 4)
    fx = rng.random(m)
    fy = rng.random(m)
    x0 = b["x0"][idx] + 2 + (fx * (w[idx] - 4 - dw)).astype(np.int64)
    y0 = b["y0"][idx] + 2 + (fy * (h[idx] - 4 - dh)).astype(np.int64)
    det = {
        "x0": x0.astype(np.int32), "y0": y0.astype(np.int32),
        "x1": (x0 + dw).astype(np.int32), "y1": (y0 + dh).astype(np.int32),
        "height": (b["height"][idx] + np.where(big, rng.uniform(3, 5, m), rng.uniform(1.5, 2.5, m))).astype(np.float32),
        "use": np.full(m, U["detail"], np.int8), "district": b["district"][idx],
        "roof": _roof_colours(rng, "detail", m), "pitched": np.zeros(m, bool),
    }
    return {k: np.concatenate([b[k], det[k]]) for k in b}
