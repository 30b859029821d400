"""`refound build-corpus`: a manifest of files in a git snapshot -> a region dataset of crops."""
import hashlib
import json
import subprocess

import numpy as np
import pytest

from refound_core.data.dataset import RegionDataset
from refound_core.errors import InputError
from training.commands.build_corpus import build_corpus, crop_origins, load_manifest


def _write_tif(path, arr):
    import rasterio
    from rasterio.transform import from_origin

    bands = arr.shape[2] if arr.ndim == 3 else 1
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=bands,
                       dtype=arr.dtype, crs="EPSG:32633", transform=from_origin(500000, 4000000, 1.0, 1.0)) as dst:
        dst.write(arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None])


@pytest.fixture
def snapshot(tmp_path):
    """A mirror folder holding one git snapshot ('owner/data') with a 96 x 64 RGB image and its mask
    (buildings = 255 in the left 24 columns), seeded."""
    work = tmp_path / "src"
    work.mkdir()
    rng = np.random.default_rng(0)
    _write_tif(work / "img.tif", rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    mask = np.zeros((64, 96), np.uint8)
    mask[:, :24] = 255
    _write_tif(work / "mask.tif", mask)
    git_dir = tmp_path / "mirror" / "owner+data" / "repo"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q", "--bare", str(git_dir)], check=True)
    for cmd in (["add", "img.tif", "mask.tif"], ["commit", "-q", "-m", "data"]):
        subprocess.run(["git", "--git-dir", str(git_dir), "--work-tree", str(work), *cmd], check=True, env=env)
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    sha = {n: hashlib.sha256((work / n).read_bytes()).hexdigest() for n in ("img.tif", "mask.tif")}
    return tmp_path / "mirror", commit, sha


def _manifest(commit, sha, **extra):
    src = {"id": "scene-a", "repo": "owner/data", "commit": commit, "path": "img.tif", "sha256": sha["img.tif"],
           "licence": "CC0-1.0", "place": "test", "native_gsd_m": 0.5,
           "mask": {"path": "mask.tif", "sha256": sha["mask.tif"], "threshold": 1}}
    return {"gsd_m": 0.5, "crop_px": 32, "stride_px": 32, "label": "building_fraction", "sources": [src], **extra}


def test_crop_origins_cover_the_far_edge():
    assert crop_origins(96, 32, 32) == [0, 32, 64]
    assert crop_origins(100, 32, 32) == [0, 32, 64, 68]
    assert crop_origins(20, 32, 32) == [0]


def test_crops_labels_and_scenes(snapshot, tmp_path):
    mirror, commit, sha = snapshot
    summary = build_corpus(_manifest(commit, sha), mirror, tmp_path / "ds", log=lambda *a: None)
    ds = RegionDataset(tmp_path / "ds")
    assert summary["crops"] == len(ds) == 6  # 3 columns x 2 rows of 32 px
    assert sorted(ds.cell_ids) == sorted(f"scene-a/{c}_{r}" for c in range(3) for r in range(2))
    frac = dict(zip(ds.cell_ids, ds.labels["building_fraction"]))
    # mask columns 0-23 are buildings: crops in column 0 hold 24/32 of them, the others none
    assert frac["scene-a/0_0"] == pytest.approx(0.75) and frac["scene-a/0_1"] == pytest.approx(0.75)
    assert frac["scene-a/1_0"] == 0.0 and frac["scene-a/2_1"] == 0.0
    assert (ds.poi_count == 0).all() and np.allclose(ds.image_coverage, 1.0)
    assert ds.meta["provenance"]["sources"][0]["licence"] == "CC0-1.0"
    assert ds.meta["scenes"][0]["scene"] == "scene-a"


def test_dihedral_views_are_regions_of_their_own(snapshot, tmp_path):
    """--views 8: each crop as 4 rotations x (as is, mirrored), each with its own cell_id in the same
    scene and the crop's label; the pixels are the crop's, turned."""
    mirror, commit, sha = snapshot
    build_corpus(_manifest(commit, sha), mirror, tmp_path / "one", log=lambda *a: None)
    summary = build_corpus(_manifest(commit, sha), mirror, tmp_path / "ds", views=8, log=lambda *a: None)
    one, ds = RegionDataset(tmp_path / "one"), RegionDataset(tmp_path / "ds")
    assert summary["crops"] == len(ds) == 8 * len(one)
    base = one.images[one.index_of("scene-a/0_1")]
    turned = ds.images[ds.index_of("scene-a/0_1_v1")]
    assert np.array_equal(turned, np.rot90(base, 1, axes=(0, 1)))
    mirrored = ds.images[ds.index_of("scene-a/0_1_v4")]
    assert np.array_equal(mirrored, base[:, ::-1]) and not np.array_equal(mirrored, base)
    views = {ds.images[ds.index_of(f"scene-a/0_1{'_v%d' % k if k else ''}")].tobytes() for k in range(8)}
    assert len(views) == 8  # a random image: the eight views all differ
    frac = dict(zip(ds.cell_ids, ds.labels["building_fraction"]))
    assert all(frac[f"scene-a/0_0_v{k}"] == pytest.approx(0.75) for k in range(1, 8))
    from training.finetune.probe import scene_groups

    assert scene_groups(ds)[1] == ["scene-a"]
    with pytest.raises(InputError, match="--views 3"):
        build_corpus(_manifest(commit, sha), mirror, tmp_path / "bad", views=3, log=lambda *a: None)


def test_resampling_and_partial_edge_crops(snapshot, tmp_path):
    mirror, commit, sha = snapshot
    # 0.5 m -> 1 m halves the image to 48 x 32: two crops, the second flush with the right edge
    build_corpus(_manifest(commit, sha, gsd_m=1.0), mirror, tmp_path / "ds", log=lambda *a: None)
    ds = RegionDataset(tmp_path / "ds")
    assert len(ds) == 2 and ds.cell_size == 32.0 and np.allclose(ds.image_coverage, 1.0)
    frac = dict(zip(ds.cell_ids, ds.labels["building_fraction"]))
    assert frac["scene-a/0_0"] == pytest.approx(12 / 32) and frac["scene-a/1_0"] == 0.0
    # 0.5 m -> 2 m: 24 x 16 px, smaller than one crop: padded, its missing pixels marked invalid
    build_corpus(_manifest(commit, sha, gsd_m=2.0), mirror, tmp_path / "ds2", min_coverage=0.3, log=lambda *a: None)
    ds2 = RegionDataset(tmp_path / "ds2")
    assert len(ds2) == 1 and ds2.image_coverage[0] == pytest.approx(24 * 16 / 32 ** 2)
    sample = ds2[0]
    assert sample.image_valid[:16, :24].all() and sample.image_valid.sum() == 24 * 16
    assert not sample.image[16:].any() and not sample.image[:, 24:].any()
    assert ds2.labels["building_fraction"][0] == pytest.approx(6 / 24)  # over the valid pixels only
    with pytest.raises(InputError, match="would be empty"):  # below --min-coverage: no crop at all
        build_corpus(_manifest(commit, sha, gsd_m=2.0), mirror, tmp_path / "ds3", min_coverage=0.5,
                     log=lambda *a: None)


def test_sha_mismatch_and_missing_snapshot_are_input_errors(snapshot, tmp_path):
    mirror, commit, sha = snapshot
    bad = _manifest(commit, {**sha, "img.tif": "0" * 64})
    with pytest.raises(InputError, match="sha256"):
        build_corpus(bad, mirror, tmp_path / "ds", log=lambda *a: None)
    with pytest.raises(InputError, match="no snapshot of owner/data"):
        build_corpus(_manifest(commit, sha), tmp_path / "nowhere", tmp_path / "ds2", log=lambda *a: None)
    assert not (tmp_path / "ds").exists() and not (tmp_path / "ds2").exists()


def test_manifest_validation(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"sources": [{"id": "a", "repo": "o/r"}]}))
    with pytest.raises(InputError, match="lacks commit, path, sha256"):
        load_manifest(p)


