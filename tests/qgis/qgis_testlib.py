"""Constants and helpers shared by the QGIS plugin tests (imported by conftest and the tests)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PROCESSING_PLUGINS = "/usr/share/qgis/python/plugins"
EPSG = "EPSG:32635"          # UTM 35N (Helsinki's zone); the scene is metric so cells are exact
CELL = 256.0
X0, Y0 = 1500 * CELL, 26060 * CELL   # scene origin on the grid: cells (1500..1503, 26060..26063)
SCENE_CELLS = 4                      # 4 x 4 cells of 256 m
IMAGE_COLS = 3                       # imagery and POIs cover the western 3 columns only
WORDS = ("cafe", "coffee", "bakery", "shop", "market", "school", "park", "bank", "hotel", "bar", "pharmacy",
         "station", "library", "museum", "restaurant", "noodle", "pizza", "books", "fashion", "clinic")
CATEGORIES = ("amenity=cafe", "amenity=restaurant", "shop=bakery", "shop=clothes", "amenity=school",
              "leisure=park", "amenity=bank", "tourism=hotel")


def write_geotiff(path: Path, x0: float, y0_top: float, cols: int, rows: int, pixel: float, seed: int = 0,
                  epsg: int = 32635, nodata_block: bool = False) -> np.ndarray:
    """RGB uint8 GeoTIFF (north-up); returns the pixel array ``[rows, cols, 3]``.

    ``nodata_block``: nodata = 0 on every band, and the western half of the columns set to it.
    """
    from osgeo import gdal, osr

    rng = np.random.default_rng(seed)
    arr = rng.integers(1, 255, (rows, cols, 3), dtype=np.uint8)
    if nodata_block:
        arr[:, : cols // 2] = 0
    ds = gdal.GetDriverByName("GTiff").Create(str(path), cols, rows, 3, gdal.GDT_Byte)
    ds.SetGeoTransform((x0, pixel, 0, y0_top, 0, -pixel))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    ds.SetProjection(srs.ExportToWkt())
    for b in range(3):
        band = ds.GetRasterBand(b + 1)
        band.WriteArray(arr[..., b])
        if nodata_block:
            band.SetNoDataValue(0)
    ds.FlushCache()
    ds = None
    return arr


def write_pois(path: Path, points, names, categories, epsg: int = 4326) -> None:
    from osgeo import ogr, osr

    drv = ogr.GetDriverByName("GPKG")
    if path.exists():
        drv.DeleteDataSource(str(path))
    ds = drv.CreateDataSource(str(path))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    lyr = ds.CreateLayer("pois", srs, ogr.wkbPoint)
    lyr.CreateField(ogr.FieldDefn("title", ogr.OFTString))
    lyr.CreateField(ogr.FieldDefn("kind", ogr.OFTString))
    lyr.CreateField(ogr.FieldDefn("stars", ogr.OFTInteger))
    for (x, y), n, c in zip(points, names, categories):
        f = ogr.Feature(lyr.GetLayerDefn())
        f.SetField("title", n)
        f.SetField("kind", c)
        f.SetField("stars", 3)
        f.SetGeometry(ogr.CreateGeometryFromWkt(f"POINT ({x!r} {y!r})"))
        lyr.CreateFeature(f)
    ds = None


def scene_extent(margin: float = 10.0):
    from qgis.core import QgsRectangle

    return QgsRectangle(X0 + margin, Y0 + margin, X0 + SCENE_CELLS * CELL - margin, Y0 + SCENE_CELLS * CELL - margin)


def expected_cell_count(rect, cell: float = CELL) -> int:
    cols = math.ceil(rect.xMaximum() / cell) - math.floor(rect.xMinimum() / cell)
    rows = math.ceil(rect.yMaximum() / cell) - math.floor(rect.yMinimum() / cell)
    return cols * rows


def show_canvas(qtbot, iface, crs, extent):
    """A shown, square top-level map canvas behind the mocked ``iface``: the mocked iface's canvas
    sits in a hidden main window and never gets its size, so its extent would not be the one set."""
    from qgis.core import QgsCoordinateReferenceSystem
    from qgis.gui import QgsMapCanvas

    canvas = QgsMapCanvas()
    qtbot.addWidget(canvas)
    canvas.resize(400, 400)
    canvas.show()
    qtbot.waitUntil(lambda: canvas.mapSettings().outputSize().width() > 300)
    iface.mapCanvas.return_value = canvas
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem(crs))
    canvas.setExtent(extent)
    return canvas


def fill_dock(dock, pois=None, img=None, *, task="urban_village", checkpoint=None, backend="inprocess",
              device="cpu", cell: float = CELL, batch=None, output=None) -> None:
    """Fill the Analyze panel as a user would for the test scene (fields ``title``/``kind``);
    an argument left None keeps what the panel shows (e.g. its preselected layers)."""
    if pois is not None:
        dock.poi_combo.setLayer(pois)
    if img is not None:
        dock.imagery_combo.setLayer(img)
    dock.name_field.setField("title")
    dock.category_field.setField("kind")
    dock.task_combo.setCurrentIndex(dock.task_combo.findData(task))
    if checkpoint is not None:
        dock.checkpoint_widget.setFilePath(str(checkpoint))
    if backend is not None:
        dock.backend_combo.setCurrentIndex(dock.backend_combo.findData(backend))
    if device is not None:
        dock.device_combo.setCurrentIndex(dock.device_combo.findData(device))
    dock.cell_size_spin.setValue(cell)
    if batch is not None:
        dock.batch_spin.setValue(batch)
    if output is not None:
        dock.output_widget.setFilePath(output)
