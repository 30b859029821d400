"""`refound add-label`: any raster or vector layer aggregated to a dataset's cells as a task label.

Expected values are computed by hand from the layers written here (cells are 256 m squares at
col * 256, row * 256 in EPSG:32650), never by the code under test."""
import json

import numpy as np
import pytest
import shapely

from refound_core.data.custom_labels import label_from_source
from refound_core.data.dataset import RegionDataset
from refound_core.data.grid import Grid
from refound_core.errors import InputError

CRS = "EPSG:32650"


def _cells(ncols=3, nrows=1):
    g = Grid(CRS, 256.0)
    return [g.cell(c, r) for r in range(nrows) for c in range(ncols)]


def _vector(path, geoms, **fields):
    import geopandas as gpd

    gpd.GeoDataFrame(fields, geometry=list(geoms), crs=CRS).to_file(path, engine="pyogrio")
    return path


def _raster(path, data, x0=0.0, y_top=256.0, px=128.0, nodata=None):
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype="float32", crs=CRS, transform=from_origin(x0, y_top, px, px), nodata=nodata) as dst:
        dst.write(data.astype(np.float32), 1)
    return path


def test_raster_mean_and_sum_per_cell_skip_nodata_and_leave_uncovered_cells_unknown(tmp_path):
    # 128 m pixels over cells 0 and 1 of a row of three: each cell holds 2 x 2 pixels
    data = np.array([[1, 3, 10, 20], [5, 7, -9, 30]], dtype=float)
    path = _raster(tmp_path / "ntl.tif", data, nodata=-9)
    cells = _cells(3)
    mean = label_from_source(path, cells)
    assert mean.kind == "regression" and mean.stat == "mean"
    assert mean.values[0] == pytest.approx((1 + 3 + 5 + 7) / 4)
    assert mean.values[1] == pytest.approx((10 + 20 + 30) / 3)  # the nodata pixel does not count
    assert np.isnan(mean.values[2])  # outside the raster: unknown, not 0
    total = label_from_source(path, cells, stat="sum")
    assert total.values[:2] == pytest.approx([16, 60]) and np.isnan(total.values[2])
    binary = label_from_source(path, cells, threshold=10)
    assert binary.kind == "binary" and binary.values[:2].tolist() == [0.0, 1.0] and np.isnan(binary.values[2])


def test_polygons_fraction_threshold_majority_sum_and_mean(tmp_path):
    cells = _cells(3)
    # park: all of cell 0 and the west half of cell 1; water: the east 30 % of cell 1
    park = shapely.box(0, 0, 384, 256)
    water = shapely.box(512 - 0.3 * 256, 0, 512, 256)
    path = _vector(tmp_path / "landuse.gpkg", [park, water], kind=["park", "water"], jobs=[300.0, 60.0])
    frac = label_from_source(path, cells)
    assert frac.stat == "fraction" and frac.values == pytest.approx([1.0, 0.8, 0.0])
    uv_like = label_from_source(path, cells, threshold=0.9)
    assert uv_like.kind == "binary" and uv_like.values.tolist() == [1.0, 0.0, 0.0]
    major = label_from_source(path, cells, field="kind")
    assert major.kind == "multiclass" and major.classes == ["park", "water"]
    assert major.values[:2].tolist() == [0.0, 0.0] and np.isnan(major.values[2])  # cell 2: no polygon
    # jobs spread by area: park's 300 over 1.5 cells -> 200 + 100; water's 60 all in cell 1
    total = label_from_source(path, cells, field="jobs")
    assert total.stat == "sum" and total.values == pytest.approx([200.0, 160.0, 0.0])
    mean = label_from_source(path, cells, field="jobs", stat="mean")
    # cell 1: 50 % of its area under park (300), 30 % under water (60) -> (0.5*300 + 0.3*60) / 0.8
    assert mean.values[:2] == pytest.approx([300.0, (0.5 * 300 + 0.3 * 60) / 0.8]) and np.isnan(mean.values[2])


def test_points_count_sum_mean_with_half_open_cells(tmp_path):
    cells = _cells(3)
    pts = [shapely.Point(10, 10), shapely.Point(255.9, 100), shapely.Point(256.0, 100), shapely.Point(700, 5),
           shapely.Point(5000, 5000)]  # the last is outside every cell
    path = _vector(tmp_path / "crime.gpkg", pts, n=[1.0, 2.0, 4.0, 8.0, 16.0])
    assert label_from_source(path, cells).values.tolist() == [2.0, 1.0, 1.0]  # x = 256 belongs to cell 1
    assert label_from_source(path, cells, field="n").values.tolist() == [3.0, 4.0, 8.0]
    assert label_from_source(path, cells, field="n", stat="mean").values.tolist() == [1.5, 4.0, 8.0]


