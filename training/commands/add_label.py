"""``refound add-label``: aggregate any raster or vector layer to a dataset's cells as a new label.

A task is a head + a label source (paper 5.1.2 builds its three labels this way); this command
makes the label source, then ``refound evaluate --task NAME`` / ``refound finetune --task NAME``
train on it (its kind is stored with the label). Aggregation rules:
refound_core/data/custom_labels.py and docs/DATA-FORMAT.md; examples in ``EXAMPLES`` (--help).
"""
from __future__ import annotations

import argparse

from refound_core.data.custom_labels import STATS


EXAMPLES = """examples:
  refound add-label --data DS --name night_light --source viirs.tif                  # raster mean
  refound add-label --data DS --name jobs --source jobs.gpkg --field jobs            # area-weighted sum
  refound add-label --data DS --name land_use --source landuse.gpkg --field class    # majority class
  refound add-label --data DS --name green --source parks.gpkg --threshold 0.3       # binary: > 30 % park
then: refound evaluate --data DS --task NAME ... (the kind is stored with the label)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--data", required=True, help="region dataset folder (refound build-dataset) to add the label to")
    p.add_argument("--name", required=True, help="label (and task) name, e.g. night_light")
    p.add_argument("--source", required=True,
                   help="raster (any GDAL format, by suffix: .tif .vrt ...) or vector layer (polygons or points)")
    p.add_argument("--field", help="attribute of a vector source: numeric (sum / mean) or text classes (majority)")
    p.add_argument("--stat", choices=STATS,
                   help="per-cell aggregation (default: raster mean; polygons fraction, or sum with a numeric "
                        "field, majority with a text field; points count, or sum with --field)")
    p.add_argument("--threshold", type=float,
                   help="make a binary label: 1 where the aggregated value is above this (e.g. 0.2 of the cell "
                        "covered, as the paper's urban villages)")
    p.add_argument("--band", type=int, default=1, help="raster band (default 1)")
    p.add_argument("--layer", help="layer of a multi-layer vector source (GeoPackage)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing label of that name")


def run(args) -> int:
    import numpy as np

    from refound_core.data.custom_labels import label_from_source
    from refound_core.data.dataset import RegionDataset, add_label_column, check_new_label

    ds = RegionDataset(args.data)
    check_new_label(ds, args.name, args.overwrite)  # before any aggregation work
    col = label_from_source(args.source, ds.cells(), field=args.field, stat=args.stat, threshold=args.threshold,
                            band=args.band, layer=args.layer)
    known = np.isfinite(col.values)
    if not known.any():
        from refound_core.errors import InputError
        raise InputError(f"{args.source} does not overlap any cell of {ds.folder} (every value is unknown); "
                         "check that the source covers the dataset's extent and has a CRS")
    info = {**col.info, "kind": col.kind, "stat": col.stat, "classes": col.classes}
    add_label_column(ds.folder, args.name, col.values, info, overwrite=args.overwrite)
    v = col.values[known]
    if col.kind == "multiclass":
        counts = np.bincount(v.astype(int), minlength=len(col.classes))
        summary = ", ".join(f"{c}: {n}" for c, n in zip(col.classes, counts))
    elif col.kind == "binary":
        summary = f"{int(v.sum())} positive, {int((v == 0).sum())} negative"
    else:
        summary = f"min {v.min():.4g}, median {np.median(v):.4g}, max {v.max():.4g}"
    print(f"added label {args.name!r} ({col.kind}, {col.stat}) to {ds.folder}: {int(known.sum())} of {len(ds)} "
          f"cells known; {summary}")
    print(f"next: refound evaluate --data {ds.folder} --task {args.name} --checkpoint CKPT --out DIR")
    return 0
