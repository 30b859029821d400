"""``refound predict``: predict a downstream task for every grid cell of an extent or polygon AOI.

Example::

    refound predict --checkpoint ckpt/uvd --pois pois.gpkg --imagery city.tif \\
        --extent 113.90,22.50,114.05,22.60,EPSG:4326 --task urban_village --out uv.gpkg
    refound predict --checkpoint ckpt/uvd --pois pois.gpkg --imagery stac:catalog.json \\
        --aoi municipalities.gpkg --run-dir uv.run --out uv.gpkg     # resumable: rerun to resume

Every run is sharded and resumable (``refound_core.inference.region``, docs/INFERENCE.md).

Writes a GeoPackage of cell polygons (``cell_id``, ``prediction``, ``poi_count``,
``image_coverage``, ``sufficient``) with its QGIS style embedded, then prints the per-stage
time breakdown (grid, POI join, image reads, featurisation, model, write).
"""
from __future__ import annotations

import argparse
import sys

from refound_core.data.featurize import DEFAULT_MIN_IMAGE_COVERAGE
from refound_core.data.validate import positive_float, positive_int

CLI_MAX_CELLS = 250_000  # a large city at 256 m is ~50,000 cells; more is refused unless --max-cells

PREDICT_TASKS = ("urban_village", "population", "commercial")


def parse_extent(text: str) -> tuple:
    """``XMIN,YMIN,XMAX,YMAX[,CRS]`` -> ``((xmin, ymin, xmax, ymax), crs or None)``."""
    from refound_core.errors import InputError

    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (4, 5):
        raise InputError(f"--extent {text!r} must be XMIN,YMIN,XMAX,YMAX or XMIN,YMIN,XMAX,YMAX,CRS "
                         "(e.g. 113.9,22.5,114.05,22.6,EPSG:4326)")
    try:
        numbers = tuple(float(p) for p in parts[:4])
    except ValueError:
        raise InputError(f"--extent {text!r}: the first four values must be numbers") from None
    return numbers, (parts[4] or None) if len(parts) == 5 else None


def _coverage(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share in [0, 1] (e.g. 0.25)")
    return v


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (refound fine-tune / convert-paddle)")
    parser.add_argument("--pois", default=None, help="POI file: GeoPackage, Shapefile, GeoJSON or .osm.pbf")
    parser.add_argument("--poi-layer", default=None, help="layer of the POI file (default: the first)")
    parser.add_argument("--name-field", default="name", help="POI name attribute (default: name)")
    parser.add_argument("--category-field", default="category", help="POI category attribute (default: category)")
    parser.add_argument("--imagery", default=None,
                        help="RGB satellite raster: a file, any GDAL path (/vsicurl/https://.../cog.tif, /vsis3/..., "
                             "a .vrt) or stac:PATH_OR_URL (a STAC item or catalog; several scenes are mosaicked, "
                             "first valid pixel wins)")
    area = parser.add_mutually_exclusive_group(required=True)
    area.add_argument("--extent", help="XMIN,YMIN,XMAX,YMAX[,CRS]; without CRS the POI file's CRS is assumed")
    area.add_argument("--aoi", metavar="FILE",
                      help="polygon layer (GeoPackage, GeoJSON, Shapefile) instead of --extent: the cells whose "
                           "centre lies inside; several features = several AOIs, each cell tagged with aoi_id")
    parser.add_argument("--aoi-layer", metavar="NAME", default=None,
                        help="layer of the --aoi file (default: the first)")
    parser.add_argument("--run-dir", metavar="DIR", default=None,
                        help="folder of the resumable run: manifest.json and one GeoParquet shard per block "
                             "(default: OUT.run beside --out, removed when the output is written; an explicit "
                             "DIR is kept). Rerun the same command to resume after an interruption")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the run directory's finished shards and start over")
    parser.add_argument("--shard-cells", type=positive_int, default=None,
                        help="cells per shard, the unit of resuming and of torchrun ranks (default: 1024)")
    parser.add_argument("--cell-size", type=positive_float, default=256.0, help="grid cell size in metres (paper: 256)")
    parser.add_argument("--max-cells", type=positive_int, default=CLI_MAX_CELLS,
                        help=f"refuse extents with more grid cells than this (default: {CLI_MAX_CELLS:,}); runs "
                             "above 20,000 cells print a time estimate first")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file (else refused)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="regions per forward pass (default: 64 GPU, 16 CPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--int8", action="store_true",
                        help="CPU only: int8 dynamic quantisation of the model's Linear layers, about 1.4x faster "
                             "on 2 cores at a small accuracy cost (docs/BENCHMARKS.md)")
    parser.add_argument("--min-image-coverage", type=_coverage, default=DEFAULT_MIN_IMAGE_COVERAGE,
                        help="share of valid (non-no-data) pixels a cell's chip needs for the image to be used, "
                             f"in [0, 1] (default: {DEFAULT_MIN_IMAGE_COVERAGE:g}); the per-cell image_used column "
                             "says whether it was")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--task", choices=PREDICT_TASKS, default=None,
                        help="task to predict (default: the checkpoint's own; must match it)")
    parser.add_argument("--out", required=True, help="output GeoPackage (.gpkg), written atomically")