def test_committed_manifests_are_complete():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "data" / "manifests"
    for name in ("real-imagery.json", "real-probe.json"):
        m = load_manifest(root / name)
        assert all(len(s["sha256"]) == 64 and len(s["commit"]) == 40 for s in m["sources"])
        excluded = {line.strip() for line in (Path(__file__).resolve().parents[3] / "shared" / "data" /
                                              "HOLDOUT-EXCLUDE.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")} if (Path(__file__).resolve().parents[3] /
                                                                      "shared").exists() else set()
        assert not {s["repo"] for s in m["sources"]} & excluded


def test_bands_pick_rgb_out_of_a_four_band_file(tmp_path):
    """RGB+NIR / RGBA sources (NAIP, SpaceNet pan-sharpened) name their RGB bands with ``bands``;
    the 4th band (here a constant 255, like an alpha band) must never reach a crop."""
    work = tmp_path / "src"
    work.mkdir()
    rgb = np.random.default_rng(1).integers(0, 200, (32, 32, 3), dtype=np.uint8)
    _write_tif(work / "rgbn.tif", np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], axis=2))
    git_dir = tmp_path / "mirror" / "owner+four" / "repo"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q", "--bare", str(git_dir)], check=True)
    for cmd in (["add", "rgbn.tif"], ["commit", "-q", "-m", "data"]):
        subprocess.run(["git", "--git-dir", str(git_dir), "--work-tree", str(work), *cmd], check=True, env=env)
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    src = {"id": "four", "repo": "owner/four", "commit": commit, "path": "rgbn.tif", "licence": "CC0-1.0",
           "sha256": hashlib.sha256((work / "rgbn.tif").read_bytes()).hexdigest(), "place": "t", "native_gsd_m": 0.5}
    for bands, want in (([1, 2, 3], rgb), ([3, 2, 1], rgb[..., ::-1]), (None, rgb)):
        s = dict(src, bands=bands) if bands else src
        out = tmp_path / f"ds{bands}"
        build_corpus({"gsd_m": 0.5, "crop_px": 32, "sources": [s]}, tmp_path / "mirror", out, log=lambda *a: None)
        chip = RegionDataset(out)[0].image
        assert chip.shape == (32, 32, 3) and np.array_equal(chip, want)


