"""Similar places share a colour: the first three principal components (or UMAP when installed)
of the embeddings, each stretched to 0..255 between its 2nd and 98th percentile, as ``#rrggbb``."""
from __future__ import annotations

import numpy as np

from refound_core.errors import InputError

FIT_SAMPLE = 20000   # PCA is fitted on a sample, then every cell is projected in chunks
CHUNK = 16384


def components(table, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``[n, 3]`` float32 projection (NaN rows where there is no embedding)."""
    rows = np.nonzero(table.valid)[0]
    if rows.size < 3:
        raise InputError(f"{table.source}: only {rows.size} cells have embeddings; at least 3 are needed")
    out = np.full((len(table.cell_ids), 3), np.nan, dtype=np.float32)
    rng = np.random.default_rng(seed)
    fit_rows = rows if rows.size <= FIT_SAMPLE else np.sort(rng.choice(rows, FIT_SAMPLE, replace=False))
    if method == "pca":
        from sklearn.decomposition import PCA

        n_comp = min(3, table.dim, fit_rows.size)
        pca = PCA(n_comp, svd_solver="randomized", random_state=seed).fit(np.asarray(table.vectors[fit_rows]))
        for i in range(0, rows.size, CHUNK):
            r = rows[i:i + CHUNK]
            out[r, :n_comp] = pca.transform(np.asarray(table.vectors[r], dtype=np.float32))
        out[rows, n_comp:] = 0.0
    elif method == "umap":
        try:
            import umap  # optional: umap-learn
        except ImportError:
            raise InputError("UMAP colouring needs the umap-learn package; install it or use --method pca") from None
        reducer = umap.UMAP(n_components=3, random_state=seed).fit(np.asarray(table.vectors[fit_rows]))
        for i in range(0, rows.size, CHUNK):
            r = rows[i:i + CHUNK]
            out[r] = reducer.transform(np.asarray(table.vectors[r], dtype=np.float32))
    else:
        raise InputError(f"unknown colouring method {method!r}; use pca or umap")
    return out


def to_rgb(comp: np.ndarray) -> np.ndarray:
    """``[n, 3]`` uint8 (rows with NaN become 0)."""
    ok = np.isfinite(comp).all(axis=1)
    rgb = np.zeros(comp.shape, dtype=np.uint8)
    if ok.any():
        lo, hi = np.percentile(comp[ok], 2, axis=0), np.percentile(comp[ok], 98, axis=0)
        scaled = (comp[ok] - lo) / np.where(hi > lo, hi - lo, 1.0)
        rgb[ok] = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    return rgb


def hex_colours(rgb: np.ndarray, valid: np.ndarray) -> list:
    return [f"#{r:02x}{g:02x}{b:02x}" if v else None for (r, g, b), v in zip(rgb.tolist(), valid.tolist())]


def embedding_colours(table, method: str = "pca", seed: int = 0) -> dict:
    comp = components(table, method, seed)
    rgb = to_rgb(comp)
    return {"components": comp, "rgb": rgb, "colour": hex_colours(rgb, table.valid)}
