"""The real-imagery probe: grouped folds, effective rank, ridge R², and `refound probe` end to end."""
import json
import math

import numpy as np
import pytest

from refound_core.errors import InputError
from training.finetune.probe import effective_rank, grouped_folds, ridge_r2, scene_groups


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_grouped_folds_never_split_a_scene(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 9, 200)
    folds = grouped_folds(groups, 5, seed)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(200))  # every region is tested exactly once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == 200


def test_grouped_folds_capped_at_scene_count_and_need_two_scenes():
    assert len(grouped_folds([0, 0, 1, 1, 2], 5, 0)) == 3
    with pytest.raises(InputError, match="at least 2 scenes"):
        grouped_folds([4, 4, 4], 5, 0)


def test_fold_seed_changes_the_assignment():
    groups = np.repeat(np.arange(10), 3)
    a = [tuple(sorted(set(groups[t]))) for _, t in grouped_folds(groups, 5, 0)]
    b = [tuple(sorted(set(groups[t]))) for _, t in grouped_folds(groups, 5, 1)]
    assert sorted(a) != sorted(b)


def test_effective_rank_of_constructed_matrices():
    # +-e_i for 4 axes in R^6: four equal singular values -> effective rank 4, top share 1/4
    eye = np.eye(6)[:4]
    x = np.vstack([eye, -eye]) + 5.0  # an offset: the rank is of the centred rows
    rank, top = effective_rank(x)
    assert rank == pytest.approx(4.0) and top == pytest.approx(0.25)
    # variances 3:1 along two axes -> p = (0.75, 0.25); exp(entropy) by hand
    x2 = np.array([[math.sqrt(3), 0], [-math.sqrt(3), 0], [0, 1], [0, -1]])
    rank2, top2 = effective_rank(x2)
    assert rank2 == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert top2 == pytest.approx(0.75)
    rank1, top1 = effective_rank(np.outer(np.arange(10.0), [1.0, 2.0, 3.0]))
    assert rank1 == pytest.approx(1.0) and top1 == pytest.approx(1.0)


def test_ridge_r2_tells_signal_from_noise():
    rng = np.random.default_rng(0)
    n = 120
    groups = np.repeat(np.arange(12), 10)
    y = rng.uniform(0, 1, n)
    informative = np.column_stack([y + rng.normal(0, 0.02, n), rng.normal(size=(n, 5))])
    noise = rng.normal(size=(n, 6))
    good = ridge_r2(informative, y, groups, folds=4, seeds=(0, 1))
    bad = ridge_r2(noise, y, groups, folds=4, seeds=(0, 1))
    assert good["r2_mean"] > 0.9 and good["r2_pooled_mean"] > 0.9
    assert bad["r2_pooled_mean"] < 0.2
    assert len(good["r2_folds"]) == 8 and len(good["r2_per_seed"]) == 2


def _probe_dataset(folder, scenes=4, per_scene=6, size=32, seed=0):
    """Image-only cells whose target is the share of bright pixels; scene in the cell_id."""
    from refound_core.data.dataset import RegionDataset, RegionDatasetWriter
    from refound_core.data.sample import RegionSample

    rng = np.random.default_rng(seed)
    with RegionDatasetWriter(folder, crs="LOCAL:scene-grid", cell_size=size * 0.5, image_size=size,
                             label_names=["building_fraction"], label_aux=["scene_index"]) as w:
        for s in range(scenes):
            for i in range(per_scene):
                mask = rng.uniform(0, 1, (size, size)) < rng.uniform(0, 1)
                img = np.where(mask[..., None], 220, 40).astype(np.uint8).repeat(3, axis=2)
                x0 = s * 1e5 + i * size * 0.5
                w.add(RegionSample(cell_id=f"scene{s}/{i}_0", bounds=(x0, 0.0, x0 + size * 0.5, size * 0.5),
                                   crs="LOCAL:scene-grid", poi_names=[], poi_categories=[], poi_xy=np.zeros((0, 2)),
                                   image=img, image_coverage=1.0, labels={"building_fraction": float(mask.mean())}),
                      aux={"scene_index": s})
    return RegionDataset(folder)


def test_alpha_chosen_over_scenes_does_not_memorise_scene_fingerprints():
    # crops of one scene share a 60-d fingerprint (near duplicates, as overlapping crops are) and
    # the target has an unpredictable per-scene offset; one column carries the real signal.
    # Leave-one-crop-out alpha sees the fingerprint "predict" the offset of a crop's own scene,
    # often picks a tiny alpha and then extrapolates on held-out scenes; alpha chosen over scenes
    # never does. Twelve seeded draws, since the failure is heavy-tailed.
    loo, scenes = [], []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        groups = np.repeat(np.arange(12), 12)
        s = rng.normal(size=groups.size)
        fingerprint = rng.normal(size=(12, 60))[groups] + 0.01 * rng.normal(size=(groups.size, 60))
        x = np.c_[s + 0.3 * rng.normal(size=s.size), fingerprint]
        y = s + rng.normal(size=12)[groups]
        loo.append(ridge_r2(x, y, groups, folds=4, seeds=(0, 1), alpha_cv="loo")["r2_pooled_mean"])
        scenes.append(ridge_r2(x, y, groups, folds=4, seeds=(0, 1), alpha_cv="scenes")["r2_pooled_mean"])
    assert min(scenes) > -0.5 and min(loo) < -3.0
    assert sum(v < -1.0 for v in loo) >= 3 and np.median(scenes) > np.median(loo)


