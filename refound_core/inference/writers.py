"""Streaming, atomic writers for inference results.

* :class:`GeoPackageWriter`: one polygon per cell with ``cell_id``, ``prediction``, ``poi_count``,
  ``image_coverage``, ``sufficient``; the default QGIS style (``styles.py``) is embedded in the
  GeoPackage's ``layer_styles`` table (the table QGIS itself uses), so opening the file in QGIS
  shows a styled map; provenance (model, task, date, grid) goes into the layer description and
  metadata. Written as GeoPackage 1.2 (QGIS 3.22 warns about 1.4, SETUP-NOTES pitfall 5).
* :class:`GeoParquetWriter`: region embeddings (paper 4.3: h[P], h[S] and their fusion) as
  fixed-size float32 list columns plus a WKB cell geometry and GeoParquet 1.0 ``geo`` metadata.

Both stream in chunks (memory does not grow with the number of cells) and are atomic: they write
``DIR/.NAME.tmp`` and ``os.replace`` it onto ``DIR/NAME`` only after the last chunk and the
style are in; a failure mid-run leaves no file under the target name (and an existing target is
kept untouched until the new file is complete).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from refound_core.errors import InputError
from refound_core.inference import styles
from refound_core.inference.results import CellResult, extra_columns

CELLS_LAYER = "cells"
GPKG_COLUMNS = ("cell_id", styles.PREDICTION_FIELD, "poi_count", "image_coverage", "image_used",
                styles.SUFFICIENT_FIELD)
EMBEDDING_COLUMNS = ("h_P", "h_S", "fused")
_RESERVOIR = 20_000  # values kept for the style's quantile class breaks (bounded memory)


def extra_arrays(rows: list, names: Optional[list] = None) -> tuple:
    """``(names, arrays)`` of the per-cell outputs beyond the fixed columns
    (:func:`~refound_core.inference.results.extra_columns`). ``names`` None: the columns the rows
    carry, in order of first appearance (a sink fixes them at its first chunk). Numbers become
    float64 (NULL = NaN), booleans bool, anything else text."""
    per_row = [extra_columns(r) for r in rows]
    if names is None:
        names = []
        for cols in per_row:
            names += [k for k in cols if k not in names]
    arrays = []
    for name in names:
        vals = [cols.get(name) for cols in per_row]
        kinds = {type(v) for v in vals if v is not None}
        if kinds and kinds <= {bool}:
            arrays.append(np.array([bool(v) for v in vals], dtype=bool))
        elif kinds and kinds <= {bool, int, float}:
            arrays.append(np.array([math.nan if v is None else float(v) for v in vals], dtype=np.float64))
        else:
            arrays.append(np.array([None if v is None else str(v) for v in vals], dtype=object))
    return list(names), arrays


def temp_path(target) -> Path:
    """``DIR/.NAME.tmp``: same folder (so ``os.replace`` is atomic), hidden, never the target."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp")


