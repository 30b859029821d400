"""Coverage-aware inputs: pixels without image data never reach the model as colour.

A cell half outside the imagery is read through the real ChipReader (rasterio/GDAL), so the mask
comes from GDAL's warped validity, and predicted with a tiny random checkpoint. The fill value of
the missing half is then changed: if any of those pixels reached the model, the outputs would move.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from refound_core.data.featurize import DEFAULT_MIN_IMAGE_COVERAGE
from refound_core.data.imagery import ChipReader
from refound_core.data.sample import RegionSample
from tests.inference._inference_fixtures import CATEGORIES, CRS, build_tiny_checkpoint

CELL = (500224.0, 3000064.0, 500480.0, 3000320.0)  # one 256 m cell


@pytest.fixture(scope="module")
def half_cell(tmp_path_factory):
    """A raster covering the west half of CELL only (64 px at 2 m, random texture)."""
    import rasterio
    from rasterio.transform import from_bounds

    folder = tmp_path_factory.mktemp("coverage")
    xmin, ymin, xmax, ymax = CELL
    mid = (xmin + xmax) / 2
    rng = np.random.default_rng(3)
    data = rng.integers(0, 255, size=(3, 128, 64), dtype=np.uint8)
    tif = folder / "west_half.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=64, height=128, count=3, dtype="uint8", crs=CRS,
                       transform=from_bounds(xmin, ymin, mid, ymax, 64, 128)) as dst:
        dst.write(data)
    with ChipReader(tif, size_px=64) as reader:
        chip = reader.read(CELL, CRS)
    ckpt = build_tiny_checkpoint(folder / "ckpt", task="population", kind="regression")
    return chip, ckpt


def _sample(chip, image=None, valid="chip", coverage=None) -> RegionSample:
    rng = np.random.default_rng(0)
    xy = np.stack([rng.uniform(CELL[0], CELL[2], 4), rng.uniform(CELL[1], CELL[3], 4)], axis=1)
    return RegionSample(cell_id="EPSG:32650/256/1954_11719", bounds=CELL, crs=CRS,
                        poi_names=["central market", "north cafe", "river school", "garden"],
                        poi_categories=[CATEGORIES[k % len(CATEGORIES)] for k in range(4)], poi_xy=xy,
                        image=chip.image if image is None else image,
                        image_coverage=chip.coverage if coverage is None else coverage,
                        image_valid=chip.valid if valid == "chip" else valid)


def _predict(ckpt, sample):
    from refound_core.inference.predictor import Predictor

    pred = Predictor(ckpt, device="cpu")
    (res,) = list(pred.predict_samples([sample]))
    (emb,) = list(pred.embed_samples([dataclasses.replace(sample)]))
    return res, emb


def test_reader_marks_the_missing_half_invalid(half_cell):
    chip, _ = half_cell
    assert chip.coverage == pytest.approx(0.5, abs=0.02)
    assert chip.valid is not None and chip.valid.shape == (64, 64)
    assert chip.valid[:, :30].all() and not chip.valid[:, 34:].any()  # west valid, east outside the raster


def test_missing_half_never_reaches_the_model(half_cell):
    chip, ckpt = half_cell
    base, base_emb = _predict(ckpt, _sample(chip))
    assert base.image_used and base.image_coverage == pytest.approx(chip.coverage)
    for fill in (255, 128):
        img = chip.image.copy()
        img[~chip.valid] = fill
        res, emb = _predict(ckpt, _sample(chip, image=img))
        assert res.value == pytest.approx(base.value, rel=1e-6, abs=1e-6)
        np.testing.assert_allclose(emb.h_S, base_emb.h_S, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(emb.h_P, base_emb.h_P, rtol=1e-5, atol=1e-5)
    noisy = chip.image.copy()
    noisy[~chip.valid] = np.random.default_rng(1).integers(0, 255, size=noisy[~chip.valid].shape, dtype=np.uint8)
    _, emb = _predict(ckpt, _sample(chip, image=noisy))
    np.testing.assert_allclose(emb.h_S, base_emb.h_S, rtol=1e-5, atol=1e-5)


def test_the_valid_half_does_reach_the_model(half_cell):
    """The control: the same change made to the valid pixels moves the image embedding, and
    dropping the mask (the old behaviour: missing pixels read as black) moves it too."""
    chip, ckpt = half_cell
    _, base_emb = _predict(ckpt, _sample(chip))
    img = chip.image.copy()
    img[chip.valid] = 255
    _, emb = _predict(ckpt, _sample(chip, image=img))
    assert np.abs(emb.h_S - base_emb.h_S).max() > 1e-3
    _, unmasked = _predict(ckpt, _sample(chip, valid=None))
    assert np.abs(unmasked.h_S - base_emb.h_S).max() > 1e-3


def test_below_the_coverage_threshold_the_image_counts_as_missing(half_cell):
    chip, ckpt = half_cell
    low = DEFAULT_MIN_IMAGE_COVERAGE / 2
    res, emb = _predict(ckpt, _sample(chip, coverage=low))
    poi_only, poi_emb = _predict(ckpt, _sample(chip, image=None, valid=None, coverage=0.0))
    assert not res.image_used and res.image_coverage == pytest.approx(low)
    assert res.value == pytest.approx(poi_only.value, rel=1e-6, abs=1e-6)
    assert np.isnan(emb.h_S).all() and np.isnan(poi_emb.h_S).all()


def test_dataset_round_trips_the_pixel_mask(tmp_path, half_cell):
    from refound_core.data.dataset import RegionDataset, RegionDatasetWriter

    chip, _ = half_cell
    full = RegionSample(cell_id="EPSG:32650/256/1953_11719", bounds=(CELL[0] - 256, CELL[1], CELL[0], CELL[3]),
                        crs=CRS, image=chip.image, image_coverage=1.0)
    with RegionDatasetWriter(tmp_path / "ds", crs=CRS, cell_size=256.0, image_size=64) as w:
        w.add(full)
        w.add(_sample(chip))
    ds = RegionDataset(tmp_path / "ds")
    assert ds[0].image_valid is None
    np.testing.assert_array_equal(ds[1].image_valid, chip.valid)


def test_poi_only_cells_beside_imaged_ones_are_named_once_per_run(half_cell):
    """A run mixing cells with and without usable imagery says how many were predicted from POIs
    alone; a run of one kind says nothing; the notice does not outlive its run."""
    from refound_core.inference.predictor import POI_ONLY_NOTICE_START, Predictor

    chip, ckpt = half_cell
    pred = Predictor(ckpt, device="cpu")

    def run(coverages):
        samples = [dataclasses.replace(_sample(chip, coverage=c), cell_id=f"EPSG:32650/256/{i}_0")
                   for i, c in enumerate(coverages)]
        results = list(pred.predict_samples(samples))
        return [m for m in pred.notices if m.startswith(POI_ONLY_NOTICE_START)], results

    notices, results = run([0.5, 0.0, 0.5, 0.0, 0.0])
    assert [r.image_used for r in results] == [True, False, True, False, False]
    assert len(notices) == 1 and " 3 cell(s)" in notices[0], notices
    assert run([0.5, 0.5])[0] == []
    assert run([0.0, 0.0])[0] == []  # a POI-only run (no imagery at all) is not the case warned about
