"""End-to-end analysis: grid -> POIs -> imagery -> model -> styled GeoPackage / GeoParquet."""
from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from tests.inference._inference_fixtures import CELL, COLS, CRS, EXTENT, ROWS, expected_sufficient_cells
from refound_core.errors import InputError
from refound_core.inference.pipeline import AnalysisRequest, run_analysis
from refound_core.inference.predictor import AnalysisCanceled, Predictor


@pytest.fixture(scope="module")
def uv_predictor(uv_checkpoint):
    return Predictor(uv_checkpoint, device="cpu", batch_size=4)


def _request(ckpt, city, out, **kw):
    base = dict(checkpoint=str(ckpt), task="urban_village", out=str(out), extent=EXTENT, extent_crs=CRS,
                pois=str(city["gpkg"]), imagery=str(city["tif"]), device="cpu")
    base.update(kw)
    return AnalysisRequest(**base)


def _read_cells(path):
    import geopandas as gpd

    return gpd.read_file(path, layer="cells")


def _col_row(cell_id):
    c, r = cell_id.rsplit("/", 1)[1].split("_")
    return int(c), int(r)


def test_predict_writes_styled_geopackage(uv_checkpoint, uv_predictor, city, tmp_path):
    out = tmp_path / "uv.gpkg"
    res = run_analysis(_request(uv_checkpoint, city, out, predictor=uv_predictor))
    cells = _read_cells(out)
    assert len(cells) == len(COLS) * len(ROWS) == res.cells
    assert str(cells.crs.to_epsg()) == CRS.split(":")[1]
    # every cell is a 256 m square on the snapped grid
    assert np.allclose(cells.geometry.area, CELL * CELL)
    got = {_col_row(i) for i in cells.cell_id}
    assert got == {(c, r) for c in COLS for r in ROWS}

    suff = {_col_row(i) for i, s in zip(cells.cell_id, cells.sufficient) if s}
    assert suff == expected_sufficient_cells()
    pred = cells.prediction.to_numpy(dtype=float)
    s = cells.sufficient.to_numpy(dtype=bool)
    assert np.isfinite(pred[s]).all() and ((pred[s] >= 0) & (pred[s] <= 1)).all()
    assert np.isnan(pred[~s]).all(), "insufficient cells must be NULL, not predicted"
    assert (cells.poi_count[~s] == 0).all() and (cells.image_coverage[~s] == 0).all()
    assert cells.poi_count.sum() == city["n_pois"]
    assert res.predicted == s.sum() and res.insufficient == (~s).sum()
    assert set(res.timings) >= {"grid", "poi_join", "image_reads", "featurize", "model", "write", "total"}

    con = sqlite3.connect(out)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200  # GeoPackage 1.2
        rows = con.execute("SELECT f_table_name, f_geometry_column, styleQML, useAsDefault FROM layer_styles").fetchall()
    finally:
        con.close()
    assert len(rows) == 1
    table, geom_col, qml, default = rows[0]
    assert (table, geom_col, bool(default)) == ("cells", "geom", True)
    assert "RuleRenderer" in qml and "0.5" in qml and 'NOT "sufficient"' in qml and "b_diagonal" in qml
    assert not list(tmp_path.glob(".*.tmp*")), "temp file left behind"


def test_same_cell_same_prediction_whatever_the_extent(uv_checkpoint, uv_predictor, city, tmp_path):
    a = _read_cells(run_analysis(_request(uv_checkpoint, city, tmp_path / "a.gpkg", predictor=uv_predictor)).out)
    shifted = (EXTENT[0] + 300, EXTENT[1] + 300, EXTENT[2] + 300, EXTENT[3] + 300)
    b = _read_cells(run_analysis(_request(uv_checkpoint, city, tmp_path / "b.gpkg", extent=shifted,
                                          predictor=uv_predictor, batch_size=3)).out)
    common = sorted(set(a.cell_id) & set(b.cell_id))
    assert 9 <= len(common) < len(a)
    pa = a.set_index("cell_id").loc[common]
    pb = b.set_index("cell_id").loc[common]
    assert (pa.sufficient.to_numpy() == pb.sufficient.to_numpy()).all()
    m = pa.sufficient.to_numpy(dtype=bool)
    assert m.any()
    np.testing.assert_allclose(pa.prediction.to_numpy()[m], pb.prediction.to_numpy()[m], atol=1e-4)
    assert np.ptp(pa.prediction.to_numpy()[m]) > 50 * 1e-4  # cells differ far more than the tolerance


