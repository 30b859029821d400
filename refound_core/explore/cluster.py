"""What kinds of places does this city have? k-means typology of region embeddings (k chosen by
silhouette on a sample when not given) or HDBSCAN, plus a per-cluster summary."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from refound_core.errors import InputError
from refound_core.explore.similar import unit

K_RANGE = range(2, 11)
SAMPLE = 4000      # silhouette is O(n^2): score candidate k on a sample
FIT_SAMPLE = 50000  # k-means is fitted on at most this many cells, then every cell is assigned


def _valid_unit(table, rows: np.ndarray) -> np.ndarray:
    return unit(np.asarray(table.vectors[rows], dtype=np.float32))


def choose_k(x: np.ndarray, seed: int = 0, k_range=K_RANGE) -> tuple:
    """The k of ``k_range`` with the best silhouette (cosine, i.e. on unit vectors) and all scores."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    s = x if len(x) <= SAMPLE else x[rng.choice(len(x), SAMPLE, replace=False)]
    scores = {}
    for k in k_range:
        if k >= len(s):
            break
        labels = KMeans(k, n_init=3, random_state=seed).fit_predict(s)
        if len(set(labels)) > 1:
            scores[k] = float(silhouette_score(s, labels))
    if not scores:
        raise InputError(f"too few cells with embeddings ({len(x)}) to cluster; at least 3 are needed")
    return max(scores, key=scores.get), scores


def cluster(table, k: Optional[int] = None, method: str = "kmeans", seed: int = 0,
            min_cluster_size: int = 5, attributes: Sequence[str] = (), pois: Optional[tuple] = None) -> dict:
    """Cluster id per row (-1: no embedding or HDBSCAN noise), the k used, silhouette scores and a
    summary list of ``{cluster, size, mean_<attribute>..., top_poi_categories}``; the last only
    when ``pois = (xy in the layer's CRS, categories)`` is given (poi_categories)."""
    rows = np.nonzero(table.valid)[0]
    if rows.size < 3:
        raise InputError(f"{table.source}: only {rows.size} cells have embeddings; at least 3 are needed to cluster")
    x = _valid_unit(table, rows)
    labels = np.full(len(table.cell_ids), -1, dtype=np.int64)
    scores = {}
    if method == "kmeans":
        from sklearn.cluster import KMeans

        if k is None:
            k, scores = choose_k(x, seed)
        if not 2 <= k <= rows.size:
            raise InputError(f"k={k} must be between 2 and the number of cells with embeddings ({rows.size})")
        rng = np.random.default_rng(seed)
        fit = x if len(x) <= FIT_SAMPLE else x[rng.choice(len(x), FIT_SAMPLE, replace=False)]
        km = KMeans(k, n_init=4, random_state=seed).fit(fit)
        labels[rows] = km.predict(x)
    elif method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        labels[rows] = HDBSCAN(min_cluster_size=int(min_cluster_size)).fit_predict(x)
        k = int(labels.max() + 1)
    else:
        raise InputError(f"unknown clustering method {method!r}; use kmeans or hdbscan")
    missing = [a for a in attributes if a not in table.attributes]
    if missing:
        raise InputError(f"attributes {missing} are not numeric fields of {table.source}; "
                         f"it has {sorted(table.attributes)}")
    top = {}
    if pois is not None:
        from .poi_categories import poi_rows, top_categories

        top = top_categories(labels, poi_rows(table, pois[0]), pois[1])
    summary = []
    for c in sorted(set(labels[rows].tolist())):
        m = labels == c
        row = {"cluster": int(c), "size": int(m.sum())}
        for a in attributes:
            row[f"mean_{a}"] = float(np.nanmean(table.attributes[a][m]))
        if pois is not None:
            row["top_poi_categories"] = ", ".join(f"{cat} ({n})" for cat, n in top.get(int(c), []))
        summary.append(row)
    return {"cluster": labels, "k": int(k), "silhouette": scores, "summary": summary}