def _prepare_target(path, suffixes: tuple, what: str) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise InputError(f"{what} output {path} must end with {' or '.join(suffixes)}")
    if path.is_dir():
        raise InputError(f"{what} output {path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"cannot write {what} output into {path.parent} (no write permission); choose another folder")
    return path


def _remove(p: Path) -> None:
    for q in (p, Path(str(p) + "-journal"), Path(str(p) + "-wal"), Path(str(p) + "-shm")):
        try:
            q.unlink()
        except FileNotFoundError:
            pass


class _AtomicFile:
    """Temp-file bookkeeping shared by the writers; use as a context manager."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        _remove(self.tmp)  # leftovers of an earlier crashed run
        self.count = 0
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def abort(self) -> None:
        """Drop the partial output; the target name is left as it was."""
        self._closed = True
        self._abort_hook()
        _remove(self.tmp)

    def _abort_hook(self) -> None:
        pass

    def _commit(self) -> None:
        os.replace(self.tmp, self.path)


class _ChunkedRows(_AtomicFile):
    """Rows are buffered and flushed ``chunk_size`` at a time by the subclass's ``_flush``."""

    def write(self, result: CellResult) -> None:
        self._rows.append(result)
        if len(self._rows) >= self.chunk_size:
            self._flush()

    def write_many(self, results: Iterable[CellResult]) -> None:
        for r in results:
            self.write(r)


class GeoPackageWriter(_ChunkedRows):
    """Stream :class:`CellResult` rows into a styled GeoPackage polygon layer.

    Args:
        path: target ``.gpkg``.
        crs: the cells' CRS (``"EPSG:32650"``).
        task: task name (``urban_village``, ``population``, ``commercial`` or a user head's name).
        kind: ``binary``, ``regression`` or ``multiclass`` (picks the style; default from the task name).
        classes: class names of a multiclass head (legend of the style; ``prediction`` = index).
        provenance: extra ``{key: value}`` stored in the layer metadata (model, checkpoint ...).
        chunk_size: rows per write call.
        layer: layer name inside the GeoPackage.
    """

    def __init__(self, path, crs: str, task: str, kind: Optional[str] = None, provenance: Optional[dict] = None,
                 chunk_size: int = 4096, layer: str = CELLS_LAYER, classes: Optional[list] = None):
        super().__init__(_prepare_target(path, (".gpkg",), "prediction"))
        self.crs, self.task, self.layer = crs, task, layer
        self.kind = kind or ("binary" if task == "urban_village" else "regression")
        self.classes = list(classes) if classes else None
        self.provenance = {k: ("" if v is None else str(v)) for k, v in (provenance or {}).items()}
        self.chunk_size = int(chunk_size)
        self._rows: list = []
        self._reservoir: list = []
        self._seen_values = 0
        self._rng = random.Random(0)  # reservoir sampling, deterministic
        self._created = False
        self.extra_names: Optional[list] = None  # per-cell outputs beyond GPKG_COLUMNS, fixed at the first chunk

    # -- rows ---------------------------------------------------------------------------------
    def _track(self, v: float) -> None:
        if not math.isfinite(v):
            return
        self._seen_values += 1
        if len(self._reservoir) < _RESERVOIR:
            self._reservoir.append(v)
        else:
            j = self._rng.randrange(self._seen_values)
            if j < _RESERVOIR:
                self._reservoir[j] = v

    def _flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        import shapely

        b = np.array([r.bounds for r in rows], dtype=np.float64).reshape(-1, 4)
        geoms = shapely.to_wkb(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3], ccw=True))
        values = np.array([r.value if r.sufficient else math.nan for r in rows], dtype=np.float64)
        for v in values:
            self._track(float(v))
        fields = [
            np.array([r.cell_id for r in rows], dtype=object),
            values,
            np.array([int(r.poi_count) for r in rows], dtype=np.int32),
            np.array([float(r.image_coverage) for r in rows], dtype=np.float64),
            np.array([int(bool(r.image_used)) for r in rows], dtype=np.int32),
            np.array([bool(r.sufficient) for r in rows], dtype=bool),
        ]
        self.extra_names, extras = extra_arrays(rows, self.extra_names)
        self._write_raw(geoms, fields + extras)

    def columns(self) -> list:
        return list(GPKG_COLUMNS) + list(self.extra_names or [])

    def _write_raw(self, wkb, fields) -> None:
        import pyogrio.raw

        kwargs = dict(driver="GPKG", layer=self.layer, geometry_type="Polygon", crs=self.crs,
                      promote_to_multi=False, nan_as_null=True)
        if not self._created:
            kwargs.update(dataset_options={"VERSION": "1.2"}, layer_options={"DESCRIPTION": self._description()},
                          layer_metadata=self._metadata())
        else:
            kwargs["append"] = True
        with warnings.catch_warnings():  # GDAL warns that '.tmp' is not a '.gpkg' extension
            warnings.simplefilter("ignore", RuntimeWarning)
            pyogrio.raw.write(str(self.tmp), wkb, fields, self.columns(), **kwargs)
        self._created = True
        self.count += len(wkb)

    def append_part(self, part_path, chunk: int = 8192) -> None:
        """Append the rows of another GeoPackage written by this class (a distributed rank's part)."""
        import pyogrio

        part_path = Path(part_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            info = pyogrio.read_info(str(part_path), layer=self.layer)
            total = info["features"]
            if self.extra_names is None:
                self.extra_names = [f for f in info["fields"] if f not in GPKG_COLUMNS]
            for start in range(0, total, chunk):
                self._flush()
                _, _, wkb, data = pyogrio.raw.read(str(part_path), layer=self.layer, columns=self.columns(),
                                                   skip_features=start, max_features=chunk)[:4]
                cols = dict(zip(self.columns(), data))
                vals = np.asarray(cols[styles.PREDICTION_FIELD], dtype=np.float64)
                for v in vals:
                    self._track(float(v))
                fields = [np.asarray(cols["cell_id"], dtype=object), vals,
                          np.asarray(cols["poi_count"], dtype=np.int32),
                          np.asarray(cols["image_coverage"], dtype=np.float64),
                          np.asarray(cols["image_used"], dtype=np.int32),
                          np.asarray(cols[styles.SUFFICIENT_FIELD]).astype(bool)]
                fields += [np.asarray(cols[n]) for n in self.extra_names]
                self._write_raw(np.asarray(wkb, dtype=object), fields)

    # -- metadata and style ---------------------------------------------------------------------
    def _description(self) -> str:
        title = styles.TASK_TITLES.get(self.task, self.task)
        model = self.provenance.get("model", "ReFound")
        return f"ReFound {title} ({model}), {_dt.date.today().isoformat()}"

    def _metadata(self) -> dict:
        extra = {"refound_classes": json.dumps(self.classes)} if self.classes else {}
        return {"refound_task": self.task, "refound_kind": self.kind, **extra,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **{f"refound_{k}": v for k, v in self.provenance.items()}}

    def qml(self) -> str:
        return styles.qml_for_task(self.task, self._reservoir, kind=self.kind, classes=self.classes)

    def _write_style(self) -> None:
        import pandas as pd
        import pyogrio

        now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
        # Columns and filter values as QGIS's own OGR provider writes and reads them
        # (f_table_schema '' and the geometry column name are part of its lookup).
        df = pd.DataFrame({
            "f_table_catalog": [""], "f_table_schema": [""], "f_table_name": [self.layer],
            "f_geometry_column": ["geom"], "styleName": [f"ReFound {self.task}"], "styleQML": [self.qml()],
            "styleSLD": [""], "useAsDefault": [True],
            "description": [self._description()], "owner": ["refound"], "ui": [""],
            "update_time": [pd.Timestamp(now)],
        })
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pyogrio.write_dataframe(df, str(self.tmp), layer="layer_styles", driver="GPKG")

    def close(self) -> Path:
        """Flush, embed the style, and move the file into place. Returns the target path."""
        if self._closed:
            return self.path
        self._flush()
        if not self._created:  # zero cells: still a valid, empty, styled layer
            self.extra_names = []
            self._write_raw(np.zeros(0, dtype=object), [np.zeros(0, dtype=object), np.zeros(0), np.zeros(0, np.int32),
                                                        np.zeros(0), np.zeros(0, dtype=bool)])
        self._write_style()
        self._commit()
        self._closed = True
        return self.path


class GeoParquetWriter(_ChunkedRows):
    """Stream region embeddings into a GeoParquet file (one row group per chunk).

    Columns: ``cell_id``, ``poi_count``, ``image_coverage``, ``sufficient``, the requested
    embeddings (``h_P``, ``h_S``, ``fused``: ``fixed_size_list<float32>[H]``; all-NaN rows for
    insufficient cells), ``geometry`` (WKB polygon of the cell; GeoParquet 1.0 metadata with the
    CRS as PROJJSON).
    """

    def __init__(self, path, crs: str, hidden_size: int, embeddings=EMBEDDING_COLUMNS,
                 provenance: Optional[dict] = None, chunk_size: int = 2048):
        super().__init__(_prepare_target(path, (".parquet", ".geoparquet"), "embedding"))
        unknown = [e for e in embeddings if e not in EMBEDDING_COLUMNS]
        if unknown or not embeddings:
            raise InputError(f"embeddings {list(embeddings)} must be drawn from {list(EMBEDDING_COLUMNS)}")
        self.crs, self.hidden_size, self.embeddings = crs, int(hidden_size), tuple(embeddings)
        self.provenance = provenance or {}
        self.chunk_size = int(chunk_size)
        self._rows: list = []
        self._writer = None
        self._bbox = [math.inf, math.inf, -math.inf, -math.inf]
        self.extra_names: Optional[list] = None
        self._extra_types: list = []

    def _schema(self):
        import pyarrow as pa
        import pyproj

        fields = [("cell_id", pa.string()), ("poi_count", pa.int32()), ("image_coverage", pa.float32()),
                  ("image_used", pa.bool_()), ("sufficient", pa.bool_())]
        fields += [(e, pa.list_(pa.float32(), self.hidden_size)) for e in self.embeddings]
        fields += list(zip(self.extra_names or [], self._extra_types))
        fields.append(("geometry", pa.binary()))
        geo = {"version": "1.0.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                        "crs": pyproj.CRS.from_user_input(self.crs).to_json_dict()}}}
        meta = {b"geo": json.dumps(geo).encode("utf-8"),
                b"refound": json.dumps({k: str(v) for k, v in self.provenance.items()}).encode("utf-8")}
        return pa.schema(fields, metadata=meta)

    def _flush(self) -> None:
        if not self._rows and self._writer is not None:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        import shapely

        rows, self._rows = self._rows, []
        h = self.hidden_size
        b = np.array([r.bounds for r in rows], dtype=np.float64).reshape(-1, 4)
        if len(rows):
            self._bbox = [min(self._bbox[0], b[:, 0].min()), min(self._bbox[1], b[:, 1].min()),
                          max(self._bbox[2], b[:, 2].max()), max(self._bbox[3], b[:, 3].max())]
        geoms = shapely.to_wkb(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3], ccw=True))
        arrays = [pa.array([r.cell_id for r in rows], pa.string()),
                  pa.array([int(r.poi_count) for r in rows], pa.int32()),
                  pa.array([float(r.image_coverage) for r in rows], pa.float32()),
                  pa.array([bool(r.image_used) for r in rows], pa.bool_()),
                  pa.array([bool(r.sufficient) for r in rows], pa.bool_())]
        for e in self.embeddings:
            mat = np.full((len(rows), h), np.nan, dtype=np.float32)
            for i, r in enumerate(rows):
                vec = getattr(r, e)
                if vec is not None and r.sufficient:
                    mat[i] = vec
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa.float32()), h))
        first = self.extra_names is None
        self.extra_names, extras = extra_arrays(rows, self.extra_names)
        if first:
            self._extra_types = [pa.bool_() if a.dtype == bool else pa.float64() if a.dtype.kind == "f" else pa.string()
                                 for a in extras]
        arrays += [pa.array(a, t, from_pandas=True) for a, t in zip(extras, self._extra_types)]
        arrays.append(pa.array(list(geoms), pa.binary()))
        schema = self._schema()
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self.tmp), schema, compression="zstd")
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        self.count += len(rows)

    def append_part(self, part_path) -> None:
        """Append the row groups of another file written by this class (a distributed rank's part)."""
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(part_path))
        if self.extra_names is None:  # the parts' own extra columns (all parts come from one run)
            known = {"cell_id", "poi_count", "image_coverage", "image_used", "sufficient", "geometry", *self.embeddings}
            extra = [f for f in pf.schema_arrow if f.name not in known]
            self.extra_names, self._extra_types = [f.name for f in extra], [f.type for f in extra]
        self._flush()
        for i in range(pf.num_row_groups):
            t = pf.read_row_group(i).replace_schema_metadata(self._schema().metadata)
            if t.num_rows:
                import shapely
                g = shapely.from_wkb(np.asarray(t.column("geometry").to_pylist(), dtype=object))
                lo, hi = shapely.total_bounds(g)[:2], shapely.total_bounds(g)[2:]
                self._bbox = [min(self._bbox[0], lo[0]), min(self._bbox[1], lo[1]),
                              max(self._bbox[2], hi[0]), max(self._bbox[3], hi[1])]
            self._writer.write_table(t)
            self.count += t.num_rows

    def _abort_hook(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the partial file is deleted anyway
                pass

    def close(self) -> Path:
        if self._closed:
            return self.path
        self._flush()
        self._writer.close()
        self._commit()
        self._closed = True
        return self.path
