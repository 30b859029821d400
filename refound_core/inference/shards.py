"""Output shards of a run directory (``refound_core.inference.region``) and their assembly.

A shard is one GeoParquet file per block of the run's grid, ``RUN_DIR/shards/sNNNNN.parquet``:

* predictions: ``cell_id``, ``prediction`` (float64, NaN = not predicted), ``poi_count``,
  ``image_coverage``, ``image_used``, ``sufficient``, every extra per-cell output (``aoi_id`` ...)
  and a WKB ``geometry`` (the cell polygon); embeddings: the format of ``writers.GeoParquetWriter``.
* written whole at the end of the shard to ``.NAME.tmp`` and renamed (``os.replace``): a shard
  file exists only when complete, so a killed run leaves finished shards and no partial ones.

The final GeoPackage (predictions, styled as ``writers.GeoPackageWriter`` styles it) or
GeoParquet (embeddings) is assembled from the shards in the grid's block order, atomically.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from refound_core.inference.sinks import ResultSink, RunInfo

FIXED = ("cell_id", "prediction", "poi_count", "image_coverage", "image_used", "sufficient", "geometry")


class TagSink(ResultSink):
    """Adds ``aoi_id`` (the AOI a cell's centre lies in) to each result, then passes it on."""

    def __init__(self, inner: ResultSink, tags: dict):
        self.inner, self.tags = inner, tags

    def open(self, info: RunInfo) -> None:
        self.inner.open(info)

    def write(self, result) -> None:
        result.extra["aoi_id"] = self.tags.get(result.cell_id)
        self.inner.write(result)

    def close(self):
        return self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


class PredictionShardSink(ResultSink):
    """One shard of predictions as GeoParquet (a shard is one block: its rows are held until close)."""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.rows: list = []
        self.info = None

    def open(self, info: RunInfo) -> None:
        self.info, self.rows = info, []

    def write(self, result) -> None:
        self.rows.append(result)

    def close(self) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import shapely

        from refound_core.inference.writers import extra_arrays

        rows = self.rows
        b = np.array([r.bounds for r in rows], dtype=np.float64).reshape(-1, 4)
        geoms = shapely.to_wkb(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3], ccw=True))
        cols = {"cell_id": pa.array([r.cell_id for r in rows], pa.string()),
                "prediction": pa.array([float(r.value) if r.sufficient else math.nan for r in rows], pa.float64()),
                "poi_count": pa.array([int(r.poi_count) for r in rows], pa.int32()),
                "image_coverage": pa.array([float(r.image_coverage) for r in rows], pa.float64()),
                "image_used": pa.array([bool(r.image_used) for r in rows], pa.bool_()),
                "sufficient": pa.array([bool(r.sufficient) for r in rows], pa.bool_())}
        names, extras = extra_arrays(rows)
        for n, a in zip(names, extras):
            cols[n] = pa.array(a, from_pandas=True) if a.dtype != object else pa.array(list(a), pa.string())
        cols["geometry"] = pa.array(list(geoms), pa.binary())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), str(self.tmp), compression="zstd")
        os.replace(self.tmp, self.path)
        self.rows = []
        return self.path

    def abort(self) -> None:
        self.rows = []
        self.tmp.unlink(missing_ok=True)


def shard_sink(path, embed: bool) -> ResultSink:
    """The sink writing one shard file (GeoParquet either way)."""
    if embed:
        from refound_core.inference.sinks import GeoParquetSink

        return GeoParquetSink(path)
    return PredictionShardSink(path)


def assemble(paths: list, out, info: RunInfo, embed: bool) -> dict:
    """Write ``out`` from the shard files (in order), atomically; returns ``{"cells", "predicted",
    "min", "max", "sum"}`` over the assembled cells (the run's summary, resumed shards included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = {"cells": 0, "predicted": 0, "min": math.inf, "max": -math.inf, "sum": 0.0}
    if embed:
        from refound_core.inference.writers import GeoParquetWriter

        w = GeoParquetWriter(out, info.crs, info.hidden_size, tuple(info.embeddings), info.provenance)
        with w:
            for p in paths:
                w.append_part(p)
                s = pq.read_table(str(p), columns=["sufficient"]).column("sufficient").to_numpy(zero_copy_only=False)
                stats["cells"] += len(s)
                stats["predicted"] += int(s.sum())
        return stats
    from refound_core.inference.writers import GeoPackageWriter

    w = GeoPackageWriter(out, info.crs, info.task, kind=info.kind, provenance=info.provenance, classes=info.classes)
    with w:
        for p in paths:
            t = pq.read_table(str(p))
            if w.extra_names is None:
                w.extra_names = [c for c in t.column_names if c not in FIXED]
            vals = t.column("prediction").to_numpy(zero_copy_only=False).astype(np.float64)
            suff = t.column("sufficient").to_numpy(zero_copy_only=False).astype(bool)
            for v in vals:  # the style's class breaks see every value, as in a direct write
                w._track(float(v))  # noqa: SLF001 - the writer's own bookkeeping, shared on purpose
            fields = [np.asarray(t.column("cell_id").to_pylist(), dtype=object), vals,
                      t.column("poi_count").to_numpy().astype(np.int32),
                      t.column("image_coverage").to_numpy().astype(np.float64),
                      t.column("image_used").to_numpy(zero_copy_only=False).astype(np.int32), suff]
            for n in w.extra_names:
                col = t.column(n) if n in t.column_names else None
                if col is None or pa.types.is_string(col.type):
                    fields.append(np.asarray(col.to_pylist() if col is not None else [None] * t.num_rows, dtype=object))
                else:
                    fields.append(col.to_numpy(zero_copy_only=False))
            w._write_raw(np.asarray(t.column("geometry").to_pylist(), dtype=object), fields)  # noqa: SLF001
            ok = vals[suff & np.isfinite(vals)]
            stats["cells"] += t.num_rows
            stats["predicted"] += int(suff.sum())
            if ok.size:
                stats["min"], stats["max"] = min(stats["min"], float(ok.min())), max(stats["max"], float(ok.max()))
                stats["sum"] += float(ok.sum())
    return stats