def test_bad_label_sources_get_one_clear_message(tmp_path):
    cells = _cells(2)
    path = _vector(tmp_path / "lu.gpkg", [shapely.box(0, 0, 256, 256)], kind=["park"])
    with pytest.raises(InputError, match="no field 'class'.*'kind'"):
        label_from_source(path, cells, field="class")
    with pytest.raises(InputError, match="not numeric"):
        label_from_source(path, cells, field="kind", stat="sum")
    with pytest.raises(InputError, match="needs --field"):
        label_from_source(path, cells, stat="mean")
    raster = _raster(tmp_path / "r.tif", np.ones((2, 2)))
    with pytest.raises(InputError, match="drop --field"):
        label_from_source(raster, cells, field="x")
    with pytest.raises(InputError, match="mean or sum"):
        label_from_source(raster, cells, stat="majority")
    lines = _vector(tmp_path / "roads.gpkg", [shapely.LineString([(0, 0), (10, 10)])], kind=["a"])
    with pytest.raises(InputError, match="polygons or points"):
        label_from_source(lines, cells)


@pytest.fixture()
def dataset(tmp_path):
    from tests.training.finetune_fixtures import make_dataset

    return make_dataset(tmp_path / "ds")  # 6 x 6 cells of 256 m, EPSG:32650


def test_add_label_command_then_evaluate_uses_the_stored_kind(dataset, tmp_path, capsys):
    from training.cli import main
    from training.finetune.tasks import task_for_dataset

    # west half of the fixture city is "old", east half "new"; a third class touches no cell
    src = _vector(tmp_path / "age.gpkg", [shapely.box(0, 0, 768, 1536), shapely.box(768, 0, 1536, 1536),
                                           shapely.box(9000, 9000, 9100, 9100)], era=["old", "new", "future"])
    assert main(["add-label", "--data", str(dataset.folder), "--name", "era", "--source", str(src),
                 "--field", "era"]) == 0
    assert "multiclass" in capsys.readouterr().out
    ds = RegionDataset(dataset.folder)
    assert "era" in ds.label_names and ds.label_info["era"]["classes"] == ["future", "new", "old"]
    expected = np.where(ds.col < 3, 2.0, 1.0)  # "old" = 2, "new" = 1
    np.testing.assert_array_equal(ds.labels["era"], expected)
    assert ds.labels["population"].shape == (36,)  # the other labels are kept
    task = task_for_dataset("era", ds)
    assert task.kind == "multiclass" and task.num_classes == 3
    # an existing label is refused unless --overwrite, and the dataset is left as it was
    assert main(["add-label", "--data", str(dataset.folder), "--name", "population", "--source", str(src)]) == 2
    assert "already has a built-in label 'population'" in capsys.readouterr().err
    assert main(["add-label", "--data", str(dataset.folder), "--name", "9lives", "--source", str(src)]) == 2
    far = _vector(tmp_path / "far.gpkg", [shapely.box(9000, 9000, 9100, 9100)], era=["x"])
    assert main(["add-label", "--data", str(dataset.folder), "--name", "far", "--source", str(far),
                 "--field", "era"]) == 2
    assert "does not overlap any cell" in capsys.readouterr().err
    meta = json.loads((dataset.folder / "meta.json").read_text())
    assert "far" not in meta["label_names"] and "9lives" not in meta["label_names"]
    # the label name alone is enough for the evaluation (kind and classes come from the dataset)
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(dataset.folder), "--task", "era", "--methods", "refound_scratch_feature",
                 "--checkpoint", str(_checkpoint(tmp_path, ds)),
                 "--runs", "1", "--feature-epochs", "2", "--device", "cpu", "--out", str(out)]) == 0
    rep = json.loads((out / "results.json").read_text())
    assert rep["tasks"]["era"]["spec"]["kind"] == "multiclass"
    assert "accuracy" in rep["tasks"]["era"]["results"]["1.0"]["refound_scratch_feature"]["summary"]
    # and a fine-tuned head for it keeps the class names, for maps and legends
    from refound_core.model.checkpoint import load_checkpoint

    assert main(["finetune", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(dataset.folder), "--task", "era",
                 "--mode", "linear", "--epochs", "2", "--device", "cpu", "--out", str(tmp_path / "era_head")]) == 0
    loaded = load_checkpoint(tmp_path / "era_head")
    assert loaded.task["classes"] == ["future", "new", "old"] and loaded.task["num_classes"] == 3
    from refound_core.inference.predictor import Predictor

    predictor = Predictor(tmp_path / "era_head", device="cpu")
    assert predictor.kind == "multiclass" and predictor.describe()["classes"] == ["future", "new", "old"]
    preds = list(predictor.predict_samples([ds[i] for i in range(4)]))
    assert all(p.value in (0.0, 1.0, 2.0) and len(p.values) == 3 for p in preds)


def _checkpoint(tmp_path, ds):
    from tests.training.finetune_fixtures import make_checkpoint

    return make_checkpoint(tmp_path / "ckpt", ds)