def test_mask_statistics_count_and_size_footprints():
    from training.commands.build_corpus import MASK_STATS, mask_labels

    mask = np.zeros((40, 40), np.float32)
    mask[0:10, 0:10] = 1  # 100 px
    mask[20:24, 20:30] = 1  # 40 px
    mask[35, 35] = 1  # one stray pixel: 1 m² at 1 m, below the 5 m² floor
    mask[0:10, 10:12] = 1  # touches the first block: one footprint of 120 px, not two
    stats = mask_labels(mask, 1.0, MASK_STATS)
    assert stats["building_fraction"] == pytest.approx(161 / 1600)
    assert stats["building_count"] == 2.0
    assert stats["building_mean_area_m2"] == pytest.approx((120 + 40) / 2)
    # at 0.5 m a pixel is 0.25 m²: the 40 px block is 10 m², the stray pixel still noise
    at_half_metre = mask_labels(mask, 0.5, ["building_mean_area_m2"])
    assert at_half_metre == {"building_mean_area_m2": pytest.approx((120 + 40) / 2 * 0.25)}
    assert mask_labels(np.zeros((8, 8)), 1.0, ["building_count", "building_mean_area_m2"]) == {
        "building_count": 0.0, "building_mean_area_m2": 0.0}


def test_several_labels_and_several_manifests(snapshot, tmp_path):
    from training.commands.build_corpus import merge_manifests

    mirror, commit, sha = snapshot
    labels = ["building_fraction", "building_count", "building_mean_area_m2"]
    first = _manifest(commit, sha, label=labels)
    second = _manifest(commit, sha, label=labels)
    second["sources"] = [{**second["sources"][0], "id": "scene-b"}]
    merged = merge_manifests([first, second], ["one.json", "two.json"])
    build_corpus(merged, mirror, tmp_path / "ds", log=lambda *a: None)
    ds = RegionDataset(tmp_path / "ds")
    assert ds.label_names == labels and len(ds) == 12
    from training.finetune.probe import scene_groups

    assert scene_groups(ds)[1] == ["scene-a", "scene-b"]
    i = ds.index_of("scene-b/0_0")  # the left 24 of 32 columns: one 24 x 32 px footprint at 0.5 m
    assert ds.labels["building_count"][i] == 1.0
    assert ds.labels["building_mean_area_m2"][i] == pytest.approx(24 * 32 * 0.25)
    assert ds.labels["building_count"][ds.index_of("scene-b/1_0")] == 0.0
    with pytest.raises(InputError, match="'scene-a' is in both one.json and two.json"):
        merge_manifests([first, first], ["one.json", "two.json"])
    with pytest.raises(InputError, match="different labels"):
        merge_manifests([first, _manifest(commit, sha)], ["one.json", "two.json"])


def test_unknown_label_is_an_input_error(tmp_path):
    p = tmp_path / "m.json"
    src = {"id": "a", "repo": "o/r", "commit": "0" * 40, "path": "x.tif", "sha256": "0" * 64, "licence": "CC0-1.0",
           "place": "p", "native_gsd_m": 0.5}
    p.write_text(json.dumps({"label": ["building_fraction", "tree_cover"], "sources": [src]}))
    with pytest.raises(InputError, match="'tree_cover' is not a mask statistic"):
        load_manifest(p)
