"""RGB satellite-like image of the city at 1 m, rendered strip by strip with numpy.

Per strip of 256 rows (plus one margin row each side for the blur):
ground by district kind -> plazas/fields -> roads (with centre dashes) -> lakes (noisy shore)
-> roofs (one index map filled by slicing; edges and pitched halves shaded from it) -> trees
(thresholded smooth noise on open ground, with a height) -> shadows -> texture, sensor noise,
3x3 blur -> uint8.

Shadows: the sun stands due south at elevation e (noon, northern hemisphere), so shadows point
north (up the image) and a pixel is shaded when some surface south of it rises above the sun ray:
``S(r) = max(S(r+1), H(r+1)) - tan(e)`` (one row per step), shaded where ``S > H``. A building of
height h therefore casts a shadow h / tan(e) metres long: building height can be read from the
image. Strips are rendered from south to north so ``S`` carries over from the strip below.
"""
from __future__ import annotations

import numpy as np

from .layout import KINDS, R, Layout

STRIP = 256

# ground colour by district kind; index 0 is "no district" (under the arterials)
_GROUND = {"": (110, 108, 100), "cbd": (140, 138, 132), "residential": (102, 126, 80),
           "mixed_residential": (104, 124, 82), "urban_village": (118, 110, 98),
           "old_town": (122, 112, 98), "industrial": (158, 152, 138), "suburb": (106, 132, 78),
           "park": (92, 132, 68), "water": (96, 128, 74)}
GROUND_LUT = np.array([_GROUND[""]] + [_GROUND[k] for k in KINDS], dtype=np.float32)
# tree threshold on the canopy noise by kind (higher = fewer trees)
_TREES = {"": 99.0, "cbd": 1.3, "residential": 0.2, "mixed_residential": 0.4, "urban_village": 2.4,
          "old_town": 1.9, "industrial": 1.5, "suburb": 0.35, "park": -0.1, "water": 0.5}
TREE_LUT = np.array([_TREES[""]] + [_TREES[k] for k in KINDS], dtype=np.float32)
ROAD_RGB = np.array([(70, 70, 74), (86, 86, 89), (106, 102, 96), (192, 180, 152)], dtype=np.float32)
PLAZA_RGB = np.array((190, 184, 172), dtype=np.float32)
TRACK_RGB = np.array((168, 84, 70), dtype=np.float32)
PITCH_RGB = np.array((82, 140, 70), dtype=np.float32)
WATER_RGB = np.array((36, 66, 82), dtype=np.float32)
SAND_RGB = np.array((166, 158, 130), dtype=np.float32)
TREE_RGB = np.array((46, 76, 40), dtype=np.float32)
DASH_RGB = np.array((205, 204, 192), dtype=np.float32)
SHADOW_DARK = np.array((0.60, 0.56, 0.46), dtype=np.float32)  # blue survives in shadow (sky light)


