"""The one analysis function: extent in, styled prediction layer (or embedding file) out.

The CLI (``refound predict`` / ``refound embed``), the QGIS plugin's dock and its Processing
algorithms all call :func:`run_analysis` with an :class:`AnalysisRequest`; progress and cancel go
through two callbacks. Cells stream through the stages, so peak memory does not grow with the
extent:

    grid (snapped cells, block by block) -> POI join (vectorised floor division per block)
    -> image reads (windowed rasterio chips, a small pool of reader threads)
    -> featurisation (prefetch thread) -> model (batched by POI length) -> writer (chunked, atomic)

Stage times are measured where each stage runs; stages overlap (background threads), so their
sum can exceed the wall-clock ``total``. ``image_reads`` is the summed busy time of the reader
threads.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes every ``world_size``-th block of cells,
writes its own part file, and rank 0 merges the parts into the output after a barrier.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from refound_core.errors import InputError

log = logging.getLogger("refound.inference")

TASKS = ("urban_village", "population", "commercial", "embed")
BLOCK_CELLS = 64           # cells per grid block (one POI join, one unit of distributed sharding);
                           # small, so the blocks in flight (prefetch depth 2) stay a few MB at any extent
IMAGE_THREADS = 4          # concurrent windowed chip reads (GDAL releases the GIL while reading)
STAGES = ("load", "grid", "poi_join", "image_reads", "featurize", "model", "write")


@dataclass
class AnalysisRequest:
    """Everything one analysis needs (the plugin's dialog and the CLI flags map onto it).

    Attributes:
        checkpoint: checkpoint folder (``save_checkpoint``).
        task: ``urban_village``, ``population``, ``commercial`` (must match the checkpoint's head)
            or ``embed`` (region embeddings to GeoParquet).
        out: output path: ``.gpkg`` for predictions, ``.parquet`` for embeddings.
        extent: ``(xmin, ymin, xmax, ymax)`` in ``extent_crs``; extent_crs None = the POI file's CRS.
        cell_size: grid cell side in metres (paper: 256).
        pois: POI file (GeoPackage / Shapefile / GeoJSON / .osm.pbf) or None (no POIs).
        poi_layer, name_field, category_field: which layer and attributes hold the POIs.
        samples: alternatively, an iterable of ready ``RegionSample`` (the plugin's own layers
            adapter, the synthetic city); then extent/pois/imagery are not used.
        imagery: RGB raster path or None (no imagery: POI-only predictions).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``; batch_size: None = device default.
        embeddings: which vectors to export for ``embed`` (``h_P``, ``h_S``, ``fused``).
        predictor: an already loaded Predictor to reuse (the plugin keeps one per session).
        block_cells: cells per grid block (unit of the POI join and of distributed sharding).
    """

    checkpoint: Optional[str] = None
    task: str = "urban_village"
    out: Optional[str] = None
    extent: Optional[Sequence[float]] = None
    extent_crs: Optional[str] = None
    cell_size: float = 256.0
    pois: Optional[str] = None
    poi_layer: Optional[str] = None
    name_field: str = "name"
    category_field: str = "category"
    samples: Optional[Iterable] = None
    imagery: Optional[str] = None
    device: str = "auto"
    batch_size: Optional[int] = None
    embeddings: tuple = ("h_P", "h_S", "fused")
    predictor: object = None
    block_cells: int = BLOCK_CELLS


@dataclass
class AnalysisResult:
    """What a run produced, with the per-stage time breakdown (seconds) and counters."""

    out: Path
    task: str
    cells: int = 0
    predicted: int = 0
    insufficient: int = 0
    timings: dict = field(default_factory=dict)
    notices: list = field(default_factory=list)
    device: str = ""
    precision: str = ""
    peak_rss_mb: float = 0.0
    value_min: float = math.nan
    value_max: float = math.nan
    value_mean: float = math.nan
    model: dict = field(default_factory=dict)

    def summary(self) -> str:
        """Several human-readable lines: counts, value range, and the stage breakdown."""
        t = self.timings
        lines = [f"wrote {self.out}: {self.cells} cells ({self.predicted} predicted, {self.insufficient} "
                 f"without POIs or imagery) on {self.device} ({self.precision})"]
        if self.task != "embed" and self.predicted:
            lines.append(f"{self.task}: min {self.value_min:.4g}, mean {self.value_mean:.4g}, max {self.value_max:.4g}")
        total = t.get("total", 0.0) or 1e-9
        run = max(total - t.get("load", 0.0), 1e-9)
        lines.append(f"time {total:.2f} s ({self.cells / run:.1f} cells/s after loading the model), peak RSS "
                     f"{self.peak_rss_mb:.0f} MB; stage busy time (stages overlap):")
        for s in STAGES:
            if s in t:
                lines.append(f"  {s:<12} {t[s]:8.2f} s")
        return "\n".join(lines)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _dist_env() -> tuple:
    """``(rank, world_size, local_rank)`` from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return rank, world, local


def _validate(req: AnalysisRequest) -> None:
    if not isinstance(req.task, str) or not req.task:
        raise InputError(f"task {req.task!r} must be one of {list(TASKS)} (or the name of the checkpoint's own head)")
    if not req.out:
        raise InputError("no output path given; pass --out OUT.gpkg (predictions) or OUT.parquet (embeddings)")
    suffix = Path(req.out).suffix.lower()
    if req.task == "embed" and suffix not in (".parquet", ".geoparquet"):
        raise InputError(f"embedding output {req.out} must be a .parquet (GeoParquet) file")
    if req.task != "embed" and suffix != ".gpkg":
        raise InputError(f"prediction output {req.out} must be a .gpkg (GeoPackage) file")
    if req.samples is None:
        if req.extent is None:
            raise InputError("no extent given; pass --extent XMIN,YMIN,XMAX,YMAX[,CRS]")
        if req.pois is None and req.imagery is None:
            raise InputError("neither POIs nor imagery given: every cell would lack data; pass --pois and/or --imagery")
        for what, p in (("POI file", req.pois), ("imagery raster", req.imagery)):
            if p is not None and not Path(p).exists():
                raise InputError(f"{what} {p} does not exist; check the path")
    if req.predictor is None and not req.checkpoint:
        raise InputError("no checkpoint given; pass --checkpoint CKPT (a folder written by refound)")


class _Timer:
    """Thread-safe accumulation of per-stage busy seconds."""

    def __init__(self):
        self.t = {s: 0.0 for s in STAGES}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.t[stage] = self.t.get(stage, 0.0) + seconds


class _Sources:
    """Grid, POIs and imagery of a file-based request; yields RegionSample blocks."""

    def __init__(self, req: AnalysisRequest, image_size: int, timer: _Timer):
        from refound_core.data.grid import Grid
        from refound_core.data.imagery import ChipReader

        self.timer = timer
        self.notice = None
        t0 = time.perf_counter()
        extent_crs = req.extent_crs
        self.pois = None
        if req.pois is not None:
            from refound_core.data.poi_sources import read_pois

            t1 = time.perf_counter()
            pois = read_pois(req.pois, name_field=req.name_field, category_field=req.category_field,
                             layer=req.poi_layer)
            self.timer.add("poi_join", time.perf_counter() - t1)
            if extent_crs is None:
                extent_crs = pois.crs
                self.notice = f"extent taken to be in the POI file's CRS {pois.crs}"
            self.pois = pois
        if extent_crs is None:  # imagery only
            with ChipReader(req.imagery) as r:
                extent_crs = r.crs.to_wkt()
        self.grid = Grid.for_extent(req.extent, extent_crs, req.cell_size)
        self.extent, self.extent_crs = tuple(req.extent), extent_crs
        self.total = self.grid.count_cells(*self.extent, extent_crs=extent_crs)
        col0, col1, row0, row1 = self.grid.index_ranges(*self.extent, extent_crs=extent_crs)
        self.ranges = (col0, col1, row0, row1)
        self.timer.add("grid", time.perf_counter() - t0)
        if self.pois is not None:
            t1 = time.perf_counter()
            s = self.grid.cell_size
            pois = self.pois.to_crs(self.grid.crs)
            keep = ((pois.x >= col0 * s) & (pois.x < col1 * s) & (pois.y >= row0 * s) & (pois.y < row1 * s))
            self.pois = pois.take(np.flatnonzero(keep))  # only the extent's POIs are kept in memory
            self.timer.add("poi_join", time.perf_counter() - t1)
        self.imagery = req.imagery
        self.image_size = image_size
        if req.imagery is not None:
            ChipReader(req.imagery, size_px=image_size).close()  # fail early on a bad raster
        self.block_cells = max(1, int(req.block_cells))
        self._local = threading.local()
        self._readers: list = []

    def blocks(self):
        """Lists of grid cells, ``BLOCK_CELLS`` at a time, north-west first, row by row."""
        col0, col1, row0, row1 = self.ranges
        block = []
        t0 = time.perf_counter()
        for row in range(row1 - 1, row0 - 1, -1):
            for col in range(col0, col1):
                block.append(self.grid.cell(col, row))
                if len(block) >= self.block_cells:
                    self.timer.add("grid", time.perf_counter() - t0)
                    yield block
                    block, t0 = [], time.perf_counter()
        if block:
            self.timer.add("grid", time.perf_counter() - t0)
            yield block

    def _reader(self):
        from refound_core.data.imagery import ChipReader

        r = getattr(self._local, "reader", None)
        if r is None:  # one GDAL dataset handle per thread (handles are not thread-safe)
            r = ChipReader(self.imagery, size_px=self.image_size)
            self._local.reader = r
            self._readers.append(r)
        return r

    def _read_chip(self, cell):
        t0 = time.perf_counter()
        chip = self._reader().read_cell(cell)
        self.timer.add("image_reads", time.perf_counter() - t0)
        return chip

    def samples(self, block: list, pool: Optional[ThreadPoolExecutor]) -> list:
        from refound_core.data.poi_sources import assign_to_cells
        from refound_core.data.sample import RegionSample

        chips = pool.map(self._read_chip, block) if (pool is not None and self.imagery) else None
        t0 = time.perf_counter()
        if self.pois is not None and len(self.pois):
            assign = assign_to_cells(self.pois.x, self.pois.y, self.grid, block)
        else:
            assign = None
        out = []
        for i, cell in enumerate(block):
            if assign is not None:
                idx = assign.indices(i)
                names, cats = self.pois.names[idx].tolist(), self.pois.categories[idx].tolist()
                xy = np.column_stack([self.pois.x[idx], self.pois.y[idx]])
            else:
                names, cats, xy = [], [], np.zeros((0, 2))
            out.append(RegionSample(cell.id, cell.bounds, cell.crs, names, cats, xy))
        self.timer.add("poi_join", time.perf_counter() - t0)
        if chips is not None:
            for s, chip in zip(out, chips):
                s.image, s.image_coverage, s.image_valid = chip.image, float(chip.coverage), chip.valid
        return out

    def close(self):
        for r in self._readers:
            r.close()


def run_analysis(request: AnalysisRequest, progress: Optional[Callable] = None,
                 is_canceled: Optional[Callable] = None) -> AnalysisResult:
    """Run one analysis end to end and write its output atomically.

    Args:
        request: see :class:`AnalysisRequest`.
        progress: ``progress(done_cells, total_cells_or_None)``, called after each window.
        is_canceled: polled before each batch; True stops the run within one batch, raises
            :class:`~refound_core.inference.predictor.AnalysisCanceled` and leaves no output file.

    Raises:
        InputError: bad inputs (paths, extent, task/checkpoint mismatch ...).
    """
    from refound_core.inference.predictor import AnalysisCanceled, _prefetch, load_predictor
    from refound_core.inference.writers import GeoPackageWriter, GeoParquetWriter

    _validate(request)
    t_start = time.perf_counter()
    timer = _Timer()
    rank, world, local_rank = _dist_env()
    predictor = request.predictor
    if predictor is None:
        device = request.device
        if world > 1 and device in ("auto", "cuda"):
            import torch
            if torch.cuda.is_available():
                device = f"cuda:{local_rank}"
        t0 = time.perf_counter()
        predictor = load_predictor(request.checkpoint, device=device, batch_size=request.batch_size)
        timer.add("load", time.perf_counter() - t0)
    elif request.batch_size:
        predictor.batch_size = int(request.batch_size)
    embed = request.task == "embed"
    task = None if embed else predictor.check_task(request.task)
    notices = list(predictor.notices)
    for k in ("featurize", "model"):
        predictor.timings[k] = 0.0

    sources, pool, blocks, stream = None, None, None, None
    counts = {"cells": 0, "predicted": 0}
    vals = {"min": math.inf, "max": -math.inf, "sum": 0.0}
    out = Path(request.out)
    try:
        if request.samples is not None:
            it = iter(request.samples)
            first = next(it, None)
            crs = first.crs if first is not None else "EPSG:3857"
            sample_iter = _chain(first, it)
            total = None
        else:
            sources = _Sources(request, predictor.config.image_size, timer)
            if sources.notice:
                notices.append(sources.notice)
            crs, total = sources.grid.crs, sources.total
            pool = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="refound-chips") if request.imagery else None

            def sample_blocks():
                for b, block in enumerate(sources.blocks()):
                    if b % world == rank:
                        yield sources.samples(block, pool)

            blocks = _prefetch(sample_blocks(), depth=2)
            sample_iter = (s for block in blocks for s in block)

        target = out if world == 1 else out.with_name(f".{out.name}.part{rank}{out.suffix}")
        provenance = {"model": predictor.config.name, "checkpoint": str(predictor.checkpoint_dir),
                      "cell_size": request.cell_size, "grid_crs": crs, "device": str(predictor.device),
                      "precision": predictor.precision.dtype_name}
        if embed:
            writer = GeoParquetWriter(target, crs, predictor.config.hidden_size, tuple(request.embeddings), provenance)
            stream = predictor.embed_samples(sample_iter, progress=None, is_canceled=is_canceled)
        else:
            writer = GeoPackageWriter(target, crs, task, kind=predictor.kind, provenance=provenance,
                                      classes=predictor.classes)
            stream = predictor.predict_samples(sample_iter, task=task, progress=None, is_canceled=is_canceled)

        with writer:
            for r in stream:
                t0 = time.perf_counter()
                writer.write(r)
                timer.add("write", time.perf_counter() - t0)
                counts["cells"] += 1
                if r.sufficient:
                    counts["predicted"] += 1
                    if not embed and math.isfinite(r.value):
                        vals["min"], vals["max"] = min(vals["min"], r.value), max(vals["max"], r.value)
                        vals["sum"] += r.value
                if progress is not None and counts["cells"] % 64 == 0:
                    progress(counts["cells"], total)
                if is_canceled is not None and counts["cells"] % 64 == 0 and is_canceled():
                    raise AnalysisCanceled("analysis canceled")
            t0 = time.perf_counter()
        timer.add("write", time.perf_counter() - t0)  # close(): flush, style, rename
    finally:
        if stream is not None:
            stream.close()  # stops the featurisation thread first (it consumes the blocks) ...
        if blocks is not None:
            try:
                blocks.close()  # ... then the grid/POI/imagery thread
            except ValueError:  # still running in a thread that did not stop in time
                pass
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if sources is not None:
            sources.close()
    if progress is not None:
        progress(counts["cells"], total if total is not None else counts["cells"])

    if world > 1:
        t0 = time.perf_counter()
        _merge_parts(out, world, rank, embed, crs, task, predictor, request, provenance)
        timer.add("write", time.perf_counter() - t0)

    timings = dict(timer.t)
    timings["featurize"] = predictor.timings["featurize"]
    timings["model"] = predictor.timings["model"]
    timings["total"] = time.perf_counter() - t_start
    n = counts["predicted"]
    return AnalysisResult(
        out=out, task=request.task, cells=counts["cells"], predicted=n, insufficient=counts["cells"] - n,
        timings=timings, notices=notices + [m for m in predictor.notices if m not in notices],
        device=str(predictor.device), precision=predictor.precision.dtype_name, peak_rss_mb=peak_rss_mb(),
        value_min=vals["min"] if n and not embed else math.nan, value_max=vals["max"] if n and not embed else math.nan,
        value_mean=vals["sum"] / n if n and not embed else math.nan, model=predictor.describe())


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest


def _merge_parts(out: Path, world: int, rank: int, embed: bool, crs, task, predictor, request, provenance) -> None:
    """Barrier, then rank 0 appends every rank's part to the final output (atomically) and removes
    the parts. Uses torch.distributed (gloo is enough: only a barrier is exchanged)."""
    import torch.distributed as dist

    from refound_core.inference.writers import GeoPackageWriter, GeoParquetWriter

    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    try:
        dist.barrier()
        if rank == 0:
            parts = [out.with_name(f".{out.name}.part{r}{out.suffix}") for r in range(world)]
            missing = [str(p) for p in parts if not p.exists()]
            if missing:
                raise RuntimeError(f"distributed inference: part files {missing} are missing; a rank failed")
            if embed:
                w = GeoParquetWriter(out, crs, predictor.config.hidden_size, tuple(request.embeddings), provenance)
            else:
                w = GeoPackageWriter(out, crs, task, kind=predictor.kind, provenance=provenance,
                                     classes=predictor.classes)
            with w:
                for p in parts:
                    w.append_part(p)
            for p in parts:
                p.unlink()
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
