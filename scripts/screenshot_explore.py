#!/usr/bin/env python3
"""docs/img/explore_*.png: each Explore result rendered by QGIS (for README and docs/PLUGIN.md).

Builds the Explore tests' synthetic city (tests/qgis/explore_city.py: seed 3, 2.56 km, its twin
with one block replaced, embeddings from a small UNTRAINED ReFound through `refound embed`), runs
the four Processing algorithms through ``processing.run`` (the toolbox's and qgis_process's path)
and renders each styled output over the imagery with refound_qgis.map_export.

Usage: ``QT_QPA_PLATFORM=offscreen python scripts/screenshot_explore.py [--work DIR] [--out docs/img]``
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the city builder is shared with the tests that check these algorithms (one definition of the scene)
sys.path[:0] = [str(REPO), str(REPO / "tests" / "qgis"), "/usr/share/qgis/python/plugins"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "docs" / "img"), help="where the PNGs go (default: docs/img)")
    args = ap.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    work = Path(args.work or tempfile.mkdtemp(prefix="refound-explore-shots-"))

    from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer
    from qgis.testing import start_app

    app = start_app()  # noqa: F841 - keep alive
    import processing
    from processing.core.Processing import Processing

    Processing.initialize()
    from explore_city import build
    from refound_core.explore.io import read_embeddings
    from refound_qgis.map_export import export_map_png
    from refound_qgis.processing.provider import RefoundProvider

    provider = RefoundProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    scene = build(work)
    project = QgsProject.instance()
    image = QgsRasterLayer(str(scene["city"] / "imagery.tif"), "imagery")
    twin_image = QgsRasterLayer(str(scene["twin"] / "imagery.tif"), "imagery (twin)")
    pois = QgsVectorLayer(f"{scene['city'] / 'pois.gpkg'}|layername=pois", "POIs", "ogr")
    project.addMapLayers([image, twin_image, pois])
    emb = str(scene["emb"])
    query = str(read_embeddings(emb).cell_ids[40])
    runs = [
        ("find_similar_regions", {"QUERY_CELLS": query, "TOP_K": 10}, "Similar regions (cosine to one clicked cell)",
         image),
        ("cluster_regions", {"K": 5, "POIS": pois, "CATEGORY_FIELD": "category"}, "Region typology (k-means, k = 5)",
         image),
        ("embedding_colours", {}, "Embedding colours (first 3 principal components as RGB)", image),
        ("compare_embeddings", {"OTHER": str(scene["twin_emb"])}, "Change between two snapshots (cosine distance)",
         twin_image),
    ]
    out = Path(args.out)
    for alg, params, title, under in runs:
        target = work / f"{alg}.gpkg"
        processing.run(f"refound:{alg}", {"INPUT": emb, "OUTPUT": str(target), **params})
        layer = QgsVectorLayer(str(target), title, "ogr")  # the style stored in the file is applied
        layer.setOpacity(0.75)
        project.addMapLayer(layer)
        png = export_map_png(out / f"explore_{alg}.png", [layer, under], f"ReFound Explore: {title}",
                             subtitle="SYNTHETIC city (seed 3, 2.56 km); embeddings of an untrained refound_tiny",
                             extent=layer.extent(), legend_layers=[layer], crs=layer.crs(), dpi=80)
        print(f"wrote {png}")
    QgsApplication.processingRegistry().removeProvider(provider)
    project.removeAllMapLayers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
