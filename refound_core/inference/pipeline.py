"""The one analysis function: an area in, a prediction (or embedding) per grid cell out.

Every entry point calls :func:`run_analysis`: ``refound predict`` / ``refound embed`` (with a
:class:`~refound_core.inference.sources.FileCellSource` and a GeoPackage / GeoParquet sink), the
QGIS plugin's dock task and each of its Processing algorithms (with ``refound_qgis``'s
``QgisCellSource`` and QGIS-layer sink). The model is anything with the predictor protocol
(:mod:`refound_core.inference.model_api`): the in-process
:class:`~refound_core.inference.predictor.Predictor`, or
:class:`~refound_core.backend.remote.RemotePredictor` for a ``refound serve`` backend.

::

    request ─▶ source.locate ─▶ grid (refound_core.data.grid) ─▶ blocks (rectangles of cells)
            ─▶ source.read_block (prefetch thread) ─▶ model (featurise, batch by POI length)
            ─▶ sink.write (chunked, atomic) ─▶ sink.close

Cells stream through the stages, so peak memory does not grow with the area. Stage times are
measured where each stage runs; stages overlap (background threads), so their sum can exceed the
wall-clock ``total``. ``image_reads`` is the summed busy time of the reader threads.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes every ``world_size``-th block of cells,
writes its own part (``sink.part``), and rank 0 assembles the parts after a barrier.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from refound_core.data.grid import DEFAULT_MAX_CELLS
from refound_core.data.validate import COST_WARN_CELLS, OutputLock, check_imagery, check_output, cost_estimate
from refound_core.errors import InputError

log = logging.getLogger("refound.inference")

TASKS = ("urban_village", "population", "commercial", "embed")
BLOCK_CELLS = 64           # cells per grid block (one POI join, one unit of distributed sharding);
                           # small, so the blocks in flight (prefetch depth 2) stay a few MB at any extent
PROGRESS_EVERY = 16        # cells between progress callbacks
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
        samples: alternatively, an iterable of ready ``RegionSample`` (the synthetic city, tests);
            then extent/pois/imagery are not used. (The plugin passes its own ``source``.)
        imagery: RGB raster path or None (no imagery: POI-only predictions).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``; batch_size: None = device default.
        embeddings: which vectors to export for ``embed`` (``h_P``, ``h_S``, ``fused``).
        predictor: an already loaded Predictor to reuse (the plugin keeps one per session).
        block_cells: cells per grid block (unit of the POI join and of distributed sharding).
        max_cells, max_cells_hint: more cells than this is refused, with the hint as what to do.
        overwrite: whether an existing ``out`` file may be replaced (checked before any work).
        min_image_coverage: a chip with a smaller share of valid pixels is not used (None = the
            core default, ``featurize.DEFAULT_MIN_IMAGE_COVERAGE``); applies to a loaded model.
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
    int8: bool = False  # CPU int8 dynamic quantisation (Predictor(int8=True))
    embeddings: tuple = ("h_P", "h_S", "fused")
    predictor: object = None
    block_cells: Optional[int] = None  # None = BLOCK_CELLS
    max_cells: int = DEFAULT_MAX_CELLS
    max_cells_hint: str = "use a smaller extent, a larger cell size, or raise max_cells"
    min_image_coverage: Optional[float] = None
    overwrite: bool = True  # False: an existing ``out`` is refused (the CLI without --overwrite)
    # whole regions (refound_core.inference.region): polygon AOI instead of extent, resumable run dir
    aoi: Optional[str] = None          # polygon layer file; cells whose centre is inside, tagged aoi_id
    aoi_layer: Optional[str] = None
    run_dir: object = None             # for region.run_region: a path, or True = OUT.run beside out
    fresh: bool = False                # discard the run dir's finished shards
    shard_cells: Optional[int] = None  # cells per shard (None: region_plan.SHARD_CELLS)
    single_process: bool = False       # ignore torchrun's environment (a run dir's shard: ranks from the manifest)


@dataclass
class AnalysisResult:
    """What a run produced, with the per-stage time breakdown (seconds) and counters.

    ``output`` is what the sink's ``close`` returned (the file path, or the plugin's layer data);
    ``crs``, ``kind``, ``classes`` describe the cells and the head; ``model`` is ``describe()``.
    """

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
    crs: str = ""
    kind: Optional[str] = None
    classes: Optional[list] = None
    output: object = None

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


def _validate(req: AnalysisRequest, source, sink, model) -> None:
    if not isinstance(req.task, str) or not req.task:
        raise InputError(f"task {req.task!r} must be one of {list(TASKS)} (or the name of the checkpoint's own head)")
    if sink is None:
        if not req.out:
            raise InputError("no output path given; pass --out OUT.gpkg (predictions) or OUT.parquet (embeddings)")
        suffix = Path(req.out).suffix.lower()
        if req.task == "embed" and suffix not in (".parquet", ".geoparquet"):
            raise InputError(f"embedding output {req.out} must be a .parquet (GeoParquet) file")
        if req.task != "embed" and suffix != ".gpkg":
            raise InputError(f"prediction output {req.out} must be a .gpkg (GeoPackage) file")
    if source is None and req.samples is None and req.extent is None and not req.aoi:
        raise InputError("no extent given; pass --extent XMIN,YMIN,XMAX,YMAX[,CRS] or --aoi FILE")
    if model is None and req.predictor is None and not req.checkpoint:
        raise InputError("no checkpoint given; pass --checkpoint CKPT (a folder written by refound)")


class _Timer:
    """Thread-safe accumulation of per-stage busy seconds."""

    def __init__(self):
        self.t = {s: 0.0 for s in STAGES}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.t[stage] = self.t.get(stage, 0.0) + seconds


def _load_model(request: AnalysisRequest, world: int, local_rank: int, timer: _Timer):
    from refound_core.inference.predictor import load_predictor

    device = request.device
    if world > 1 and device in ("auto", "cuda"):
        import torch
        if torch.cuda.is_available():
            device = f"cuda:{local_rank}"
    t0 = time.perf_counter()
    model = load_predictor(request.checkpoint, device=device, batch_size=request.batch_size,
                           min_image_coverage=request.min_image_coverage, int8=request.int8)
    timer.add("load", time.perf_counter() - t0)
    return model


def plan_grid(frame, request) -> tuple:
    """``(grid, ranges, number of cells)`` of a located area: the one place where an area becomes
    grid cells (``refound_core.data.grid.CellGrid``); InputError above ``request.max_cells``."""
    from refound_core.data.grid import CellGrid

    grid = CellGrid(frame.crs, request.cell_size)
    ranges = grid.ranges_of_bounds(frame.bounds)
    return grid, ranges, grid.check_count(ranges, request.max_cells, request.max_cells_hint)


def _sample_blocks(request, source, frame, image_size: int, rank: int, world: int, is_canceled):
    """``(blocks of RegionSamples, total cells or None)``: the grid and its blocks (this rank's
    share) when the source located an area, else the source's own blocks."""
    block_cells = max(1, int(request.block_cells or BLOCK_CELLS))
    if frame.bounds is None:
        return source.own_blocks(block_cells), None
    t0 = time.perf_counter()
    grid, ranges, total = plan_grid(frame, request)
    if total > COST_WARN_CELLS:  # a long run says so before it starts (the plugin asks first)
        log.warning("large run: %s", cost_estimate(total, str(request.device)))
    blocks = [b for i, b in enumerate(grid.blocks(ranges, block_cells)) if i % world == rank]
    source.timer("grid", time.perf_counter() - t0)
    source.prepare(grid, ranges, image_size)

    def read():
        for b in blocks:
            if is_canceled is not None and is_canceled():
                return  # the consumer raises AnalysisCanceled at its next check
            t1 = time.perf_counter()
            cells = list(grid.cells_of_ranges(b))
            if frame.keep is not None:
                cells = [c for c in cells if frame.keep(c)]
            source.timer("grid", time.perf_counter() - t1)
            if cells:
                yield source.read_block(cells)

    return read(), total


