"""Explore algorithms in real headless QGIS over a synthetic city whose urban villages, land uses
and changed block are known (tests/qgis/explore_city.py), plus the CLI and bad-input messages."""
from __future__ import annotations

import numpy as np
import pytest

from qgis_testlib import show_canvas  # noqa: E402

pytestmark = pytest.mark.qgis


@pytest.fixture(scope="session")
def explore_city(tmp_path_factory):
    pytest.importorskip("torch", reason="embeddings come from the model's embed path")
    from explore_city import build

    return build(tmp_path_factory.mktemp("explore"))


def _features(path):
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(str(path), "out", "ogr")
    assert layer.isValid(), path
    rows = {f["cell_id"]: {k.name(): f[k.name()] for k in layer.fields()} for f in layer.getFeatures()}
    renderer = layer.renderer().clone()
    del layer
    return rows, renderer


def test_similar_urban_village_query_finds_urban_villages(provider, project, explore_city, tmp_path):
    """precision@k of urban-village queries against the base rate, both measured here."""
    import processing
    from qgis.core import QgsGraduatedSymbolRenderer

    from explore_city import truth
    from refound_core.explore.io import read_embeddings

    table = read_embeddings(explore_city["emb"])
    is_uv, _ = truth(explore_city["city"], table.geometry)
    uv_ids = [str(c) for c, u, v in zip(table.cell_ids, is_uv, table.valid) if u and v]
    base = is_uv[table.valid].mean()
    assert 3 <= len(uv_ids) and base < 0.5
    k, precisions = 10, []
    for i, q in enumerate(uv_ids[:6]):
        out = tmp_path / f"sim{i}.gpkg"
        res = processing.run("refound:find_similar_regions", {"INPUT": str(explore_city["emb"]), "QUERY_CELLS": q,
                                                              "TOP_K": k, "OUTPUT": str(out)})
        assert res["CELLS"] == len(table.cell_ids)
        rows, renderer = _features(out)
        assert isinstance(renderer, QgsGraduatedSymbolRenderer) and renderer.classAttribute() == "similarity"
        top = [c for c, r in rows.items() if r["top_k"]]
        assert len(top) == k and q not in top and rows[q]["query"]
        uv = {c for c, u in zip(table.cell_ids, is_uv) if u}
        precisions.append(np.mean([c in uv for c in top]))
    # a clear margin: at least 1.5 x the base rate and 15 points above it
    assert np.mean(precisions) > max(1.5 * base, base + 0.15), (precisions, base)


def test_clusters_separate_land_uses(provider, project, explore_city, tmp_path):
    import processing
    from qgis.core import QgsCategorizedSymbolRenderer
    from sklearn.metrics import adjusted_rand_score

    from explore_city import truth
    from refound_core.explore.io import read_embeddings

    table = read_embeddings(explore_city["emb"])
    _, kinds = truth(explore_city["city"], table.geometry)
    out = tmp_path / "clusters.gpkg"
    res = processing.run("refound:cluster_regions", {"INPUT": str(explore_city["emb"]), "K": 6, "OUTPUT": str(out)})
    assert res["K"] == 6
    rows, renderer = _features(out)
    assert isinstance(renderer, QgsCategorizedSymbolRenderer) and len(renderer.categories()) == 6
    labels = [rows[str(c)]["cluster"] for c in table.cell_ids]
    ari = adjusted_rand_score(kinds, labels)
    rng = np.random.default_rng(0)  # chance level measured, not assumed
    chance = max(adjusted_rand_score(kinds, rng.permutation(labels)) for _ in range(20))
    assert ari > 0 and ari > chance, (ari, chance)


