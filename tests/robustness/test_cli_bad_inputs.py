"""The bad-input suite (issue 19): every case is a `refound` subprocess, as a user runs it. Each
asserts the exit status (2 bad input, 0 with a notice where a documented rule applies), that the
message names the input, that no traceback is printed and that no partial output is left."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.robustness.conftest import leftovers, refound


def predict_args(f, out, **over):
    a = {"--checkpoint": f["ckpt"], "--pois": f["gpkg"], "--imagery": f["tif"], "--extent": f["extent"],
         "--out": out}
    a.update(over)
    args = ["predict", "--quiet"]
    for k, v in a.items():
        if v is not None:
            args += [k, v]
    return args


def assert_refused(res, names, code=2):
    err = res.stderr
    assert res.returncode == code, (res.returncode, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    for n in names:
        assert str(n) in err, (n, err)
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1, err  # one message, one line


# (id, overrides of the predict flags given the fixture dict, words the message must contain)
REFUSED = [
    ("truncated_geotiff", lambda f, t: {"--imagery": f["truncated"]}, lambda f, t: ["truncated.tif", "truncated"]),
    ("raster_far_from_extent", lambda f, t: {"--imagery": f["far"]}, lambda f, t: ["far.tif", "does not overlap"]),
    ("raster_two_bands", lambda f, t: {"--imagery": f["two_band"]}, lambda f, t: ["two_band.tif", "2 bands"]),
    ("raster_without_crs", lambda f, t: {"--imagery": f["no_crs"]}, lambda f, t: ["no_crs.tif", "no CRS"]),
    ("raster_not_a_raster", lambda f, t: {"--imagery": f["not_raster"]}, lambda f, t: ["notes.tif"]),
    ("raster_missing", lambda f, t: {"--imagery": t / "nope.tif"}, lambda f, t: ["nope.tif", "does not exist"]),
    ("pois_zero_features", lambda f, t: {"--pois": f["empty_pois"]}, lambda f, t: ["empty.gpkg", "no features"]),
    ("pois_all_null_names", lambda f, t: {"--pois": f["null_names"]}, lambda f, t: ["null_names.gpkg", "--name-field"]),
    ("pois_missing_name_field", lambda f, t: {"--pois": f["other_fields"]}, lambda f, t: ["other_fields.gpkg", "'name'"]),
    ("pois_not_a_vector", lambda f, t: {"--pois": f["not_vector"]}, lambda f, t: ["notes.gpkg"]),
    ("pois_missing", lambda f, t: {"--pois": t / "nope.gpkg"}, lambda f, t: ["nope.gpkg", "does not exist"]),
    ("no_pois_no_imagery", lambda f, t: {"--pois": None, "--imagery": None}, lambda f, t: ["--pois", "--imagery"]),
    ("out_parent_is_file", lambda f, t: {"--out": f["gpkg"] / "x.gpkg"}, lambda f, t: ["x.gpkg", "is a file"]),
    ("out_in_proc", lambda f, t: {"--out": "/proc/x.gpkg"}, lambda f, t: ["/proc/x.gpkg", "not writable"]),
    ("out_in_sys", lambda f, t: {"--out": "/sys/x.gpkg"}, lambda f, t: ["/sys/x.gpkg", "not writable"]),
    ("out_is_folder", lambda f, t: {"--out": t}, lambda f, t: [str(t)]),
    ("out_wrong_suffix", lambda f, t: {"--out": t / "out.shp"}, lambda f, t: ["out.shp", ".gpkg"]),
    ("checkpoint_missing", lambda f, t: {"--checkpoint": t / "nockpt"}, lambda f, t: ["nockpt"]),
    ("checkpoint_backbone_only", lambda f, t: {"--checkpoint": f["backbone"]}, lambda f, t: ["backbone", "embed"]),
    ("task_mismatch", lambda f, t: {"--task": "population"}, lambda f, t: ["population"]),
    ("extent_three_numbers", lambda f, t: {"--extent": "1,2,3"}, lambda f, t: ["--extent", "'1,2,3'"]),
    ("extent_not_numbers", lambda f, t: {"--extent": "a,b,c,d"}, lambda f, t: ["--extent", "numbers"]),
    ("extent_unknown_crs", lambda f, t: {"--extent": f["extent"] + ",EPSG:999999"}, lambda f, t: ["EPSG:999999"]),
    ("extent_reversed", lambda f, t: {"--extent": "501000,3001000,500000,3000000"}, lambda f, t: ["extent"]),
    ("extent_far_from_everything", lambda f, t: {"--extent": "900000,3000000,901000,3001000"},
     lambda f, t: ["does not overlap"]),
    ("huge_run_over_max_cells", lambda f, t: {"--cell-size": "1"}, lambda f, t: ["--max-cells", "1,000,000"]),
    ("max_cells_zero", lambda f, t: {"--max-cells": "0"}, lambda f, t: ["--max-cells"]),
    ("cell_size_nan", lambda f, t: {"--cell-size": "nan"}, lambda f, t: ["--cell-size", "nan"]),
    ("cell_size_negative", lambda f, t: {"--cell-size": "-256"}, lambda f, t: ["--cell-size"]),
    ("batch_size_zero", lambda f, t: {"--batch-size": "0"}, lambda f, t: ["--batch-size"]),
    ("min_image_coverage_two", lambda f, t: {"--min-image-coverage": "2"}, lambda f, t: ["--min-image-coverage"]),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_predict_refuses_bad_input(case, bad, tmp_path):
    _, over, names = case
    out = tmp_path / "out.gpkg"
    res = refound(*predict_args(bad, out, **over(bad, tmp_path)))
    assert_refused(res, names(bad, tmp_path))
    assert not out.exists()
    assert leftovers(tmp_path) == [] and leftovers(bad["dir"]) == []


CONVERTED = [  # accepted by a documented rule (docs/ROBUSTNESS.md), and the run says which
    ("one_band_imagery", {"--imagery": "one_band"}, ["one_band.tif", "grey RGB"]),
    ("uint16_imagery", {"--imagery": "uint16"}, ["uint16.tif", "uint16", "percentile"]),
    ("float32_imagery", {"--imagery": "float32"}, ["float32.tif", "float32", "percentile"]),
    ("polygon_pois", {"--pois": "polygons"}, ["polygons.gpkg", "point on its surface"]),
]


@pytest.mark.parametrize("case", CONVERTED, ids=[c[0] for c in CONVERTED])
def test_predict_converts_by_rule_and_says_so(case, bad, tmp_path):
    _, over, names = case
    out = tmp_path / "out.gpkg"
    res = refound(*predict_args(bad, out, **{k: bad[v] for k, v in over.items()}))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    for n in names:
        assert n in res.stderr, (n, res.stderr)
    assert out.exists() and leftovers(tmp_path) == []


def test_predict_refuses_to_overwrite_without_flag(bad, tmp_path):
    out = tmp_path / "out.gpkg"
    out.write_bytes(b"precious")
    res = refound(*predict_args(bad, out))
    assert_refused(res, ["out.gpkg", "--overwrite"])
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == []


def test_predict_overwrites_when_asked(bad, tmp_path):
    out = tmp_path / "out.gpkg"
    out.write_bytes(b"old")
    res = refound(*predict_args(bad, out), "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes()[:16] == b"SQLite format 3\x00" and leftovers(tmp_path) == []


def test_second_run_on_a_locked_output_refuses(bad, tmp_path):
    import os

    out = tmp_path / "out.gpkg"
    lock = tmp_path / ".out.gpkg.lock"
    lock.write_text(str(os.getpid()))  # a live process (this test) holds the output
    res = refound(*predict_args(bad, out))
    assert_refused(res, ["out.gpkg", "another run"])
    assert not out.exists() and lock.exists()


def test_stale_lock_of_a_killed_run_is_taken_over(bad, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out.gpkg"
    (tmp_path / ".out.gpkg.lock").write_text(dead.stdout.strip())
    res = refound(*predict_args(bad, out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.exists() and leftovers(tmp_path) == []


def test_embed_refuses_gpkg_output_and_existing_file(bad, tmp_path):
    args = predict_args(bad, tmp_path / "emb.gpkg")
    args[0] = "embed"
    assert_refused(refound(*args), ["emb.gpkg", ".parquet"])
    existing = tmp_path / "emb.parquet"
    existing.write_bytes(b"x")
    args = predict_args(bad, existing)
    args[0] = "embed"
    assert_refused(refound(*args), ["emb.parquet", "--overwrite"])
    assert existing.read_bytes() == b"x"


TRAINING = [
    ("finetune_epochs_zero", ["finetune", "--data", "D", "--checkpoint", "C", "--out", "O", "--epochs", "0"],
     ["--epochs", "'0'"]),
    ("finetune_lr_nan", ["finetune", "--data", "D", "--checkpoint", "C", "--out", "O", "--lr", "nan"], ["--lr"]),
    ("finetune_batch_size_zero", ["finetune", "--data", "D", "--checkpoint", "C", "--out", "O", "--batch-size", "0"],
     ["--batch-size"]),
    ("pretrain_lr_nan", ["pretrain", "--data", "D", "--out", "O", "--steps", "1", "--lr", "nan"], ["--lr", "nan"]),
    ("teachers_batch_size_zero", ["teachers", "--data", "D", "--batch-size", "0"], ["--batch-size"]),
]


@pytest.mark.parametrize("case", TRAINING, ids=[c[0] for c in TRAINING])
def test_training_flags_refused(case, tmp_path):
    _, args, names = case
    res = refound(*[str(tmp_path / a) if a in ("D", "C", "O") else a for a in args])
    assert_refused(res, names)
    assert not (tmp_path / "O").exists()


def test_build_dataset_truncated_geotiff(bad, tmp_path):
    out = tmp_path / "ds"
    res = refound("build-dataset", "--out", out, "--pois", bad["gpkg"], "--imagery", bad["truncated"],
                  "--extent", bad["extent"] + "," + "EPSG:32650", "--quiet")
    assert_refused(res, ["truncated.tif"])
    assert not (out / "dataset.json").exists()


def test_debug_prints_the_traceback(bad, tmp_path):
    res = refound("--debug", *predict_args(bad, tmp_path / "o.gpkg", **{"--pois": bad["empty_pois"]}))
    assert res.returncode == 2 and "Traceback" in res.stderr and "empty.gpkg" in res.stderr