def collect_samples(request: AnalysisRequest, source, image_size: int = 256,
                    cancel: Optional[Callable] = None) -> list:
    """The RegionSamples of ``source``'s cells (the same grid and blocks as :func:`run_analysis`),
    without a model: for fitting a head on labelled cells (``frame.keep``)."""
    from refound_core.inference.predictor import AnalysisCanceled

    source.timer = _Timer().add
    try:
        frame = source.locate(request)
        blocks, _ = _sample_blocks(request, source, frame, int(image_size), 0, 1, cancel)
        out = [s for block in blocks for s in block]
    finally:
        source.close()
    if cancel is not None and cancel():
        raise AnalysisCanceled("analysis canceled")
    return out


def run_analysis(request: AnalysisRequest, source=None, model=None, sink=None,
                 progress: Optional[Callable] = None, cancel: Optional[Callable] = None,
                 is_canceled: Optional[Callable] = None) -> AnalysisResult:
    """Run one analysis end to end: grid, blocks, prefetch, model, sink (atomic).

    Args:
        request: see :class:`AnalysisRequest`.
        source: a :class:`~refound_core.inference.sources.CellSource`; None = the request's
            files (``pois`` / ``imagery``) or its ready ``samples``.
        model: an object with the predictor protocol (:mod:`refound_core.inference.model_api`);
            None = ``request.predictor``, else the checkpoint loaded once per process.
        sink: a :class:`~refound_core.inference.sinks.ResultSink`; None = a file sink for
            ``request.out``.
        progress: ``progress(done_cells, total_cells_or_None)``.
        cancel: polled before each block and batch; True stops the run within one batch, raises
            :class:`~refound_core.inference.predictor.AnalysisCanceled` and leaves no output.
        is_canceled: older name of ``cancel``.

    Raises:
        InputError: bad inputs (paths, extent, task/checkpoint mismatch ...).
    """
    from refound_core.inference.predictor import AnalysisCanceled, _prefetch
    from refound_core.inference.sinks import RunInfo, sink_for_request
    from refound_core.inference.sources import source_for_request

    cancel = cancel or is_canceled
    _validate(request, source, sink, model)
    lock = None
    if sink is None and _dist_env()[0] == 0:  # file output: checked and locked before any work
        check_output(request.out, overwrite=request.overwrite, what="output")
        lock = OutputLock(request.out).acquire()
    try:
        early = []
        if source is None and request.samples is None and request.imagery:
            early = check_imagery(request.imagery)
            for n in early:
                log.warning("%s", n)
        result = _run(request, source, model, sink, progress, cancel)
        result.notices[:0] = [n for n in early if n not in result.notices]
        return result
    finally:
        if lock is not None:
            lock.release()