def test_regression_target_is_denormalised(pop_checkpoint, city, tmp_path):
    res = run_analysis(_request(pop_checkpoint, city, tmp_path / "pop.gpkg", task="population"))
    cells = _read_cells(res.out)
    raw_predictor = Predictor(pop_checkpoint, device="cpu")
    raw_predictor.task_meta.pop("target_scaler")  # the head's own output, before undoing the normalisation
    raw = _read_cells(run_analysis(_request(pop_checkpoint, city, tmp_path / "raw.gpkg", task="population",
                                            predictor=raw_predictor)).out)
    s = cells.sufficient.to_numpy(dtype=bool)
    v, r = cells.prediction.to_numpy(dtype=float)[s], raw.prediction.to_numpy(dtype=float)[s]
    np.testing.assert_allclose(v, r * 100.0 + 500.0, rtol=1e-5)  # target {"mean": 500, "std": 100}
    assert v.std() > 0
    con = sqlite3.connect(res.out)
    qml = con.execute("SELECT styleQML FROM layer_styles").fetchone()[0]
    con.close()
    assert "RuleRenderer" in qml and "urban village" not in qml  # graduated classes, not the probability ramp
    import re

    labels = re.findall(r'label="([^"]+)"', qml)
    first_lo = float(labels[0].split(" – ")[0].replace(",", ""))
    assert abs(first_lo - float(v.min())) <= 1.0  # class breaks come from the predicted values


def test_task_mismatch_and_backbone_only_are_clear_errors(uv_checkpoint, backbone_checkpoint, city, tmp_path):
    with pytest.raises(InputError, match="urban_village"):
        run_analysis(_request(uv_checkpoint, city, tmp_path / "x.gpkg", task="population"))
    with pytest.raises(InputError, match="embed"):
        run_analysis(_request(backbone_checkpoint, city, tmp_path / "y.gpkg"))
    with pytest.raises(InputError, match="gpkg"):
        run_analysis(_request(uv_checkpoint, city, tmp_path / "z.shp"))
    assert not list(tmp_path.iterdir())