def test_colours_are_data_defined(provider, project, explore_city, tmp_path):
    import processing
    from qgis.core import QgsSymbolLayer

    out = tmp_path / "colours.gpkg"
    processing.run("refound:embedding_colours", {"INPUT": str(explore_city["emb"]), "OUTPUT": str(out)})
    rows, renderer = _features(out)
    sym = renderer.symbol().symbolLayer(0)
    assert sym.dataDefinedProperties().property(QgsSymbolLayer.PropertyFillColor).isActive()
    colours = [r["colour"] for r in rows.values()]
    assert all(isinstance(c, str) and len(c) == 7 and c[0] == "#" for c in colours)
    assert len(set(colours)) > 10  # places differ in colour


def test_compare_flags_the_changed_block(provider, project, explore_city, tmp_path):
    import processing

    out = tmp_path / "change.gpkg"
    processing.run("refound:compare_embeddings", {"INPUT": str(explore_city["emb"]),
                                                  "OTHER": str(explore_city["twin_emb"]), "OUTPUT": str(out)})
    rows, _ = _features(out)
    changed = explore_city["changed"]
    assert changed <= set(rows)
    n = len(changed)
    top = {c for c, r in rows.items() if r["rank"] and r["rank"] <= n}
    assert len(top & changed) >= n - 1, sorted(top - changed)
    unchanged = [r["distance"] for c, r in rows.items() if c not in changed and r["distance"] is not None]
    assert max(unchanged) < min(rows[c]["distance"] for c in changed)


def test_compare_flags_cells_in_one_layer_only(explore_city, tmp_path):
    import pyarrow.parquet as pq

    from refound_core.explore.compare import compare
    from refound_core.explore.io import read_embeddings

    t = pq.read_table(explore_city["twin_emb"])
    part = tmp_path / "part.parquet"
    pq.write_table(t.slice(0, t.num_rows - 5), part)
    res = compare(read_embeddings(explore_city["emb"]), read_embeddings(part))
    assert (res["status"] == "only_first").sum() == 5 and (res["rank"][res["status"] == "only_first"] == 0).all()


