"""Resumable, sharded runs over a whole city or region (``refound predict/embed`` with a file output).

::

    checks (inputs, output, lock) ─▶ model ─▶ plan (grid, AOI, shards) ─▶ run dir (manifest)
        ─▶ for each pending shard of this rank: run_analysis(ShardSource, shard sink)  [atomic file]
        ─▶ (barrier) ─▶ rank 0 assembles the final GeoPackage / GeoParquet (atomic) ─▶ summary

The CLI calls :func:`run_region` for every file output; every shard goes through
:func:`refound_core.inference.pipeline.run_analysis` (the one analysis path) with a source
bounded to the shard. Rules:

* Resume: rerunning the same command computes only the shards without a file (after a kill -9
  too); a finished run's final file is refused without ``--overwrite`` like any output; with
  ``--overwrite`` and an explicit ``--run-dir`` whose shards are all finished, the output is
  re-assembled without computing anything. ``--fresh`` discards the finished shards.
* The default run dir (``OUT.run``) is removed after the final file is written; an explicit
  ``--run-dir`` is kept (re-assembly, inspection).
* A changed model, task, grid or input is refused (the manifest's fingerprint, ``rundir.py``).
* Locks: the output (``.OUT.lock``) and an explicit run dir (``.DIR.lock``) are held by rank 0, so
  two concurrent runs refuse.
* ``torchrun``: rank 0 writes the manifest, then every rank takes the pending shards
  ``r, r + world, ...`` of its ``pending_at_start``; a rank that dies leaves its shards pending
  for the rerun. Only a barrier is exchanged (gloo).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("refound.inference")


def _fingerprint(request, imagery, model, info, plan, shard_cells) -> dict:
    from refound_core.inference import rundir

    return {"task": request.task, "model": str(info.get("model") or ""),
            "model_hash": rundir.model_hash(request.checkpoint),
            "grid": {"crs": plan.grid.crs, "cell_size": float(request.cell_size), "ranges": list(plan.ranges),
                     "shard_cells": int(shard_cells)},
            "inputs": {"pois": rundir.input_stamp(request.pois), "poi_layer": request.poi_layer,
                       "name_field": request.name_field, "category_field": request.category_field,
                       "imagery": rundir.input_stamp(request.imagery),
                       "aoi": {"sha256": rundir.file_hash(request.aoi), "layer": request.aoi_layer}
                       if request.aoi else None,
                       "extent": None if request.aoi else [list(request.extent or ()), request.extent_crs]},
            "embeddings": list(request.embeddings) if request.task == "embed" else None,
            "min_image_coverage": getattr(model, "min_image_coverage", request.min_image_coverage),
            "int8": bool(request.int8)}  # quantised shards differ from float ones: never mixed in one run


def _run_info(request, info, crs, task):
    from refound_core.inference.sinks import RunInfo

    provenance = {"model": info.get("model"), "checkpoint": info.get("checkpoint"), "cell_size": request.cell_size,
                  "grid_crs": crs, "device": info.get("device"), "precision": info.get("precision")}
    return RunInfo(crs=crs, task=task, kind=info.get("kind"), classes=info.get("classes"),
                   hidden_size=int(info.get("hidden_size") or 0), embeddings=tuple(request.embeddings),
                   model=str(info.get("model") or ""), provenance=provenance)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def run_region(request, progress=None, cancel=None):
    """Run ``request`` as a resumable sharded run in ``request.run_dir``; see the module doc."""
    from refound_core.data.validate import OutputLock, check_output
    from refound_core.inference import pipeline, rundir

    pipeline._validate(request, None, None, None)
    rank, world, local = pipeline._dist_env()
    out = Path(request.out)
    explicit = request.run_dir not in (None, "", True)
    run_dir = Path(request.run_dir) if explicit else rundir.default_run_dir(out)
    locks, tmp = [], None
    created = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
            created = True
    try:
        if rank == 0:
            check_output(out, overwrite=request.overwrite, what="output")
            locks.append(OutputLock(out).acquire())
            if explicit:
                locks.append(OutputLock(run_dir).acquire())
        tmp = tempfile.mkdtemp(prefix="refound-mosaic-")
        return _run(request, out, run_dir, explicit, rank, world, local, tmp, progress, cancel)
    finally:
        for lock in reversed(locks):
            lock.release()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(request, out, run_dir, explicit, rank, world, local, tmp, progress, cancel):
    from refound_core.data.imagery_source import resolve_imagery
    from refound_core.data.validate import COST_WARN_CELLS, check_imagery, check_imagery_overlap, cost_estimate
    from refound_core.inference import pipeline, rundir, shards
    from refound_core.inference.region_plan import SHARD_CELLS, ShardSource, plan_region, shard_tags

    t_start = time.perf_counter()
    imagery = resolve_imagery(request.imagery, tmp)
    notices = []
    if imagery:
        for n in check_imagery(imagery):
            log.warning("%s", n)
            notices.append(n)
    timer = pipeline._Timer()
    model = request.predictor or pipeline._load_model(request, world, local, timer)
    if request.batch_size:
        model.batch_size = int(request.batch_size)
    info = model.describe()
    embed = request.task == "embed"
    task = "embed" if embed else model.check_task(request.task)
    shard_cells = int(request.shard_cells or SHARD_CELLS)
    ShardSource(request, imagery, None, (0, 1, 0, 1), None)  # the FileCellSource checks (no data, missing files)
    plan = plan_region(request, imagery, shard_cells)
    notices += [n for n in plan.notices if n not in notices]
    if imagery:
        check_imagery_overlap(imagery, plan.grid.bounds_of_ranges(plan.ranges), plan.grid.crs)
    fp = _fingerprint(request, imagery, model, info, plan, shard_cells)
    if rank == 0:
        rundir.prepare(run_dir, fp, plan.shards, bool(request.fresh), out)
    _barrier(world)
    manifest = rundir.read_manifest(run_dir)
    by_index = {s["index"]: s for s in plan.shards}
    pending = manifest["pending_at_start"]
    mine = pending[rank::world]
    done_cells = plan.total - sum(by_index[i]["cells"] for i in pending)
    todo = sum(by_index[i]["cells"] for i in mine)
    estimate = cost_estimate(todo, str(info.get("device") or request.device))
    if plan.total > COST_WARN_CELLS:
        log.warning("large run: %s", cost_estimate(plan.total, str(info.get("device") or request.device)))
    start = getattr(progress, "start", None)
    text = (f"{plan.total:,} cells in {len(plan.shards)} shards, {len(plan.shards) - len(pending)} already "
            f"finished ({run_dir}); this process: {estimate}")
    if start is not None:
        start(text, done_cells, plan.total)
    else:
        log.info("%s", text)
    timings = {}
    counted = {"cells": 0}
    for i in mine:
        shard = by_index[i]
        tags = shard_tags(plan, shard["ranges"])
        source = ShardSource(request, imagery, plan, shard["ranges"], tags)
        sink = shards.shard_sink(rundir.shard_path(run_dir, i), embed)
        if tags is not None:
            sink = shards.TagSink(sink, tags)
        base = done_cells + counted["cells"]
        sub = dataclasses.replace(request, run_dir=None, single_process=True, imagery=imagery, predictor=None)
        res = pipeline.run_analysis(sub, source=source, model=model, sink=sink, cancel=cancel,
                                    progress=None if progress is None else
                                    (lambda d, t, base=base: progress(base + d, plan.total)))
        counted["cells"] += res.cells
        for k, v in res.timings.items():
            if k != "total":
                timings[k] = timings.get(k, 0.0) + v
        notices += [n for n in res.notices if n not in notices]
    _barrier(world)
    run_info = _run_info(request, info, plan.grid.crs, task)
    stats = {"cells": counted["cells"], "predicted": 0, "min": math.nan, "max": math.nan, "sum": 0.0}
    if rank == 0:
        missing = sorted(set(by_index) - rundir.finished(run_dir, plan.shards))
        if missing:
            raise RuntimeError(f"run directory {run_dir}: shards {missing[:10]} are missing (a rank failed); "
                               "run the same command again to compute them")
        t0 = time.perf_counter()
        stats = shards.assemble([rundir.shard_path(run_dir, s["index"]) for s in plan.shards], out, run_info, embed)
        timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
        rundir.write_manifest(run_dir, dict(rundir.read_manifest(run_dir), status="complete", pending_at_start=[]))
        if not explicit:
            shutil.rmtree(run_dir, ignore_errors=True)
    _barrier(world)
    timings["load"] = timings.get("load", 0.0) + timer.t.get("load", 0.0)
    timings["total"] = time.perf_counter() - t_start
    n = stats["predicted"]
    ok = n and not embed and math.isfinite(stats["min"])
    return pipeline.AnalysisResult(
        out=out, task=request.task, cells=stats["cells"], predicted=n, insufficient=stats["cells"] - n,
        timings=timings, notices=notices + [m for m in model.notices if m not in notices],
        device=str(info.get("device") or ""), precision=str(info.get("precision") or ""),
        peak_rss_mb=pipeline.peak_rss_mb(), crs=plan.grid.crs, kind=info.get("kind"), classes=info.get("classes"),
        value_min=stats["min"] if ok else math.nan, value_max=stats["max"] if ok else math.nan,
        value_mean=stats["sum"] / n if ok else math.nan, model=info, output=out)
