"""Z-ordering of the POIs of a region (paper 4.1.1, "POI-level" position embedding).

The paper serialises a region's POIs so that geographically close POIs sit close in the sequence:
the region is rasterised into 1 m x 1 m units, each unit gets the Z-value (Morton code) of its
(column, row), POIs take the value of their unit, and POIs sharing a unit are ordered randomly.

The official preprocessing that did this was never released (SEMANTICS.md 2.1), so the exact key
is our choice (docs/DATA-SEQUENCE.md): column bits in the even bit positions, row bits in the odd
ones, row counted from the region's *north* edge (row 0 = top, like image rows and the grid-level
position). With this key the worked example of SEMANTICS.md 2.4 comes out in its file order.
"""
from __future__ import annotations

import numpy as np

_MAX_COORD = np.uint64(0xFFFFFFFF)  # 32 bits per axis -> 64-bit keys
_SPREAD_STEPS = [
    (np.uint64(16), np.uint64(0x0000FFFF0000FFFF)),
    (np.uint64(8), np.uint64(0x00FF00FF00FF00FF)),
    (np.uint64(4), np.uint64(0x0F0F0F0F0F0F0F0F)),
    (np.uint64(2), np.uint64(0x3333333333333333)),
    (np.uint64(1), np.uint64(0x5555555555555555)),
]


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Move bit i of each 32-bit value to bit 2i (classic 'part1by1', vectorised on uint64)."""
    v = v & _MAX_COORD
    for shift, mask in _SPREAD_STEPS:
        v = (v | (v << shift)) & mask
    return v


def morton_keys(cols, rows) -> np.ndarray:
    """Morton (Z-order) key of integer cells: column bits at even, row bits at odd positions.

    ``cols``, ``rows``: non-negative integers < 2**32 (array-like). Returns ``uint64``.
    """
    cols = np.asarray(cols, dtype=np.uint64)
    rows = np.asarray(rows, dtype=np.uint64)
    return _spread_bits(cols) | (_spread_bits(rows) << np.uint64(1))


def zorder_units(local_xy_m: np.ndarray, unit_m: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) of the ``unit_m`` raster unit holding each point, as ``uint64``.

    ``local_xy_m[:, 0]`` is metres east of the region's west edge, ``local_xy_m[:, 1]`` metres south
    of its north edge. Points slightly outside the region (source rounding) are clamped onto it.
    """
    xy = np.asarray(local_xy_m, dtype=np.float64).reshape(-1, 2)
    cells = np.floor(xy / float(unit_m))
    cells = np.clip(cells, 0.0, float(_MAX_COORD))  # also maps NaN-free negatives to 0
    return cells[:, 0].astype(np.uint64), cells[:, 1].astype(np.uint64)


def zorder_permutation(local_xy_m: np.ndarray, rng: np.random.Generator, unit_m: float = 1.0) -> np.ndarray:
    """Order of the points along the Z-curve (paper 4.1.1): ``out[j]`` = index of the j-th POI.

    Points in the same unit are ordered randomly with ``rng`` (paper: "we randomly set the order
    between them"); ``rng`` is always advanced by the same amount for a given N, so results are
    reproducible from a seed and independent of the input order when no two points share a unit.
    """
    cols, rows = zorder_units(local_xy_m, unit_m)
    keys = morton_keys(cols, rows)
    tie_break = rng.permutation(keys.shape[0])
    return np.lexsort((tie_break, keys)).astype(np.int64)  # last key = primary
