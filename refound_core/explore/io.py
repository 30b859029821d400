"""Read embedding layers into float32 arrays; write result layers atomically.

Two layouts are read: the GeoParquet of ``refound embed`` (``fixed_size_list<float32>`` columns
``h_P`` / ``h_S`` / ``fused``, provenance in the ``refound`` schema metadata) and a GeoPackage (or
any OGR layer) whose embedding is spread over numeric fields ``emb_000``, ``emb_001``... (the
plugin's ``compute_region_embeddings``). Large tables go to a float32 memmap in a temporary file
(bounded memory: one row group / field at a time is decoded). Cells without an embedding (all NaN
or NULL: insufficient cells) are kept, marked in ``valid``, and get NULL results.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from refound_core.errors import InputError

EMB_FIELD = re.compile(r"^emb_(\d+)$")
# Above this many bytes the matrix lives in a memmap instead of RAM (100k x 768 float32 = 307 MB).
MEMMAP_BYTES = 64 * 1024 * 1024
BATCH_ROWS = 2048


@dataclass
class EmbeddingTable:
    """One embedding layer: ``vectors[i]`` is the embedding of cell ``cell_ids[i]``."""

    source: str
    cell_ids: np.ndarray          # str, one per row
    vectors: np.ndarray           # float32 [n, d] (maybe a memmap); NaN rows where not valid
    valid: np.ndarray             # bool [n]: the row has a finite embedding
    geometry: np.ndarray          # WKB bytes per row
    crs: str
    model: str = ""
    column: str = "fused"
    attributes: dict = field(default_factory=dict)   # other numeric columns (for cluster summaries)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def grid(self) -> str:
        """The grid a cell id names (``CRS/cell_size``, refound_core.data.grid's id form)."""
        return grid_of(self.cell_ids)


def grid_of(cell_ids) -> str:
    grids = {str(c).rsplit("/", 1)[0] for c in cell_ids[:1000]}
    return ",".join(sorted(grids))


def _matrix(n: int, d: int) -> np.ndarray:
    if n * d * 4 <= MEMMAP_BYTES:
        return np.empty((n, d), dtype=np.float32)
    fd, path = tempfile.mkstemp(prefix="refound-emb-", suffix=".f32")
    os.close(fd)
    m = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    os.unlink(path)  # the mapping keeps the data; nothing is left behind on exit
    return m


def read_embeddings(path, column: str = "fused", layer: Optional[str] = None) -> EmbeddingTable:
    """Read an embedding layer; one clear :class:`InputError` for each kind of bad input."""
    p = Path(str(path).split("|")[0])
    if not p.exists():
        raise InputError(f"embedding layer {p} does not exist; write one with `refound embed`")
    if p.suffix.lower() in (".parquet", ".geoparquet"):
        table = _read_parquet(p, column)
    else:
        table = _read_ogr(p, layer)
    if len(table.cell_ids) == 0:
        raise InputError(f"embedding layer {p} has no cells")
    if not table.valid.any():
        raise InputError(f"no cell of {p} has an embedding (all NULL): run `refound embed` over an area with "
                         "POIs or imagery")
    return table


def _check_rows(mat: np.ndarray, source) -> np.ndarray:
    finite = np.isfinite(mat)
    full, empty = finite.all(axis=1), ~finite.any(axis=1)
    bad = ~(full | empty)
    if bad.any():
        raise InputError(f"{source}: {int(bad.sum())} cells have partly NULL/NaN embeddings (first row "
                         f"{int(np.nonzero(bad)[0][0])}); the layer is damaged, recompute it with `refound embed`")
    return full


def _read_parquet(p: Path, column: str) -> EmbeddingTable:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(str(p))
    schema = pf.schema_arrow
    names = schema.names
    if column not in names:
        have = [n for n in names if pa.types.is_fixed_size_list(schema.field(n).type)]
        raise InputError(f"{p} has no embedding column {column!r}; it has {have or 'none'} (pass --column)")
    ftype = schema.field(column).type
    if not pa.types.is_fixed_size_list(ftype):
        raise InputError(f"{p}: column {column!r} is not a fixed-size list of floats (not a `refound embed` file)")
    if "cell_id" not in names or "geometry" not in names:
        raise InputError(f"{p} lacks cell_id or geometry columns (not a `refound embed` file)")
    meta = schema.metadata or {}
    prov = json.loads(meta.get(b"refound", b"{}") or b"{}")
    geo = json.loads(meta.get(b"geo", b"{}") or b"{}")
    crs = prov.get("grid_crs") or _crs_from_geo(geo)
    n, d = pf.metadata.num_rows, ftype.list_size
    mat = _matrix(n, d)
    ids, geoms, attrs = [], [], {}
    numeric = [f.name for f in schema if f.name not in ("cell_id", "geometry") and
               (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))]
    row = 0
    # small record batches, not whole row groups: decoding a list column costs several times its size
    for t in pf.iter_batches(batch_size=BATCH_ROWS, columns=["cell_id", "geometry", column] + numeric):
        k = t.num_rows
        col = t.column(column)
        # .values holds every slot, NULL lists included, so rows stay aligned; NULL rows become NaN
        values = col.values.to_numpy(zero_copy_only=False)[col.offset * d:(col.offset + k) * d]
        block = values.astype(np.float32, copy=False).reshape(k, d)
        if col.null_count:
            block = block.copy()
            block[col.is_null().to_numpy(zero_copy_only=False)] = np.nan
        mat[row:row + k] = block
        ids.append(np.asarray(t.column("cell_id").to_pylist(), dtype=object))
        geoms.append(np.asarray(t.column("geometry").to_pylist(), dtype=object))
        for a in numeric:
            attrs.setdefault(a, []).append(t.column(a).to_numpy(zero_copy_only=False).astype(np.float64))
        row += k
    valid = _check_rows_chunked(mat, p)
    return EmbeddingTable(str(p), np.concatenate(ids), mat, valid, np.concatenate(geoms), crs,
                          model=str(prov.get("model") or ""), column=column,
                          attributes={a: np.concatenate(v) for a, v in attrs.items()})