class _Noise:
    """A smooth random field: a coarse normal grid (one value per ``cell`` m) read bilinearly."""

    def __init__(self, rng, n, cell):
        self.cell = cell
        self.grid = rng.standard_normal((n // cell + 3, n // cell + 3)).astype(np.float32)
        c = np.clip((np.arange(n) + 0.5) / cell - 0.5, 0, None)
        self.j0 = np.minimum(c.astype(np.int64), self.grid.shape[1] - 2)
        self.fc = (c - self.j0).astype(np.float32)

    def rows(self, a, b):
        r = np.clip((np.arange(a, b) + 0.5) / self.cell - 0.5, 0, None)
        i0 = np.minimum(r.astype(np.int64), self.grid.shape[0] - 2)
        fr = (r - i0).astype(np.float32)[:, None]
        g = self.grid[i0] * (1 - fr) + self.grid[i0 + 1] * fr
        return g[:, self.j0] * (1 - self.fc) + g[:, self.j0 + 1] * self.fc


class Renderer:
    """Renders ``layout`` strip by strip; ``strips()`` yields them from south to north."""

    def __init__(self, layout: Layout, rng: np.random.Generator):
        self.L = layout
        self.rng = rng
        n = layout.size_px
        self.n = n
        self.n_tree = _Noise(rng, n, 6)
        self.n_clump = _Noise(rng, n, 24)
        self.n16 = _Noise(rng, n, 16)
        self.n64 = _Noise(rng, n, 64)
        self.slope = np.float32(layout.shadow_slope)
        self._carry = None

    def strips(self, strip: int = STRIP):
        """Yield ``(row0, row1, uint8 [row1-row0, n, 3])`` for every strip, south first."""
        self._carry = None
        starts = list(range(0, self.n, strip))
        for r0 in reversed(starts):
            r1 = min(self.n, r0 + strip)
            yield r0, r1, self.render(r0, r1)

    # ------------------------------------------------------------------------------------------
    def render(self, r0: int, r1: int) -> np.ndarray:
        L, n = self.L, self.n
        a, b = max(0, r0 - 1), min(n, r1 + 1)
        h = b - a

        def rows_of(t):
            sel = np.nonzero((t["y0"] < b) & (t["y1"] > a))[0]
            return sel, [t[k][sel].tolist() for k in ("x0", "y0", "x1", "y1")]

        # 1. ground by district kind
        kind = np.zeros((h, n), np.int8)
        dsel, (dx0, dy0, dx1, dy1) = rows_of(L.districts)
        for i, x0, y0, x1, y1 in zip(dsel.tolist(), dx0, dy0, dx1, dy1):
            kind[max(y0, a) - a:min(y1, b) - a, x0:x1] = int(L.districts["kind"][i]) + 1
        rgb = GROUND_LUT[kind]
        n16 = self.n16.rows(a, b)
        open_ = np.ones((h, n), bool)
        row_idx = np.arange(a, b)

        # 2. pads: paved plazas (6 m paving grid) and school sports fields
        psel, (px0, py0, px1, py1) = rows_of(L.pads)
        for i, x0, y0, x1, y1 in zip(psel.tolist(), px0, py0, px1, py1):
            ya, yb = max(y0, a) - a, min(y1, b) - a
            if L.pads["type"][i] == 0:
                tile = np.where((row_idx[ya:yb] % 6) == 0, 0.9, 1.0).astype(np.float32)[:, None, None]
                rgb[ya:yb, x0:x1] = PLAZA_RGB * tile
            else:
                rgb[ya:yb, x0:x1] = TRACK_RGB
                iy0, iy1 = max(y0 + 8, a) - a, min(y1 - 8, b) - a
                if iy1 > iy0:
                    rgb[iy0:iy1, x0 + 8:x1 - 8] = PITCH_RGB
            open_[ya:yb, x0:x1] = False

        # 3. roads, with dashed centre lines on streets and arterials
        rsel, (rx0, ry0, rx1, ry1) = rows_of(L.roads)
        for i, x0, y0, x1, y1 in zip(rsel.tolist(), rx0, ry0, rx1, ry1):
            cls = int(L.roads["cls"][i])
            ya, yb = max(y0, a) - a, min(y1, b) - a
            rgb[ya:yb, x0:x1] = ROAD_RGB[cls]
            open_[ya:yb, x0:x1] = False
            if cls <= R["street"] and min(x1 - x0, y1 - y0) >= 10:
                if (y1 - y0) > (x1 - x0):  # north-south road: dashes along rows
                    c = (x0 + x1) // 2
                    on = ((row_idx[ya:yb] // 4) % 2) == 0
                    rgb[ya:yb, c][on] = DASH_RGB
                else:
                    cr = (y0 + y1) // 2
                    if a <= cr < b:
                        cols = np.arange(x0, x1)
                        cols = cols[((cols // 4) % 2) == 0]
                        rgb[cr - a, cols] = DASH_RGB

        # 4. lakes: ellipses with a noisy shore and a sand rim
        lk = L.lakes
        for i in range(len(lk["cx"])):
            cx, cy, rx, ry = (float(lk[k][i]) for k in ("cx", "cy", "rx", "ry"))
            y0, y1 = int(cy - ry * 1.3) - 1, int(cy + ry * 1.3) + 2
            x0, x1 = max(0, int(cx - rx * 1.3) - 1), min(n, int(cx + rx * 1.3) + 2)
            if y1 <= a or y0 >= b:
                continue
            ya, yb = max(y0, a) - a, min(y1, b) - a
            yy = (np.arange(ya, yb) + a + 0.5 - cy)[:, None] / ry
            xx = (np.arange(x0, x1) + 0.5 - cx)[None, :] / rx
            q = (xx * xx + yy * yy) - 0.12 * n16[ya:yb, x0:x1]
            water, rim = q < 1.0, (q >= 1.0) & (q < 1.06)
            sub = rgb[ya:yb, x0:x1]
            sub[rim] = SAND_RGB
            sub[water] = WATER_RGB * (0.8 + 0.25 * np.clip(q[water], 0, 1))[:, None]
            open_[ya:yb, x0:x1] &= ~(water | rim)

        # 5. roofs: an index map of the buildings (sorted by height, so taller ones win)
        B = L.buildings
        bsel, (bx0, by0, bx1, by1) = rows_of(B)
        bid = np.full((h, n), -1, np.int32)
        for i, x0, y0, x1, y1 in zip(bsel.tolist(), bx0, by0, bx1, by1):
            bid[max(y0, a) - a:min(y1, b) - a, x0:x1] = i
        isb = bid >= 0
        ids = bid[isb]
        H = np.zeros((h, n), np.float32)
        H[isb] = B["height"][ids]
        roof = B["roof"][ids].astype(np.float32)
        edge = np.zeros((h, n), bool)  # parapets: a darker rim where the roof id changes
        edge[1:] |= bid[1:] != bid[:-1]
        edge[:-1] |= bid[:-1] != bid[1:]
        edge[:, 1:] |= bid[:, 1:] != bid[:, :-1]
        edge[:, :-1] |= bid[:, :-1] != bid[:, 1:]
        shade = np.where(edge[isb], 0.8, 1.0).astype(np.float32)
        pitched = B["pitched"][ids]
        if pitched.any():  # ridge east-west: the sunlit south slope is brighter
            ri = np.nonzero(isb)[0][pitched] + a
            pid = ids[pitched]
            rel = (ri - B["y0"][pid]) / (B["y1"][pid] - B["y0"][pid])
            shade[pitched] *= np.where(rel < 0.5, 0.8, 1.07).astype(np.float32)
        rgb[isb] = roof * shade[:, None]
        open_ &= ~isb

        # 6. trees on open ground: smooth canopy noise above a kind-dependent threshold
        t = 0.8 * self.n_tree.rows(a, b) + 0.8 * self.n_clump.rows(a, b)
        excess = t - TREE_LUT[kind]
        tree = open_ & (excess > 0)
        ex = excess[tree]
        rgb[tree] = TREE_RGB * (0.8 + 0.35 * np.clip(ex, 0, 1))[:, None]
        H[tree] = 5.0 + np.minimum(8.0 * ex, 9.0)

        # 7. shadows: sweep north from the strip below (see module docstring)
        S = np.empty((h, n), np.float32)
        S[h - 1] = self._carry if (b > r1 and self._carry is not None) else -1e9
        for k in range(h - 2, -1, -1):
            np.maximum(S[k + 1], H[k + 1], out=S[k])
            S[k] -= self.slope
        self._carry = S[r0 - a].copy()
        depth = np.clip((S - H) * (1.0 / 1.5), 0.0, 1.0)
        rgb *= 1.0 - depth[..., None] * SHADOW_DARK

        # 8. texture (low-frequency tone), sensor noise, slight optical blur
        tone = 1.0 + 0.045 * n16 + 0.035 * self.n64.rows(a, b)
        rgb *= tone[..., None]
        rgb += self.rng.standard_normal(rgb.shape, dtype=np.float32) * 3.0
        rgb = _blur3(rgb)
        out = rgb[r0 - a:r1 - a]
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _blur3(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over rows and columns (edges replicated)."""
    y = x * 0.5
    y[1:] += 0.25 * x[:-1]
    y[:-1] += 0.25 * x[1:]
    y[0] += 0.25 * x[0]
    y[-1] += 0.25 * x[-1]
    z = y * 0.5
    z[:, 1:] += 0.25 * y[:, :-1]
    z[:, :-1] += 0.25 * y[:, 1:]
    z[:, 0] += 0.25 * y[:, 0]
    z[:, -1] += 0.25 * y[:, -1]
    return z
