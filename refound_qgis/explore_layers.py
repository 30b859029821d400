"""QGIS layers <-> ``refound_core.explore``: an embedding layer (``emb_000...`` fields, any provider)
as an ``EmbeddingTable``, and a result as a styled memory layer or GeoPackage.

Inside QGIS the results are built and written with QGIS's own geometry and writer, not shapely /
GDAL wheels: in ``qgis_process`` shapely's calls resolve into QGIS's older GEOS and fail ("WKB
output dimension must be 2 or 3", then a crash).
"""
from __future__ import annotations

import numpy as np
from qgis.core import QgsFeature, QgsField, QgsGeometry, QgsVectorLayer
from qgis.PyQt.QtCore import QVariant

from refound_core.errors import InputError

from . import explore_styles
from .features import DOUBLE, INT, STRING
from .results import write_styled_gpkg
from .settings import tr


def read_table(path: str, column: str = "fused"):
    """A GeoParquet through the core reader (pyarrow only); anything else through QGIS's provider."""
    if path.lower().endswith((".parquet", ".geoparquet")):
        from refound_core.explore.io import read_embeddings

        return read_embeddings(path, column)
    if not os.path.exists(path.split("|")[0]):
        raise InputError(tr("embedding layer {p} does not exist").format(p=path))
    layer = QgsVectorLayer(path, os.path.basename(path), "ogr")
    if not layer.isValid():
        raise InputError(tr("cannot open embedding layer {p}").format(p=path))
    table = table_from_layer(layer)
    table.source = path
    del layer
    return table


def cells_in_polygon(table, wkt: str) -> list:
    """Ids of the cells whose polygon intersects a WKT polygon (layer CRS), with QGIS geometry."""
    poly = QgsGeometry.fromWkt(wkt)
    if poly.isNull():
        raise InputError(tr("the query polygon is not valid WKT: {w}").format(w=wkt[:60]))
    out = []
    for cid, wkb in zip(table.cell_ids, table.geometry):
        g = QgsGeometry()
        g.fromWkb(wkb)
        if g.intersects(poly):
            out.append(str(cid))
    return out


def table_from_layer(layer: QgsVectorLayer):
    """The layer's ``emb_000...`` fields as a core ``EmbeddingTable`` (any provider, memory too)."""
    from refound_core.explore.io import EMB_FIELD, EmbeddingTable, _check_rows

    names = [f.name() for f in layer.fields()]
    emb = sorted((int(m.group(1)), n) for n in names if (m := EMB_FIELD.match(n)))
    if not emb or "cell_id" not in names:
        raise InputError(tr("layer {l} has no cell_id and emb_000... fields; compute region embeddings first")
                         .format(l=layer.name()))
    idx = [layer.fields().indexOf(n) for _, n in emb]
    ids, rows, geoms = [], [], []
    for f in layer.getFeatures():
        attrs = f.attributes()
        ids.append(str(f["cell_id"]))
        rows.append([np.nan if attrs[i] is None or attrs[i] == QVariant() else float(attrs[i]) for i in idx])
        geoms.append(bytes(f.geometry().asWkb()))
    if not ids:
        raise InputError(tr("layer {l} has no cells").format(l=layer.name()))
    mat = np.asarray(rows, dtype=np.float32)
    valid = _check_rows(mat, layer.name())
    return EmbeddingTable(layer.name(), np.asarray(ids, dtype=object), mat, valid, np.asarray(geoms, dtype=object),
                          layer.crs().authid(), column="emb")


def result_layer(table, columns: dict, title: str, kind: str, cell_ids=None, geometry=None) -> QgsVectorLayer:
    """A memory polygon layer: cell_id + ``columns`` (float, int, bool or str arrays), styled."""
    layer = QgsVectorLayer(f"Polygon?crs={table.crs}", title, "memory")
    types = {}
    fields = [QgsField("cell_id", STRING)]
    for name, values in columns.items():
        a = np.asarray(values)
        types[name] = (DOUBLE if a.dtype.kind == "f" else INT if a.dtype.kind in "iub" else STRING)
        fields.append(QgsField(name, types[name]))
    layer.dataProvider().addAttributes(fields)
    layer.updateFields()
    feats = []
    ids = table.cell_ids if cell_ids is None else cell_ids
    geometry = table.geometry if geometry is None else geometry
    for i, cid in enumerate(ids):
        f = QgsFeature(layer.fields())
        g = QgsGeometry()
        g.fromWkb(geometry[i])
        f.setGeometry(g)
        vals = [str(cid)]
        for name, values in columns.items():
            v = values[i]
            if types[name] == DOUBLE:
                vals.append(None if not np.isfinite(v) else float(v))
            elif types[name] == INT:
                vals.append(int(v))
            else:
                vals.append(v)
        f.setAttributes(vals)
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    layer.updateExtents()
    explore_styles.style_layer(layer, kind)
    return layer


def write_gpkg(table, columns: dict, path: str, title: str, kind: str, cell_ids=None, geometry=None) -> str:
    """The result as a GeoPackage, written atomically with its style stored as the default."""
    if not path.lower().endswith(".gpkg"):
        raise InputError(tr("output {p} must be a .gpkg file").format(p=path))
    layer = result_layer(table, columns, title, kind, cell_ids, geometry)
    return write_styled_gpkg(layer, path, "explore", lambda written: explore_styles.style_layer(written, kind),
                             title, "ReFound explore style")


def poi_points(source, crs: str, category_field: str, transform_context) -> tuple:
    """``(xy in crs, categories)`` of a POI layer or feature source, for the cluster summary's top
    categories (refound_core.explore.poi_categories)."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform

    idx = source.fields().indexOf(category_field)
    if idx < 0:
        raise InputError(tr("The POI layer has no field '{f}'; its fields are {names}.").format(
            f=category_field, names=", ".join(source.fields().names())))
    xf = QgsCoordinateTransform(source.sourceCrs(), QgsCoordinateReferenceSystem(crs), transform_context)
    xy, cats = [], []
    for f in source.getFeatures():
        g = f.geometry()
        if g is None or g.isEmpty():
            continue
        p = xf.transform(g.pointOnSurface().asPoint())
        xy.append((p.x(), p.y()))
        cats.append(f.attribute(idx))
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2), cats