def _check_rows_chunked(mat, source, chunk: int = 16384) -> np.ndarray:
    return np.concatenate([_check_rows(np.asarray(mat[i:i + chunk]), source) for i in range(0, len(mat), chunk)]
                          or [np.zeros(0, bool)])


def _crs_from_geo(geo: dict) -> str:
    try:
        import pyproj

        crs = pyproj.CRS.from_json_dict(geo["columns"][geo.get("primary_column", "geometry")]["crs"])
        auth = crs.to_authority()
        return f"{auth[0]}:{auth[1]}" if auth else crs.to_wkt()
    except Exception:  # noqa: BLE001 - no CRS recorded: the cell ids still name the grid
        return ""


def _read_ogr(p: Path, layer: Optional[str]) -> EmbeddingTable:
    import pyogrio

    try:
        info = pyogrio.read_info(str(p), layer=layer)
    except Exception as exc:  # noqa: BLE001 - GDAL's message names the problem
        raise InputError(f"cannot read embedding layer {p}: {exc}") from None
    fields = list(info["fields"])
    emb = sorted((int(m.group(1)), f) for f in fields if (m := EMB_FIELD.match(f)))
    if not emb:
        raise InputError(f"{p} has no embedding fields emb_000...; compute them with refound:compute_region_embeddings")
    if [i for i, _ in emb] != list(range(len(emb))):
        raise InputError(f"{p}: embedding fields are not emb_000..emb_{len(emb) - 1:03d} without gaps")
    if "cell_id" not in fields:
        raise InputError(f"{p} has no cell_id field (not a ReFound layer)")
    meta, table = pyogrio.read_arrow(str(p), layer=layer)
    n, d = table.num_rows, len(emb)
    mat = _matrix(n, d)
    for j, (_, f) in enumerate(emb):  # one field at a time: bounded extra memory
        mat[:, j] = table.column(f).to_numpy(zero_copy_only=False).astype(np.float32)
    geom_col = meta.get("geometry_name") or "wkb_geometry"
    if geom_col not in table.column_names:
        geom_col = [c for c in table.column_names if c not in fields][-1]
    numeric = [f for f, t in zip(info["fields"], info["dtypes"]) if not EMB_FIELD.match(f) and
               str(t).startswith(("int", "float", "uint"))]
    crs = meta.get("crs") or ""
    valid = _check_rows_chunked(mat, p)
    return EmbeddingTable(str(p), np.asarray(table.column("cell_id").to_pylist(), dtype=object), mat, valid,
                          np.asarray(table.column(geom_col).to_pylist(), dtype=object), crs, model="", column="emb",
                          attributes={a: table.column(a).to_numpy(zero_copy_only=False).astype(np.float64)
                                      for a in numeric})


def check_compatible(a: EmbeddingTable, b: EmbeddingTable, same_grid: bool = True) -> None:
    """Two layers can be compared only with the same width, model and (for compare) grid."""
    if a.dim != b.dim:
        raise InputError(f"embedding dimensions differ: {a.source} has {a.dim}, {b.source} has {b.dim}; "
                         "both layers must come from the same model")
    if a.model and b.model and a.model != b.model:
        raise InputError(f"embeddings come from different models: {a.source} from {a.model!r}, {b.source} from "
                         f"{b.model!r}; recompute one with the other's checkpoint")
    if same_grid and a.grid != b.grid:
        raise InputError(f"different grids: {a.source} is on {a.grid}, {b.source} on {b.grid}; "
                         "compute both with the same CRS and cell size")


def write_result(path, table: EmbeddingTable, columns: dict, rows: Optional[np.ndarray] = None,
                 layer_name: str = "explore", geometry=None, cell_ids=None) -> Path:
    """Write ``cell_id`` + ``columns`` + geometry to a GeoPackage or GeoParquet, atomically."""
    import geopandas as gpd
    import shapely

    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".gpkg", ".parquet", ".geoparquet"):
        raise InputError(f"output {out} must be a .gpkg (GeoPackage) or .parquet (GeoParquet) file")
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    ids = table.cell_ids if cell_ids is None else cell_ids
    geom = table.geometry if geometry is None else geometry
    if rows is not None:
        ids, geom = ids[rows], geom[rows]
    data = {"cell_id": [str(c) for c in ids]}
    data.update(columns)
    gdf = gpd.GeoDataFrame(data, geometry=shapely.from_wkb(geom), crs=table.crs or None)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}{out.suffix}")
    try:
        if suffix == ".gpkg":
            gdf.to_file(tmp, layer=layer_name, driver="GPKG", engine="pyogrio", dataset_options={"VERSION": "1.2"})
        else:
            gdf.to_parquet(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
