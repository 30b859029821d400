#!/usr/bin/env python3
"""The QGIS half of `make demo` (run by scripts/demo.py in Debian's Python with QGIS offscreen).

Runs the plugin's Processing algorithms headless through `processing.run` (the same code path as
the toolbox, Model Builder and `qgis_process`), styles each output with the plugin's styling,
saves the style into the GeoPackage (so QGIS shows it when the file is opened), and renders a
PNG map of each result with QGIS's renderer: imagery underneath, styled cells on top, legend.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), "/usr/share/qgis/python/plugins"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--city", required=True, help="synthetic city folder (imagery.tif, pois.gpkg)")
    ap.add_argument("--uv-head", required=True)
    ap.add_argument("--pop-head", required=True)
    ap.add_argument("--helsinki-pois", required=True)
    ap.add_argument("--helsinki-head", required=True)
    ap.add_argument("--helsinki-population", required=True)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from qgis.core import (QgsApplication, QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorLayer,
                           QgsProcessingFeedback)
    from qgis.testing import start_app

    app = start_app()
    import processing
    from processing.core.Processing import Processing

    Processing.initialize()
    from refound_qgis.map_export import export_map_png
    from refound_qgis.processing.provider import RefoundProvider
    from refound_qgis import results

    provider = RefoundProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    out = Path(args.out)
    city = Path(args.city)
    project = QgsProject.instance()

    class Progress(QgsProcessingFeedback):
        def __init__(self, label):
            super().__init__()
            self.label, self.last = label, -10
            self.progressChanged.connect(self._show)

        def _show(self, pct):
            if pct - self.last >= 10 or pct >= 100:
                self.last = pct
                print(f"  {self.label}: {pct:5.1f}%", flush=True)

    imagery = QgsRasterLayer(str(city / "imagery.tif"), "synthetic imagery (1 m)")
    pois = QgsVectorLayer(f"{city / 'pois.gpkg'}|layername=pois", "synthetic POIs", "ogr")
    assert imagery.isValid() and pois.isValid(), "demo inputs could not be opened by QGIS"
    project.addMapLayers([imagery, pois])
    ext = imagery.extent()
    extent_param = f"{ext.xMinimum()},{ext.xMaximum()},{ext.yMinimum()},{ext.yMaximum()} [{imagery.crs().authid()}]"
    written = []
    runs = [("predict_urban_villages", "urban_village", args.uv_head, "Urban villages"),
            ("predict_population", "population", args.pop_head, "Population")]
    for alg, task, head, label in runs:
        target = out / f"city_{task}.gpkg"
        if target.exists():
            target.unlink()
        print(f"refound:{alg} over the downstream city -> {target}", flush=True)
        res = processing.run(f"refound:{alg}", {
            "EXTENT": extent_param, "POIS": pois, "NAME_FIELD": "name", "CATEGORY_FIELD": "category",
            "IMAGERY": imagery, "CHECKPOINT": str(head), "BACKEND": 0, "DEVICE": 0, "CELL_SIZE": 256,
            "BATCH_SIZE": 16, "OUTPUT": str(target)}, feedback=Progress(alg))
        layer = QgsVectorLayer(res["OUTPUT"], f"{label} (ReFound, {dt.date.today()})", "ogr")
        results.apply_style(layer, task)
        layer.saveStyleToDatabase("default", "ReFound style", True, "")
        project.addMapLayer(layer)
        layer.setOpacity(0.6)  # let the imagery show through on the printed map
        png = out / f"map_city_{task}.png"
        export_map_png(png, [layer, imagery], f"ReFound: {label.lower()} over a synthetic city",
                       subtitle=f"SYNTHETIC data (refound synthcity {city.name}); model {Path(head).name}",
                       extent=ext)
        written += [target, png]

    print("real data: Helsinki OpenStreetMap POIs, population head trained on the HSY grid", flush=True)
    hpois = QgsVectorLayer(f"{args.helsinki_pois}|layername=pois", "OpenStreetMap POIs", "ogr")
    hpop = QgsVectorLayer(args.helsinki_population, "HSY population grid 2020", "ogr")
    assert hpois.isValid() and hpop.isValid(), "Helsinki inputs could not be opened by QGIS"
    project.addMapLayers([hpop, hpois])
    hext = hpois.extent()
    target = out / "helsinki_population.gpkg"
    if target.exists():
        target.unlink()
    res = processing.run("refound:predict_population", {
        "EXTENT": f"{hext.xMinimum()},{hext.xMaximum()},{hext.yMinimum()},{hext.yMaximum()} [{hpois.crs().authid()}]",
        "POIS": hpois, "NAME_FIELD": "name", "CATEGORY_FIELD": "category", "CHECKPOINT": str(args.helsinki_head),
        "BACKEND": 0, "DEVICE": 0, "CELL_SIZE": 256, "BATCH_SIZE": 16, "OUTPUT": str(target)},
        feedback=Progress("helsinki"))
    layer = QgsVectorLayer(res["OUTPUT"], f"Population (ReFound, POIs only, {dt.date.today()})", "ogr")
    results.apply_style(layer, "population")
    layer.saveStyleToDatabase("default", "ReFound style", True, "")
    project.addMapLayer(layer)
    png = out / "map_helsinki_population.png"
    export_map_png(png, [hpois, layer], "ReFound: population from POIs only, central Helsinki",
                   subtitle="REAL data: © OpenStreetMap contributors (ODbL); head trained on © HSY population grid (CC BY 4.0); no imagery",
                   extent=layer.extent(), legend_layers=[layer], crs=layer.crs())
    written += [target, png]
    QgsApplication.processingRegistry().removeProvider(provider)
    project.removeAllMapLayers()
    for f in written:
        print(f"  wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