def test_failure_mid_run_leaves_no_output(uv_checkpoint, city, tmp_path, monkeypatch):
    out = tmp_path / "uv.gpkg"
    predictor = Predictor(uv_checkpoint, device="cpu", batch_size=2)
    calls = {"n": 0}
    real = predictor._forward

    def failing(items, predict, embed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in the middle of the run")
        return real(items, predict, embed)

    monkeypatch.setattr(predictor, "_forward", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_analysis(_request(uv_checkpoint, city, out, predictor=predictor))
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == [], "no file under the target name and no temp file"

    # an existing output stays untouched by a canceled run
    out.write_bytes(b"previous result")
    ticks = iter(range(100))
    with pytest.raises(AnalysisCanceled):
        run_analysis(_request(uv_checkpoint, city, out, predictor=Predictor(uv_checkpoint, device="cpu", batch_size=2)),
                     is_canceled=lambda: next(ticks) >= 2)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["uv.gpkg"]
    import threading

    assert not [t.name for t in threading.enumerate() if t.name.startswith("refound-")], "worker threads left"


def test_embed_writes_geoparquet(uv_checkpoint, uv_predictor, city, tmp_path):
    import geopandas as gpd

    res = run_analysis(_request(uv_checkpoint, city, tmp_path / "emb.parquet", task="embed", predictor=uv_predictor))
    df = gpd.read_parquet(res.out)
    assert len(df) == 25 and df.crs.to_epsg() == 32650
    assert df.geometry.geom_type.eq("Polygon").all()
    h = uv_predictor.config.hidden_size
    suff = df.sufficient.to_numpy(dtype=bool)
    fused = np.stack(df.fused.to_numpy())
    assert fused.shape == (25, h) and fused.dtype == np.float32
    assert np.isfinite(fused[suff]).all() and np.isnan(fused[~suff]).all()
    # h_S is NaN exactly where a cell has no imagery; h_P where it has no POIs
    h_s = np.stack(df.h_S.to_numpy())
    h_p = np.stack(df.h_P.to_numpy())
    has_img = df.image_coverage.to_numpy() > 0
    has_poi = df.poi_count.to_numpy() > 0
    assert (np.isfinite(h_s).all(1) == (has_img & suff)).all()
    assert (np.isfinite(h_p).all(1) == (has_poi & suff)).all()


def test_cli_predict_prints_breakdown(uv_checkpoint, city, tmp_path, capsys):
    import argparse

    from refound_core.inference.commands import predict

    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    out = tmp_path / "cli.gpkg"
    ext = ",".join(str(v) for v in EXTENT) + "," + CRS
    args = parser.parse_args(["--checkpoint", str(uv_checkpoint), "--pois", str(city["gpkg"]), "--imagery",
                              str(city["tif"]), "--extent", ext, "--out", str(out), "--device", "cpu", "--quiet"])
    assert predict.run(args) == 0
    text = capsys.readouterr().out
    for stage in ("grid", "poi_join", "image_reads", "featurize", "model", "write"):
        assert stage in text
    assert "25 cells" in text and out.exists()
    with pytest.raises(InputError, match="XMIN"):
        predict.parse_extent("1,2,3")


def test_extent_in_lonlat_uses_utm(uv_checkpoint, uv_predictor, city, tmp_path):
    import pyproj

    t = pyproj.Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    lon0, lat0 = t.transform(EXTENT[0] + 10, EXTENT[1] + 10)
    lon1, lat1 = t.transform(EXTENT[2] - 10, EXTENT[3] - 10)
    res = run_analysis(_request(uv_checkpoint, city, tmp_path / "ll.gpkg", extent=(lon0, lat0, lon1, lat1),
                                extent_crs="EPSG:4326", predictor=uv_predictor))
    cells = _read_cells(res.out)
    assert cells.crs.to_epsg() == 32650  # 117 E -> UTM 50N
    assert cells.poi_count.sum() > 0 and math.isclose(float(cells.geometry.area.iloc[0]), CELL * CELL)


DIST_SCRIPT = """
import os, sys
from refound_core.inference.pipeline import AnalysisRequest, run_analysis
ckpt, tif, gpkg, out = sys.argv[1:5]
res = run_analysis(AnalysisRequest(checkpoint=ckpt, task="urban_village", out=out, extent={extent!r},
                                   extent_crs={crs!r}, pois=gpkg, imagery=tif, device="cpu", batch_size=4, block_cells=4))
with open(os.path.join(os.path.dirname(out), "cells_rank" + os.environ["RANK"]), "w") as fh:
    fh.write(str(res.cells))
"""


@pytest.mark.slow
def test_torchrun_sharding_matches_single_process(uv_checkpoint, uv_predictor, city, tmp_path):
    import os
    import subprocess
    import sys

    import refound_core.inference.pipeline as pipeline_mod

    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT.format(extent=EXTENT, crs=CRS))
    out = tmp_path / "dist.gpkg"
    env = dict(os.environ, PYTHONPATH=str(Path(pipeline_mod.__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(uv_checkpoint), str(city["tif"]), str(city["gpkg"]), str(out)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    per_rank = [int((tmp_path / f"cells_rank{r}").read_text()) for r in range(2)]
    assert len(per_rank) == 2 and min(per_rank) > 0 and sum(per_rank) == 25  # both ranks did a share
    single = _read_cells(run_analysis(_request(uv_checkpoint, city, tmp_path / "single.gpkg",
                                               predictor=uv_predictor)).out).set_index("cell_id")
    dist = _read_cells(out).set_index("cell_id")
    assert sorted(dist.index) == sorted(single.index)
    d = dist.loc[single.index]
    np.testing.assert_allclose(d.prediction.to_numpy(float), single.prediction.to_numpy(float), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # parts removed


def test_in_memory_samples_and_single_modality_inputs(uv_checkpoint, uv_predictor, city, tmp_path):
    from refound_core.data.sample import RegionSample

    # POIs only: exactly the POI cells are predicted, no image coverage anywhere
    res = run_analysis(_request(uv_checkpoint, city, tmp_path / "poi_only.gpkg", imagery=None, predictor=uv_predictor))
    cells = _read_cells(res.out)
    from tests.inference._inference_fixtures import POI_CELLS

    assert {_col_row(i) for i, s in zip(cells.cell_id, cells.sufficient) if s} == set(POI_CELLS)
    assert (cells.image_coverage == 0).all()

    # ready RegionSamples (the plugin's layer adapter path): no grid, POI file or raster involved
    samples = [RegionSample(f"EPSG:32650/256/{i}_0", (256.0 * i, 0.0, 256.0 * (i + 1), 256.0), CRS,
                            ["north market"] * (i % 2), ["shop=bakery"] * (i % 2),
                            np.array([[256.0 * i + 10, 10.0]] * (i % 2)).reshape(-1, 2)) for i in range(6)]
    res = run_analysis(AnalysisRequest(task="urban_village", out=str(tmp_path / "mem.gpkg"), samples=samples,
                                       predictor=uv_predictor))
    cells = _read_cells(res.out)
    assert list(cells.cell_id) == [s.cell_id for s in samples]
    assert list(cells.sufficient.astype(bool)) == [bool(i % 2) for i in range(6)]
    assert cells.crs.to_epsg() == 32650