def test_pixel_statistics_colour_and_edge_density():
    from training.finetune.probe import pixel_statistics

    flat = np.full((4, 6, 3), (255, 0, 51), np.uint8)  # one colour: no spread, no edges
    stripes = np.zeros((4, 6, 3), np.uint8)
    stripes[:, 1::2] = 255  # columns alternate black/white: grey steps of 1 along x, none along y
    out = pixel_statistics([flat, stripes])
    assert out.shape == (2, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [1.0, 0.0, 0.2, 0, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0], atol=1e-6)


def test_pixel_statistics_ignore_the_no_data_fill_of_partial_crops():
    from training.finetune.probe import pixel_statistics

    rng = np.random.default_rng(3)
    left = rng.integers(0, 256, (8, 5, 3), dtype=np.uint8)  # the valid part of the crop
    valid = np.zeros((8, 8), bool)
    valid[:, :5] = True
    crops = []
    for fill in (0, 255):  # two no-data fills of the same partial crop
        crop = np.full((8, 8, 3), fill, np.uint8)
        crop[:, :5] = left
        crops.append(crop)
    out = pixel_statistics(crops, [valid, valid])
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # the fill never enters
    np.testing.assert_allclose(out[0], pixel_statistics([left])[0], atol=1e-6)  # = the valid part alone
    assert not np.allclose(pixel_statistics(crops)[0], pixel_statistics(crops)[1])  # without masks it would
    with pytest.raises(InputError, match="no valid pixel"):
        pixel_statistics([left], [np.zeros((8, 5), bool)])


def test_scene_groups_from_cell_ids(tmp_path):
    ds = _probe_dataset(tmp_path / "ds", scenes=3, per_scene=2)
    codes, names = scene_groups(ds)
    assert names == ["scene0", "scene1", "scene2"]
    assert codes.tolist() == [0, 0, 1, 1, 2, 2]


def test_probe_command_end_to_end(tmp_path, capsys):
    from tests.training.finetune_fixtures import make_checkpoint
    from training.cli import main

    ds = _probe_dataset(tmp_path / "probe_ds")
    ckpt = make_checkpoint(tmp_path / "ckpt", ds)
    out = tmp_path / "res" / "probe.json"
    rc = main(["probe", "--data", str(ds.folder), "--checkpoint", str(ckpt), "--teacher", "none",
               "--repeats", "2", "--random-seeds", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [t["target"] for t in res["targets"]] == ["building_fraction"]  # default: every label of the dataset
    rows = res["targets"][0]["rows"]
    assert [r["kind"] for r in rows] == ["checkpoint h[S]", "random h[S]", "random h[S]", "random h[S] mean",
                                         "pixel statistics"]
    # Two seeds are two different networks; the mean row is the baseline a checkpoint must beat.
    assert rows[1]["r2_pooled_mean"] != rows[2]["r2_pooled_mean"]
    assert rows[3]["r2_pooled_mean"] == pytest.approx((rows[1]["r2_pooled_mean"] + rows[2]["r2_pooled_mean"]) / 2)
    assert rows[3]["members"] == ["random-init (seed 0)", "random-init (seed 1)"]
    # the fixture's target is the share of bright pixels: the mean grey level gives it away
    assert rows[4]["dim"] == 8 and rows[4]["r2_pooled_mean"] > 0.95
    assert res["folds"] == 4 and res["fold_seeds"] == [0, 1] and res["regions"] == 24
    for row in rows[:3] + rows[4:]:
        assert len(row["r2_folds"]) == 8 and all(math.isfinite(v) for v in row["r2_folds"])
        assert 1.0 <= row["effective_rank"] <= row["dim"] and 0 < row["top_pc_share"] <= 1
    assert [p.name for p in out.parent.iterdir()] == ["probe.json"]  # atomic: no temporary left behind
    printed = capsys.readouterr().out
    assert "random-init (seed 0)" in printed and "random-init mean (2 seeds)" in printed
    assert "24 crops from 4 scenes" in printed


def test_probe_command_rejects_unlabelled_regions(tmp_path, capsys):
    from tests.training.finetune_fixtures import make_dataset
    from training.cli import main

    ds = make_dataset(tmp_path / "ds", n=12)  # some cells have no image
    rc = main(["probe", "--data", str(ds.folder), "--target", "population", "--teacher", "efficientnet"])
    assert rc == 2
    assert "lack an image or a 'population' value" in capsys.readouterr().err


@pytest.mark.teachers
def test_probe_command_gives_one_row_per_teacher(tmp_path, capsys):
    from training.cli import main

    ds = _probe_dataset(tmp_path / "probe_ds")
    out = tmp_path / "probe.json"
    rc = main(["probe", "--data", str(ds.folder), "--teacher", "efficientnet", "--teacher", "geoembed",
               "--no-pixel-stats", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["targets"][0]["rows"]
    assert [(r["name"], r["dim"]) for r in rows] == [("efficientnet-teacher", 1280), ("geoembed-teacher", 512)]
    assert rows[0]["source"].startswith("efficientnet-lite0") and rows[1]["source"].startswith("geoembed-v3")
