"""Fixtures of the QGIS plugin tests: one headless QgsApplication for the session, a mocked
iface, Processing, a tiny synthetic scene (GeoTIFF + POI GeoPackage) and tiny random checkpoints.

Run offscreen (QT_QPA_PLATFORM=offscreen); pytest-qgis is disabled in pytest.ini, so the
application comes from ``qgis.testing.start_app()`` and pytest-qt's ``qapp`` is pointed at it
(two QApplications in one process crash).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
if not os.environ.get("XDG_RUNTIME_DIR"):
    _rt = Path(tempfile.gettempdir()) / f"runtime-{os.getuid()}"
    _rt.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(_rt)

qgis_core = pytest.importorskip("qgis.core", reason="QGIS's Python bindings are not installed (apt install python3-qgis)")

from qgis_testlib import (CATEGORIES, CELL, EPSG, IMAGE_COLS, PROCESSING_PLUGINS, SCENE_CELLS,  # noqa: E402
                          WORDS, X0, Y0, write_geotiff, write_pois)


@pytest.fixture(scope="session")
def qgis_app():
    from qgis.testing import start_app

    app = start_app(cleanup=True)
    if PROCESSING_PLUGINS not in sys.path:
        sys.path.append(PROCESSING_PLUGINS)
    yield app
    from qgis.core import QgsProject

    QgsProject.instance().clear()  # SETUP-NOTES pitfall 4: no layer may outlive the app


@pytest.fixture(scope="session")
def qapp(qgis_app):
    """pytest-qt's application = QGIS's (never a second QApplication)."""
    return qgis_app


@pytest.fixture(scope="session")
def processing_ready(qgis_app):
    from processing.core.Processing import Processing

    Processing.initialize()
    return True


@pytest.fixture
def iface(qgis_app):
    from qgis.testing.mocked import get_iface

    return get_iface()


@pytest.fixture
def project(qgis_app):
    """The project, emptied after the test (layers are owned by it, so teardown is clean)."""
    from qgis.core import QgsProject

    p = QgsProject.instance()
    p.clear()
    yield p
    p.clear()


@pytest.fixture
def clean_settings(qgis_app):
    """QgsSettings under refound/ reset before and after the test."""
    from qgis.core import QgsSettings

    QgsSettings().remove("refound")
    yield
    QgsSettings().remove("refound")


# ---------------------------------------------------------------------------------------- scene
@pytest.fixture(scope="session")
def scene(qgis_app, tmp_path_factory):
    """A 1 x 1 km scene in EPSG:32635 on grid cells 1500..1503 x 26060..26063 (256 m).

    Imagery (4 m pixels) and 60 POIs (in EPSG:4326, so the plugin must reproject them) cover the
    western three columns; the eastern column has neither, so its cells are insufficient.
    Field names are deliberately not 'name'/'category' (the mapping must be picked).
    """
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsPointXY, QgsProject

    d = tmp_path_factory.mktemp("scene")
    pixel = 4.0
    cols, rows = int(IMAGE_COLS * CELL / pixel), int(SCENE_CELLS * CELL / pixel)
    image = write_geotiff(d / "imagery.tif", X0, Y0 + SCENE_CELLS * CELL, cols, rows, pixel, seed=1)
    rng = np.random.default_rng(2)
    xs = X0 + rng.uniform(1.0, IMAGE_COLS * CELL - 1.0, 60)
    ys = Y0 + rng.uniform(1.0, SCENE_CELLS * CELL - 1.0, 60)
    tr = QgsCoordinateTransform(QgsCoordinateReferenceSystem(EPSG), QgsCoordinateReferenceSystem("EPSG:4326"),
                                QgsProject.instance())
    lonlat = [tr.transform(QgsPointXY(float(x), float(y))) for x, y in zip(xs, ys)]
    names = [f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}" for i in range(60)]
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(60)]
    write_pois(d / "pois.gpkg", [(p.x(), p.y()) for p in lonlat], names, cats)
    return {"dir": d, "imagery": d / "imagery.tif", "pois": d / "pois.gpkg", "image": image, "pixel": pixel,
            "poi_xy": np.column_stack([xs, ys]), "names": names, "categories": cats}


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random ReFound checkpoints (refound_tiny) in one folder, one per task plus a backbone:
    ``{"root": folder of checkpoints, "urban_village": path, ...}``."""
    pytest.importorskip("torch", reason="the in-process analysis tests need PyTorch")
    import torch

    from refound_core.data.tokenizer import PoiTokenizer
    from refound_core.data.vocab import CategoryVocab
    from refound_core.model.checkpoint import save_checkpoint
    from refound_core.model.config import refound_tiny
    from refound_core.model.heads import TaskHead
    from refound_core.model.refound import ReFound

    root = tmp_path_factory.mktemp("ckpt")
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(WORDS) + list("abcdefghijklmnopqrstuvwxyz")
    tok = PoiTokenizer(tokens)
    tok.save(root / "tokenizer")
    vocab = CategoryVocab.build(CATEGORIES)
    cfg = refound_tiny(vocab_size=len(tok), num_categories=len(vocab))
    torch.manual_seed(0)
    model = ReFound(cfg).eval()
    bundle = root / "demo"
    out = {"root": bundle}
    for task, kind in (("urban_village", "binary"), ("population", "regression"), ("commercial", "regression")):
        head = TaskHead(cfg.hidden_size, kind=kind)
        meta = {"name": task, "kind": kind}
        if kind == "regression":
            meta["target_scaler"] = {"mean": 100.0, "std": 10.0}
        out[task] = save_checkpoint(bundle / task, model, head, task=meta, tokenizer_dir=root / "tokenizer",
                                    category_vocab=vocab)
    out["backbone"] = save_checkpoint(bundle / "backbone", model, None, tokenizer_dir=root / "tokenizer",
                                      category_vocab=vocab)
    return out


# ---------------------------------------------------------------------------------------- layers
@pytest.fixture
def scene_layers(project, scene):
    """The scene's POI and imagery layers added to the (emptied) project."""
    from qgis.core import QgsRasterLayer, QgsVectorLayer

    pois = QgsVectorLayer(f"{scene['pois']}|layername=pois", "pois", "ogr")
    img = QgsRasterLayer(str(scene["imagery"]), "imagery")
    assert pois.isValid() and img.isValid()
    project.addMapLayers([img, pois])
    return pois, img


@pytest.fixture(scope="session")
def auth_db(qgis_app):
    """QGIS's authentication database, unlocked with a master password (start_app's profile is a
    temporary folder, so this never touches a user's database)."""
    from qgis.core import QgsApplication

    am = QgsApplication.authManager()
    assert am.setMasterPassword("refound-test-master-password", True)
    return am


@pytest.fixture
def provider(processing_ready):
    """The plugin's Processing provider, registered as QGIS registers it (classFactory + initProcessing)."""
    import refound_qgis

    plugin = refound_qgis.classFactory(None)
    plugin.initProcessing()
    yield plugin.provider
    plugin.unload()