class _Progress:
    """One self-overwriting stderr line across all shards: done/total, cells/s of this run and the
    ETA (or nothing with --quiet). ``start`` prints the run's size and cost estimate first."""

    def __init__(self, quiet: bool):
        import time

        self.quiet = quiet
        self.last = -1
        self.t0, self.done0, self._clock = time.monotonic(), 0, time.monotonic

    def start(self, text: str, done: int, total: int) -> None:
        self.t0, self.done0 = self._clock(), int(done)
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def __call__(self, done: int, total) -> None:
        if self.quiet:
            return
        pct = int(100 * done / total) if total else -1
        if pct == self.last and total:
            return
        self.last = pct if total else done
        text = f"{done}/{total} cells ({pct}%)" if total else f"{done} cells"
        dt = self._clock() - self.t0
        rate = (done - self.done0) / dt if dt > 0 else 0.0
        if rate > 0:
            text += f", {rate:.1f} cells/s"
            if total:
                text += f", ETA {max(0.0, (total - done) / rate) / 60:.1f} min"
        print(f"\r{text}", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if not self.quiet and self.last != -1:
            print(file=sys.stderr)


def request_from_args(args: argparse.Namespace, task: str):
    from refound_core.inference.pipeline import AnalysisRequest

    extent, crs = parse_extent(args.extent) if args.extent else (None, None)
    return AnalysisRequest(aoi=getattr(args, "aoi", None), aoi_layer=getattr(args, "aoi_layer", None),
                           run_dir=getattr(args, "run_dir", None) or True, fresh=bool(getattr(args, "fresh", False)),
                           shard_cells=getattr(args, "shard_cells", None),
                           checkpoint=args.checkpoint, task=task, out=args.out, extent=extent, extent_crs=crs,
                           cell_size=args.cell_size, pois=args.pois, poi_layer=args.poi_layer,
                           name_field=args.name_field, category_field=args.category_field,
                           imagery=args.imagery, device=args.device, batch_size=args.batch_size,
                           int8=bool(getattr(args, "int8", False)),
                           embeddings=tuple(getattr(args, "embeddings", None) or ("h_P", "h_S", "fused")),
                           min_image_coverage=args.min_image_coverage, overwrite=bool(args.overwrite),
                           max_cells=int(getattr(args, "max_cells", CLI_MAX_CELLS)),
                           max_cells_hint="use a smaller extent or a larger --cell-size, or pass --max-cells N "
                                          "to allow it")


def _checkpoint_task(checkpoint) -> str:
    import json
    from pathlib import Path

    from refound_core.errors import InputError

    try:
        meta = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "urban_village"  # let the checkpoint loader report what is wrong with the folder
    name = (meta.get("task") or {}).get("name") if meta.get("head") else None
    if not name:
        raise InputError(f"checkpoint {checkpoint} holds no task head (a pre-trained backbone); use "
                         "`refound embed` for region embeddings, or fine-tune a head first")
    return name


def execute(args: argparse.Namespace, task) -> int:
    """Shared by predict and embed: run the analysis, print notices and the summary."""
    import logging

    from refound_core.inference.region import run_region
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if task is None:  # --task omitted: the checkpoint's own task (read from its config.json only)
        task = _checkpoint_task(args.checkpoint)
    request = request_from_args(args, task)
    progress = _Progress(args.quiet)
    try:
        result = run_region(request, progress=progress)  # sharded, resumable; each shard via run_analysis
    finally:
        progress.finish()
    print(result.summary())  # notices were logged (stderr) when they happened
    return 0


def run(args: argparse.Namespace) -> int:
    return execute(args, args.task)