def test_bad_inputs_one_message_nothing_written(explore_city, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.cli import main

    emb = str(explore_city["emb"])
    t = pq.read_table(emb)
    short = tmp_path / "short.parquet"  # other width
    col = t.column("fused").combine_chunks()
    narrow = pa.FixedSizeListArray.from_arrays(
        pa.array(col.values.to_numpy(zero_copy_only=False).reshape(len(t), -1)[:, :16].ravel()), 16)
    pq.write_table(t.set_column(t.schema.get_field_index("fused"), "fused", narrow), short)
    other_model = tmp_path / "other_model.parquet"
    meta = dict(t.schema.metadata)
    meta[b"refound"] = meta[b"refound"].replace(b"refound_tiny", b"refound_base")
    pq.write_table(t.replace_schema_metadata(meta), other_model)
    other_grid = tmp_path / "other_grid.parquet"
    ids = pa.array([c.replace("/256/", "/128/") for c in t.column("cell_id").to_pylist()])
    pq.write_table(t.set_column(0, "cell_id", ids), other_grid)
    nulls = tmp_path / "nulls.parquet"
    empty = pa.FixedSizeListArray.from_arrays(pa.array(np.full(len(t) * 64, np.nan, np.float32)), 64)
    pq.write_table(t.set_column(t.schema.get_field_index("fused"), "fused", empty), nulls)
    cases = [(["compare", "--embeddings", emb, "--other", str(short)], "dimensions differ"),
             (["compare", "--embeddings", emb, "--other", str(other_model)], "different models"),
             (["compare", "--embeddings", emb, "--other", str(other_grid)], "different grids"),
             (["similar", "--embeddings", emb], "empty query"),
             (["colours", "--embeddings", str(nulls)], "all NULL")]
    for i, (argv, message) in enumerate(cases):
        out = tmp_path / f"out{i}.gpkg"
        err = _run_cli(main, ["explore"] + argv + ["--out", str(out)])
        assert err[0] == 2 and message in err[1], (argv, err)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*"))


def _run_cli(main, argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def test_cli_similar_and_help(explore_city, tmp_path, capsys):
    from training.cli import main

    for action in ("similar", "cluster", "colours", "compare"):
        with pytest.raises(SystemExit):
            main(["explore", action, "--help"])
        assert "--embeddings" in capsys.readouterr().out
    out = tmp_path / "sim.parquet"
    from refound_core.explore.io import read_embeddings

    q = str(read_embeddings(explore_city["emb"]).cell_ids[0])
    assert main(["explore", "similar", "--embeddings", str(explore_city["emb"]), "--cells", q, "--top-k", "3",
                 "--out", str(out)]) == 0
    import geopandas as gpd

    g = gpd.read_parquet(out)
    assert g.loc[g.cell_id == q, "similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert sorted(g["rank"])[-1] == len(g)


def test_dock_explore_tab_click_a_cell(iface, qtbot, project, explore_city, tmp_path):
    """The Explore tab's map tool: a real mouse click on the canvas over a cell adds a similarity
    layer whose best cell (after the query itself) is the query's most similar cell per the core."""
    import geopandas as gpd
    from qgis.core import QgsGraduatedSymbolRenderer, QgsVectorLayer
    from qgis.PyQt.QtCore import Qt

    from refound_core.explore.io import read_embeddings
    from refound_qgis.dock import RefoundDock

    # the plugin's layout: fused embedding as emb_000... fields in a GeoPackage
    t = read_embeddings(explore_city["emb"])
    g = gpd.GeoDataFrame({"cell_id": list(t.cell_ids)} | {f"emb_{j:03d}": t.vectors[:, j] for j in range(t.dim)},
                         geometry=gpd.GeoSeries.from_wkb(list(t.geometry)), crs=t.crs)
    gpkg = tmp_path / "emb.gpkg"
    g.to_file(gpkg, driver="GPKG", engine="pyogrio", dataset_options={"VERSION": "1.2"})
    layer = QgsVectorLayer(str(gpkg), "embeddings", "ogr")
    project.addMapLayer(layer)

    canvas = show_canvas(qtbot, iface, t.crs, layer.extent())
    canvas.refresh()
    dock = RefoundDock(iface)
    qtbot.addWidget(dock)
    panel = dock.explore_panel
    assert dock.tabs.tabText(1) == "Explore"
    panel.layer_combo.setLayer(layer)
    panel.top_k_spin.setValue(5)
    panel.pick_button.click()
    assert canvas.mapTool() is panel.map_tool

    query = 37
    cx, cy = g.geometry.iloc[query].centroid.x, g.geometry.iloc[query].centroid.y
    pixel = canvas.getCoordinateTransform().transform(cx, cy)
    with qtbot.waitSignal(panel.result_ready, timeout=10_000) as blocker:
        qtbot.mouseClick(canvas.viewport(), Qt.LeftButton, pos=pixel.toQPointF().toPoint())
    out, message = blocker.args
    assert out is not None, message
    assert out in project.mapLayers().values() and isinstance(out.renderer(), QgsGraduatedSymbolRenderer)
    rows = {f["cell_id"]: f for f in out.getFeatures()}
    assert rows[t.cell_ids[query]]["rank"] == 1
    from refound_core.explore.similar import find_similar

    want = find_similar(t, [t.cell_ids[query]], k=5)["top"]
    got = sorted((c for c in rows if rows[c]["top_k"]), key=lambda c: rows[c]["rank"])
    assert got == [str(t.cell_ids[i]) for i in want]
    dock.shutdown()
    assert canvas.mapTool() is None


def test_dock_explore_cancel_is_reported_and_adds_nothing(iface, qtbot, project, explore_city, tmp_path,
                                                          monkeypatch):
    """Whole-layer clustering runs in a QgsTask; Cancel while it runs: 'Canceled', no layer added,
    and the panel runs again afterwards."""
    import threading

    import geopandas as gpd
    from qgis.core import QgsVectorLayer

    from refound_core.explore import cluster as core_cluster
    from refound_core.explore.io import read_embeddings
    from refound_qgis.dock import RefoundDock

    t = read_embeddings(explore_city["emb"])
    g = gpd.GeoDataFrame({"cell_id": list(t.cell_ids)} | {f"emb_{j:03d}": t.vectors[:, j] for j in range(t.dim)},
                         geometry=gpd.GeoSeries.from_wkb(list(t.geometry)), crs=t.crs)
    g.to_file(tmp_path / "emb.gpkg", driver="GPKG", engine="pyogrio")
    layer = QgsVectorLayer(str(tmp_path / "emb.gpkg"), "embeddings", "ogr")
    project.addMapLayer(layer)
    started, release, real = threading.Event(), threading.Event(), core_cluster.cluster

    def slow_cluster(table, *a, **kw):
        started.set()
        release.wait(20)
        return real(table, *a, **kw)

    monkeypatch.setattr(core_cluster, "cluster", slow_cluster)
    dock = RefoundDock(iface)
    qtbot.addWidget(dock)
    panel = dock.explore_panel
    panel.layer_combo.setLayer(layer)
    panel.action_combo.setCurrentIndex(panel.action_combo.findData("cluster"))
    before = set(project.mapLayers())
    panel.run_button.click()
    assert started.wait(20) and panel.cancel_button.isEnabled() and not panel.run_button.isEnabled()
    with qtbot.waitSignal(panel.result_ready, timeout=20_000) as blocker:
        panel.cancel_button.click()
        release.set()
    out, message = blocker.args
    assert out is None and message.startswith("Canceled"), message
    assert set(project.mapLayers()) == before
    monkeypatch.setattr(core_cluster, "cluster", real)
    with qtbot.waitSignal(panel.result_ready, timeout=20_000) as blocker:
        panel.run_button.click()
    assert blocker.args[0] is not None and blocker.args[0] in project.mapLayers().values(), blocker.args[1]
    dock.shutdown()


@pytest.mark.slow
def test_explore_algorithms_run_under_qgis_process(explore_city, tmp_path):
    """All four ids through /usr/bin/qgis_process.bin (a fresh QGIS, the staged plugin)."""
    import json
    import os
    import sqlite3
    import subprocess
    import sys

    from qgis_testlib import REPO
    from test_processing import _qgis_process_env

    sys.path.insert(0, str(REPO / "scripts"))
    from build_plugin_zip import stage

    qp = "/usr/bin/qgis_process.bin"
    if not os.path.exists(qp):
        pytest.fail("qgis_process.bin is missing; install the Debian package 'qgis'")
    plugins = tmp_path / "plugins"
    stage(plugins)
    (tmp_path / "home").mkdir()
    env = _qgis_process_env(tmp_path / "home", plugins)
    en = subprocess.run([qp, "plugins", "enable", "refound_qgis"], env=env, capture_output=True, text=True, timeout=120)
    assert en.returncode == 0 or "already enabled" in en.stderr, en.stdout[-2000:] + en.stderr[-2000:]
    emb, twin = str(explore_city["emb"]), str(explore_city["twin_emb"])
    q = json.loads(subprocess.run([sys.executable, "-c", "import pyarrow.parquet as pq; import json; "
                                   f"print(json.dumps(pq.read_table({emb!r}).column('cell_id')[0].as_py()))"],
                                  capture_output=True, text=True).stdout)
    runs = {"find_similar_regions": {"QUERY_CELLS": q, "TOP_K": 5}, "cluster_regions": {"K": 4},
            "embedding_colours": {}, "compare_embeddings": {"OTHER": twin}}
    for alg, extra in runs.items():
        out = tmp_path / f"{alg}.gpkg"
        args = {"INPUT": emb, "OUTPUT": str(out), **extra}
        res = subprocess.run([qp, "run", f"refound:{alg}", "--json", "--"] + [f"{k}={v}" for k, v in args.items()],
                             env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, alg + res.stdout[-2000:] + res.stderr[-2000:]
        report = json.loads(res.stdout[res.stdout.index("{"):])
        assert report["results"]["CELLS"] >= 100
        with sqlite3.connect(out) as db:
            assert db.execute("SELECT count(*) FROM layer_styles").fetchone()[0] == 1


def _expected_top_categories(emb_path, pois_path, labels_by_cell):
    """Per cluster, POI categories counted by a polygon join of the POIs with the cell polygons
    (geopandas), independently of the grid arithmetic the code uses."""
    from collections import Counter

    import geopandas as gpd

    cells = gpd.read_parquet(emb_path)[["cell_id", "geometry"]]
    pois = gpd.read_file(pois_path, layer="pois").to_crs(cells.crs)
    joined = gpd.sjoin(pois, cells, predicate="within")
    counts: dict = {}
    for cid, cat in zip(joined["cell_id"], joined["category"]):
        counts.setdefault(labels_by_cell[cid], Counter())[cat] += 1
    return counts


def test_cli_cluster_names_top_poi_categories(explore_city, tmp_path, capsys):
    import json as _json

    import geopandas as gpd

    from training.cli import main

    out = tmp_path / "clusters.parquet"
    pois = explore_city["city"] / "pois.gpkg"
    assert main(["explore", "cluster", "--embeddings", str(explore_city["emb"]), "--k", "4", "--pois", str(pois),
                 "--out", str(out)]) == 0
    report = _json.loads(capsys.readouterr().out)
    labels = dict(zip(gpd.read_parquet(out)["cell_id"], gpd.read_parquet(out)["cluster"]))
    expected = _expected_top_categories(explore_city["emb"], pois, labels)
    assert len(report["summary"]) == 4
    assert any(row["top_poi_categories"] for row in report["summary"])
    for row in report["summary"]:
        counter = expected.get(row["cluster"], {})
        got = [part.rsplit(" (", 1) for part in row["top_poi_categories"].split(", ") if part]
        got = [(cat, int(n.rstrip(")"))) for cat, n in got]
        # each named category's count is exact, and they are the cluster's 3 largest counts
        # (ties may be named in any order)
        assert all(counter[cat] == n for cat, n in got), (row, counter)
        assert [n for _, n in got] == sorted(counter.values(), reverse=True)[:3], (row, counter)
    assert main(["explore", "cluster", "--embeddings", str(explore_city["emb"]), "--pois", str(pois),
                 "--category-field", "nope", "--out", str(tmp_path / "x.parquet")]) == 2
    assert "'nope'" in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()


def test_cluster_regions_reports_top_poi_categories(provider, project, explore_city, tmp_path):
    import processing
    from qgis.core import QgsProcessingFeedback, QgsVectorLayer

    pois = QgsVectorLayer(f"{explore_city['city'] / 'pois.gpkg'}|layername=pois", "pois", "ogr")
    assert pois.isValid()
    msgs = []

    class Feedback(QgsProcessingFeedback):
        def pushInfo(self, info):  # noqa: N802 - QGIS's name
            msgs.append(info)

    out = tmp_path / "clusters.gpkg"
    processing.run("refound:cluster_regions", {"INPUT": str(explore_city["emb"]), "K": 3, "POIS": pois,
                                               "CATEGORY_FIELD": "category", "OUTPUT": str(out)},
                   feedback=Feedback())
    lines = [m for m in msgs if m.startswith("cluster ")]
    assert len(lines) == 3, msgs
    categories = {f["category"] for f in pois.getFeatures()}
    named = [part.rsplit(" (", 1)[0] for m in lines if "; " in m for part in m.split("; ", 1)[1].split(", ")]
    assert sum("; " in m for m in lines) >= 2, msgs  # a cluster of POI-less cells names none
    assert named and set(named) <= categories
