"""Cell results as QGIS features: the fields (the same names and order as the core's GeoPackage
writer, ``refound_core.inference.writers``, plus every extra per-cell output) and the features,
for the dock's layer and a Processing feature sink alike. Embeddings become ``emb_000...`` with
their first principal component as ``prediction`` (so the map shows structure).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from qgis.core import Qgis, QgsFeature, QgsField, QgsFields, QgsGeometry, QgsRectangle
from qgis.PyQt.QtCore import QMetaType, QVariant

from refound_core.inference.results import extra_columns

PREDICTION, CELL_ID, POI_COUNT, IMAGE_COVERAGE, IMAGE_USED, SUFFICIENT = (
    "prediction", "cell_id", "poi_count", "image_coverage", "image_used", "sufficient")
EMBEDDING_PREFIX = "emb_"


def _field_types() -> tuple:
    """(INT, DOUBLE, STRING, LONGLONG) field types: QMetaType from QGIS 3.38 on (QGIS 4's PyQt6
    has no QVariant.Type), QVariant.Type before (QgsField takes only those there)."""
    if Qgis.QGIS_VERSION_INT >= 33800:
        return QMetaType.Type.Int, QMetaType.Type.Double, QMetaType.Type.QString, QMetaType.Type.LongLong
    t = getattr(QVariant, "Type")  # noqa: B009 - only reached under PyQt5 (QGIS < 3.38)
    return t.Int, t.Double, t.String, t.LongLong


INT, DOUBLE, STRING, LONGLONG = _field_types()


def _get(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def extra_fields_of(cells: Sequence) -> list:
    """``[(name, field type)]`` of the per-cell outputs beyond the fixed fields, in order of
    first appearance: numbers double, booleans integer (1 / 0), anything else text."""
    kinds: dict = {}
    for c in cells:
        for name, v in extra_columns(c).items():
            if v is not None:
                kinds.setdefault(name, set()).add(type(v))
            else:
                kinds.setdefault(name, set())
    out = []
    for name, types in kinds.items():
        if types and types <= {bool}:
            out.append((name, INT))
        elif types and types <= {bool, int, float}:
            out.append((name, DOUBLE))
        else:
            out.append((name, STRING))
    return out


def result_fields(embedding_dim: int = 0, extras: Sequence = ()) -> QgsFields:
    # Same names and order as the core's GeoPackage writer (refound_core.inference.writers).
    fields = QgsFields()
    fields.append(QgsField(CELL_ID, STRING, "string", 80))
    fields.append(QgsField(PREDICTION, DOUBLE, "double", 20, 8))
    fields.append(QgsField(POI_COUNT, INT, "integer"))
    fields.append(QgsField(IMAGE_COVERAGE, DOUBLE, "double", 10, 4))
    fields.append(QgsField(IMAGE_USED, INT, "integer"))
    fields.append(QgsField(SUFFICIENT, INT, "integer"))
    for name, vtype in extras:
        fields.append(QgsField(name, vtype))
    for i in range(embedding_dim):
        fields.append(QgsField(f"{EMBEDDING_PREFIX}{i:03d}", DOUBLE, "double"))
    return fields


def _extra_value(v, vtype):
    if v is None:
        return None
    if vtype == INT:
        return int(bool(v))
    if vtype == DOUBLE:
        return _number(v)
    return str(v)


def _number(v) -> Optional[float]:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _vector(v) -> Optional[list]:
    """``v`` as a list of floats when it is a vector, else None."""
    if v is None or isinstance(v, (int, float, str)):
        return None
    try:
        return [float(x) for x in list(v)]
    except (TypeError, ValueError):
        return None


def _embedding(c) -> Optional[list]:
    """The cell's fused region embedding (CellResult.fused, or a vector ``value``), or None."""
    vec = _vector(_get(c, "fused"))
    return vec if vec is not None else _vector(_get(c, "value"))


def first_principal_component(vectors: Sequence[Optional[list]]) -> list:
    """PC1 score of each vector (None stays None); sign fixed so the largest loading is positive."""
    import numpy as np

    rows = [i for i, v in enumerate(vectors) if v is not None and all(math.isfinite(x) for x in v)]
    out: list = [None] * len(vectors)
    if not rows:
        return out
    x = np.asarray([vectors[i] for i in rows], dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if len(rows) == 1 or not np.any(x):
        for i in rows:
            out[i] = 0.0
        return out
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pc = vt[0] * (1.0 if vt[0][np.argmax(np.abs(vt[0]))] >= 0 else -1.0)
    for i, score in zip(rows, x @ pc):
        out[i] = float(score)
    return out


def make_features(cells: Iterable, fields: QgsFields, embedding_dim: int = 0, extras: Sequence = ()) -> list:
    """QgsFeatures for CellResult-like objects (``cell_id``, ``bounds``, ``value``,
    ``poi_count``, ``image_coverage``, ``sufficient``; ``fused`` for embeddings), with the
    ``extras`` of :func:`extra_fields_of` after the fixed fields."""
    cells = list(cells)
    vectors = [_embedding(c) for c in cells] if embedding_dim else []
    pc1 = first_principal_component(vectors) if embedding_dim else []
    feats = []
    for k, c in enumerate(cells):
        f = QgsFeature(fields)
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(*[float(v) for v in _get(c, "bounds")])))
        sufficient = bool(_get(c, "sufficient", True))
        if embedding_dim:
            value = pc1[k] if sufficient else None
        else:
            value = _number(_get(c, "value")) if sufficient else None
        attrs = [str(_get(c, "cell_id")), value, int(_get(c, "poi_count", 0) or 0),
                 float(_get(c, "image_coverage", 0.0) or 0.0), 1 if _get(c, "image_used", False) else 0,
                 1 if sufficient else 0]
        if extras:
            cols = extra_columns(c)
            attrs += [_extra_value(cols.get(name), vtype) for name, vtype in extras]
        if embedding_dim:
            vec = vectors[k] if sufficient else None
            attrs += (vec if vec is not None and len(vec) == embedding_dim else [None] * embedding_dim)
        f.setAttributes(attrs)
        feats.append(f)
    return feats


def embedding_dim_of(cells: Sequence) -> int:
    for c in cells:
        v = _embedding(c)
        if v is not None:
            return len(v)
    return 0
