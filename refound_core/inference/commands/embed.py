"""``refound embed``: region embeddings (paper 4.3) of every grid cell of an extent, to GeoParquet.

Example::

    refound embed --checkpoint ckpt/refound_base --pois pois.gpkg --imagery city.tif \\
        --extent 385000,6670000,395000,6680000,EPSG:3067 --out emb.parquet

One row per cell: ``cell_id``, ``poi_count``, ``image_coverage``, ``sufficient``, the vectors
``h_P`` ([P] CLS), ``h_S`` ([S] CLS) and ``fused`` as fixed-size float32 lists, and the cell
polygon (read it with ``geopandas.read_parquet``; QGIS 3.22 reads GeoParquet through GDAL >= 3.5
when built with Arrow).
"""
from __future__ import annotations

import argparse

from refound_core.inference.commands.predict import add_common_arguments, execute


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, help="output GeoParquet file (.parquet), written atomically")
    parser.add_argument("--embeddings", nargs="+", choices=("h_P", "h_S", "fused"), default=["h_P", "h_S", "fused"],
                        help="which vectors to write (default: all three)")


def run(args: argparse.Namespace) -> int:
    return execute(args, "embed")
