"""Which cells look like these? Cosine similarity of every cell to the mean direction of the query
cells' embeddings, computed in chunks (bounded memory for 100k x 768 memmaps)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from refound_core.errors import InputError

CHUNK = 16384


def query_rows(table, cell_ids: Sequence[str] = (), polygon=None) -> np.ndarray:
    """Row indices of the query: cells named by id, and/or cells whose polygon intersects ``polygon``
    (a shapely geometry in the layer's CRS). Empty or embedding-less queries are errors."""
    rows = []
    if cell_ids:
        index = {str(c): i for i, c in enumerate(table.cell_ids)}
        missing = [c for c in cell_ids if str(c) not in index]
        if missing:
            raise InputError(f"query cells {missing[:5]} are not in {table.source}")
        rows += [index[str(c)] for c in cell_ids]
    if polygon is not None:
        import shapely

        hit = shapely.intersects(shapely.from_wkb(table.geometry), polygon)
        rows += np.nonzero(hit)[0].tolist()
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        raise InputError("empty query: select, draw or name at least one cell of the embedding layer")
    usable = rows[table.valid[rows]]
    if usable.size == 0:
        raise InputError(f"none of the {rows.size} query cells has an embedding (insufficient cells); "
                         "pick cells with POIs or imagery")
    return usable


def unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def query_vector(table, rows: np.ndarray) -> np.ndarray:
    """The mean of the query cells' unit embeddings, normalised (each query cell weighs the same)."""
    q = unit(np.asarray(table.vectors[rows], dtype=np.float32)).mean(axis=0)
    if not np.linalg.norm(q) > 0:
        raise InputError("the query cells' embeddings cancel out; pick fewer or more alike cells")
    return unit(q).astype(np.float32)


def cosine_to(table, q: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Cosine similarity of every row to unit vector ``q``; NaN where the cell has no embedding."""
    out = np.full(len(table.cell_ids), np.nan, dtype=np.float32)
    for i in range(0, len(out), chunk):
        block = np.asarray(table.vectors[i:i + chunk], dtype=np.float32)
        s = unit(block) @ q
        out[i:i + chunk] = np.where(table.valid[i:i + chunk], s, np.nan)
    return out


def top_k(similarity: np.ndarray, k: int, exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows of the ``k`` most similar cells, best first (NaN and ``exclude`` rows never count)."""
    s = np.where(np.isfinite(similarity), similarity, -np.inf)
    if exclude is not None:
        s = s.copy()
        s[exclude] = -np.inf
    k = int(min(k, np.isfinite(s).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-s, k - 1)[:k]
    return part[np.argsort(-s[part], kind="stable")]


def find_similar(table, cell_ids=(), polygon=None, k: int = 20, target=None) -> dict:
    """Similarity of ``target`` (default: the same layer) to the query cells of ``table``.

    Returns ``similarity`` (per target row), ``rank`` (1 = most similar, 0 = no embedding),
    ``top`` (the top-k target rows, query cells excluded when target is the query layer) and ``query``.
    """
    from refound_core.explore.io import check_compatible

    rows = query_rows(table, cell_ids, polygon)
    q = query_vector(table, rows)
    tgt = table if target is None else target
    if target is not None:
        check_compatible(table, target, same_grid=False)
    sim = cosine_to(tgt, q)
    rank = np.zeros(len(sim), dtype=np.int64)
    order = top_k(sim, len(sim))
    rank[order] = np.arange(1, len(order) + 1)
    top = top_k(sim, k, exclude=rows if target is None else None)
    return {"similarity": sim, "rank": rank, "top": top, "query": rows}
