"""Where did things change? Two embedding layers of the same grid (two image dates, two POI
snapshots): cosine distance per cell present in both, its rank (1 = most changed), and a status
for cells present in one layer only or without an embedding in either."""
from __future__ import annotations

import numpy as np

from refound_core.errors import InputError
from refound_core.explore.io import check_compatible
from refound_core.explore.similar import CHUNK, unit

STATUS_BOTH, STATUS_ONLY_A, STATUS_ONLY_B, STATUS_NO_EMBEDDING = "both", "only_first", "only_second", "no_embedding"


def compare(a, b) -> dict:
    """Rows are the union of both layers' cells (a's order, then b's extra cells).

    Returns ``cell_ids``, ``geometry``, ``distance`` (NaN unless both have an embedding), ``rank``
    (0 where no distance) and ``status``.
    """
    check_compatible(a, b, same_grid=True)
    ib = {str(c): i for i, c in enumerate(b.cell_ids)}
    ia = {str(c): i for i, c in enumerate(a.cell_ids)}
    a_in_b = np.array([ib.get(str(c), -1) for c in a.cell_ids], dtype=np.int64)
    only_b = np.array([i for i, c in enumerate(b.cell_ids) if str(c) not in ia], dtype=np.int64)
    if not (a_in_b >= 0).any():
        raise InputError(f"{a.source} and {b.source} share no cell; compare needs two layers over the same area")
    n = len(a.cell_ids) + len(only_b)
    dist = np.full(n, np.nan, dtype=np.float32)
    status = np.full(n, STATUS_ONLY_A, dtype=object)
    status[len(a.cell_ids):] = STATUS_ONLY_B
    both = np.nonzero(a_in_b >= 0)[0]
    status[both] = STATUS_NO_EMBEDDING
    usable = both[a.valid[both] & b.valid[a_in_b[both]]]
    for i in range(0, usable.size, CHUNK):
        r = usable[i:i + CHUNK]
        va = unit(np.asarray(a.vectors[r], dtype=np.float32))
        vb = unit(np.asarray(b.vectors[a_in_b[r]], dtype=np.float32))
        dist[r] = 1.0 - np.einsum("ij,ij->i", va, vb)
    status[usable] = STATUS_BOTH
    rank = np.zeros(n, dtype=np.int64)
    order = usable[np.argsort(-dist[usable], kind="stable")]
    rank[order] = np.arange(1, order.size + 1)
    ids = np.concatenate([a.cell_ids, b.cell_ids[only_b]])
    geom = np.concatenate([a.geometry, b.geometry[only_b]])
    return {"cell_ids": ids, "geometry": geom, "distance": dist, "rank": rank, "status": status}