def _run(request, source, model, sink, progress, cancel) -> AnalysisResult:
    from refound_core.inference.predictor import AnalysisCanceled, _prefetch
    from refound_core.inference.sinks import RunInfo, sink_for_request
    from refound_core.inference.sources import source_for_request

    t_start = time.perf_counter()
    timer = _Timer()
    rank, world, local_rank = (0, 1, 0) if request.single_process else _dist_env()
    model = model or request.predictor or _load_model(request, world, local_rank, timer)
    if request.batch_size:
        model.batch_size = int(request.batch_size)
    info = model.describe()
    embed = request.task == "embed"
    task = None if embed else model.check_task(request.task)
    notices = list(model.notices)
    for k in ("featurize", "model"):
        model.timings[k] = 0.0

    source = source or source_for_request(request)
    source.timer = timer.add
    target = sink or sink_for_request(request)
    run_sink = target if world == 1 else target.part(str(rank))
    counts = {"cells": 0, "predicted": 0}
    vals = {"min": math.inf, "max": -math.inf, "sum": 0.0}
    blocks, stream, opened = None, None, False
    try:
        frame = source.locate(request)
        notices += [n for n in frame.notices if n not in notices]
        crs = frame.crs
        sample_blocks, total = _sample_blocks(request, source, frame, int(info.get("image_size") or 256),
                                              rank, world, cancel)
        blocks = _prefetch(sample_blocks, depth=2)
        sample_iter = (s for block in blocks for s in block)
        provenance = {"model": info.get("model"), "checkpoint": info.get("checkpoint"),
                      "cell_size": request.cell_size, "grid_crs": crs, "device": info.get("device"),
                      "precision": info.get("precision")}
        run_info = RunInfo(crs=crs, task="embed" if embed else task, kind=info.get("kind"),
                           classes=info.get("classes"), hidden_size=int(info.get("hidden_size") or 0),
                           embeddings=tuple(request.embeddings), model=str(info.get("model") or ""),
                           provenance=provenance)
        run_sink.open(run_info)
        opened = True
        if embed:
            stream = model.embed_samples(sample_iter, progress=None, is_canceled=cancel)
        else:
            stream = model.predict_samples(sample_iter, task=task, progress=None, is_canceled=cancel)
        for r in stream:
            t0 = time.perf_counter()
            run_sink.write(r)
            timer.add("write", time.perf_counter() - t0)
            counts["cells"] += 1
            if r.sufficient:
                counts["predicted"] += 1
                if not embed and math.isfinite(r.value):
                    vals["min"], vals["max"] = min(vals["min"], r.value), max(vals["max"], r.value)
                    vals["sum"] += r.value
            if counts["cells"] % PROGRESS_EVERY == 0:
                if progress is not None:
                    progress(counts["cells"], total)
                if cancel is not None and cancel():
                    raise AnalysisCanceled("analysis canceled")
        if cancel is not None and cancel():
            raise AnalysisCanceled("analysis canceled")
        t0 = time.perf_counter()
        produced = run_sink.close()  # flush, style, rename
        timer.add("write", time.perf_counter() - t0)
    except BaseException:
        if opened:
            run_sink.abort()
        raise
    finally:
        if stream is not None:
            stream.close()  # stops the featurisation thread first (it consumes the blocks) ...
        if blocks is not None:
            try:
                blocks.close()  # ... then the grid/POI/imagery thread
            except ValueError:  # still running in a thread that did not stop in time
                pass
        source.close()
    if progress is not None:
        progress(counts["cells"], total if total is not None else counts["cells"])

    if world > 1:
        t0 = time.perf_counter()
        _assemble_parts(target, run_sink, world, rank, run_info)
        timer.add("write", time.perf_counter() - t0)
        produced = getattr(target, "path", produced)

    timings = dict(timer.t)
    timings["featurize"] = model.timings.get("featurize", 0.0)
    timings["model"] = model.timings.get("model", 0.0)
    timings["total"] = time.perf_counter() - t_start
    n = counts["predicted"]
    return AnalysisResult(
        out=produced if isinstance(produced, Path) else Path(request.out or "."), task=request.task,
        cells=counts["cells"], predicted=n, insufficient=counts["cells"] - n, timings=timings,
        notices=notices + [m for m in model.notices if m not in notices],
        device=str(info.get("device") or ""), precision=str(info.get("precision") or ""),
        peak_rss_mb=peak_rss_mb(), crs=crs, kind=info.get("kind"), classes=info.get("classes"),
        value_min=vals["min"] if n and not embed else math.nan, value_max=vals["max"] if n and not embed else math.nan,
        value_mean=vals["sum"] / n if n and not embed else math.nan, model=info, output=produced)


def _assemble_parts(target, own_part, world: int, rank: int, info) -> None:
    """Barrier, then rank 0 assembles every rank's part into the target (atomically) and the
    parts are removed. Uses torch.distributed (gloo is enough: only a barrier is exchanged)."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    try:
        dist.barrier()
        if rank == 0:
            target.assemble([target.part(str(r)) for r in range(world)], info)
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
