"""QML styles (plain text, no torch/qgis), writer merging, and the style as QGIS itself reads it."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from refound_core.inference import styles
from refound_core.inference.results import CellResult
from refound_core.inference.writers import GeoPackageWriter, GeoParquetWriter, temp_path

REPO = Path(__file__).resolve().parents[2]


def _cells(n, task="urban_village", seed=0, offset=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        suff = i % 4 != 0
        v = float(rng.uniform(0, 1) if task == "urban_village" else rng.lognormal(5, 1)) if suff else math.nan
        x = 256.0 * (i + offset)
        out.append(CellResult(f"EPSG:32650/256/{i + offset}_0", (x, 0.0, x + 256, 256.0), "EPSG:32650", v,
                              poi_count=i, image_coverage=0.5, sufficient=suff,
                              fused=np.full(8, i, np.float32) if suff else None))
    return out


def test_styles_module_needs_neither_torch_nor_qgis():
    code = ("import sys, importlib.abc\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'torch', 'qgis', 'PyQt5', 'numpy'}: raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, B())\n"
            "from refound_core.inference import styles\n"
            "print(len(styles.qml_for_task('population', [1.0, 2.0, 30.0])))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-1500:]


def test_quantile_breaks():
    b = styles.quantile_breaks(range(101), classes=4)
    assert b == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert styles.quantile_breaks([7.0] * 5) == [6.5, 7.5]
    assert styles.quantile_breaks([float("nan")]) == [0.0, 1.0]
    skewed = styles.quantile_breaks([1, 1, 1, 1, 2, 3, 1000], classes=5)
    assert all(a < b for a, b in zip(skewed, skewed[1:]))
    with pytest.raises(ValueError):
        styles.graduated_qml([1.0, 1.0])


@pytest.mark.parametrize("task", ["urban_village", "population", "commercial"])
def test_qml_is_a_rule_renderer_with_a_hatched_insufficient_rule(task):
    qml = styles.qml_for_task(task, np.linspace(0, 100, 50))
    root = ET.fromstring(qml.split("\n", 1)[1])  # drop the DOCTYPE line
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "RuleRenderer"
    rules = renderer.find("rules").findall("rule")
    symbols = {s.get("name"): s for s in renderer.find("symbols").findall("symbol")}
    assert {r.get("symbol") for r in rules} == set(symbols)
    last = rules[-1]
    assert last.get("filter") == 'NOT "sufficient"'
    props = {p.get("k"): p.get("v") for p in symbols[last.get("symbol")].iter("prop")}
    assert props["style"] == "b_diagonal"
    if task == "urban_village":
        assert any("> 0.5" in r.get("filter") for r in rules) and any("<= 0.5" in r.get("filter") for r in rules)
        assert len(rules) == 5


def test_part_merging_for_distributed_runs(tmp_path):
    a, b = _cells(10), _cells(7, offset=10, seed=1)
    for name, rows in (("p0.gpkg", a), ("p1.gpkg", b)):
        with GeoPackageWriter(tmp_path / name, "EPSG:32650", "urban_village") as w:
            w.write_many(rows)
    with GeoPackageWriter(tmp_path / "all.gpkg", "EPSG:32650", "urban_village") as w:
        w.append_part(tmp_path / "p0.gpkg")
        w.append_part(tmp_path / "p1.gpkg")
    import geopandas as gpd

    merged = gpd.read_file(tmp_path / "all.gpkg", layer="cells")
    assert list(merged.cell_id) == [r.cell_id for r in a + b]
    np.testing.assert_array_equal(merged.prediction.isna().to_numpy(), [not r.sufficient for r in a + b])

    for name, rows in (("e0.parquet", a), ("e1.parquet", b)):
        with GeoParquetWriter(tmp_path / name, "EPSG:32650", 8, ("fused",)) as w:
            w.write_many(rows)
    with GeoParquetWriter(tmp_path / "emb.parquet", "EPSG:32650", 8, ("fused",)) as w:
        w.append_part(tmp_path / "e0.parquet")
        w.append_part(tmp_path / "e1.parquet")
    df = gpd.read_parquet(tmp_path / "emb.parquet")
    assert list(df.cell_id) == [r.cell_id for r in a + b] and df.crs.to_epsg() == 32650
    assert float(df.fused.iloc[1][0]) == 1.0 and np.isnan(df.fused.iloc[0]).all()


def test_writer_aborts_on_exception_and_keeps_old_file(tmp_path):
    target = tmp_path / "out.gpkg"
    target.write_bytes(b"old")
    with pytest.raises(KeyError):
        with GeoPackageWriter(target, "EPSG:32650", "urban_village", chunk_size=3) as w:
            w.write_many(_cells(10))  # three chunks already on disk in the temp file
            assert temp_path(target).exists()
            raise KeyError("boom")
    assert target.read_bytes() == b"old" and not temp_path(target).exists()


QGIS_CHECK = r"""
import sys
from qgis.core import QgsApplication, QgsVectorLayer, QgsRenderContext, QgsExpressionContextUtils
app = QgsApplication([], False)
app.initQgis()
layer = QgsVectorLayer(sys.argv[1] + "|layername=cells", "cells", "ogr")
assert layer.isValid(), "layer not valid"
r = layer.renderer()
print("renderer", r.type())
labels = {item.ruleKey(): item.label() for item in r.legendSymbolItems()}
ctx = QgsRenderContext()
ctx.expressionContext().appendScopes(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
r.startRender(ctx, layer.fields())
for f in layer.getFeatures():
    ctx.expressionContext().setFeature(f)
    syms = r.symbolsForFeature(f, ctx)
    style = syms[0].symbolLayer(0).properties()["style"] if len(syms) == 1 else None
    legend = "|".join(labels[k] for k in sorted(r.legendKeysForFeature(f, ctx)) if k in labels)  # not the root
    print("feature", f["cell_id"], bool(f["sufficient"]), len(syms), style, legend)
r.stopRender(ctx)
del r, layer
app.exitQgis()
"""


def _qgis_draws(gpkg: Path, tmp_path: Path) -> tuple:
    """How QGIS's own renderer draws each cell of ``gpkg``: ``(stdout lines, [(cell_id, sufficient,
    number of rules, fill style, legend label)])``."""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", QGIS_CHECK, str(gpkg)], capture_output=True, text=True, env=env,
                         timeout=120)
    lines = res.stdout.splitlines()
    assert any(ln.startswith("renderer") for ln in lines), res.stdout + res.stderr[-2000:]
    return lines, [tuple(ln.split(" ", 5)[1:]) for ln in lines if ln.startswith("feature")]


@pytest.mark.qgis
@pytest.mark.parametrize("task", ["urban_village", "population"])
def test_qgis_opens_the_geopackage_styled(tmp_path, task):
    pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
    rows = _cells(20, task=task)
    with GeoPackageWriter(tmp_path / "cells.gpkg", "EPSG:32650", task) as w:
        w.write_many(rows)
    lines, feats = _qgis_draws(tmp_path / "cells.gpkg", tmp_path)
    assert "renderer RuleRenderer" in lines
    assert len(feats) == len(rows)
    for cell_id, suff, nsyms, style, _ in feats:
        assert nsyms == "1", f"{cell_id} is drawn by {nsyms} rules"  # every cell exactly one class
        assert (style == "b_diagonal") == (suff == "False")


def test_multiclass_style_has_one_named_rule_per_class():
    qml = styles.qml_for_task("land_use", [0, 2, 1], kind="multiclass", classes=["park", "water", "old town"])
    rules = ET.fromstring(qml.split("\n", 1)[1]).find("renderer-v2").find("rules").findall("rule")
    assert [r.get("label") for r in rules[:3]] == ["park", "water", "old town"]
    assert rules[2].get("filter") == '"sufficient" AND "prediction" = 2'
    assert rules[-1].get("filter") == 'NOT "sufficient"'
    # without names (an old checkpoint): classes up to the largest predicted index
    unnamed = styles.qml_for_task("land_use", [0.0, 3.0, float("nan")], kind="multiclass")
    labels = [r.get("label") for r in ET.fromstring(unnamed.split("\n", 1)[1]).iter("rule")]
    assert labels[:4] == ["class 0", "class 1", "class 2", "class 3"] and len(labels) == 5


@pytest.mark.qgis
def test_qgis_draws_a_multiclass_geopackage_with_the_class_names(tmp_path):
    pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
    classes = ["park", "water", "old town"]
    rows = [CellResult(f"EPSG:32650/256/{i}_0", (256.0 * i, 0.0, 256.0 * (i + 1), 256.0), "EPSG:32650",
                       float(i % 3), sufficient=True) for i in range(6)]
    with GeoPackageWriter(tmp_path / "lu.gpkg", "EPSG:32650", "land_use", kind="multiclass", classes=classes) as w:
        w.write_many(rows)
    _, feats = _qgis_draws(tmp_path / "lu.gpkg", tmp_path)
    assert len(feats) == 6
    predicted = {r.cell_id: int(r.value) for r in rows}
    for cell_id, _, nsyms, _, label in feats:
        assert nsyms == "1" and label == classes[predicted[cell_id]]  # one rule, named after the predicted class
