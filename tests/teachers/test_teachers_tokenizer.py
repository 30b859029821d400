"""k-means visual tokenizer for MGDM (paper 4.2.2, A.2.1; BEiT v2 / VQ-KD idea)."""
import numpy as np
import pytest

from refound_core.errors import InputError
from refound_core.teachers.stubs import StubImageTeacher
from refound_core.teachers.tokenizer_vq import (Codebook, KMeansTokenizer, PixelPatchFeaturizer, kmeans,
                                                nearest_centroid)


def brute_force_nearest(x, c):
    return ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1).argmin(1)


def test_assignment_is_the_brute_force_nearest_centroid():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 12)).astype(np.float32)
    c = rng.standard_normal((37, 12)).astype(np.float32)
    np.testing.assert_array_equal(nearest_centroid(x, c, chunk=500), brute_force_nearest(x, c))
    book = Codebook(c, normalize=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(book.assign(x.reshape(30, 100, 12)).reshape(-1), brute_force_nearest(xn, c))


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((5, 4)) * 10
    labels = rng.integers(0, 5, 1000)
    x = (centres[labels] + 0.1 * rng.standard_normal((1000, 4))).astype(np.float32)
    c = kmeans(x, 5, iters=30, seed=0)
    assign = nearest_centroid(x, c)
    # Each true cluster maps to exactly one code and vice versa.
    pairs = set(zip(labels.tolist(), assign.tolist()))
    assert len(pairs) == 5 and len({a for _, a in pairs}) == 5
    # Every fitted centroid is the mean of the points assigned to it (Lloyd's fixed point).
    for k in range(5):
        np.testing.assert_allclose(c[k], x[assign == k].mean(0), atol=1e-4)
    np.testing.assert_array_equal(c, kmeans(x, 5, iters=30, seed=0))


def test_kmeans_with_fewer_points_than_codes_keeps_the_code_count():
    x = np.eye(3, dtype=np.float32)
    c = kmeans(x, 8)
    assert c.shape == (8, 3)
    np.testing.assert_array_equal(nearest_centroid(x, c), [0, 1, 2])
    with pytest.raises(InputError):
        kmeans(np.zeros((0, 3), np.float32), 4)


def test_codebook_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    book = Codebook(rng.standard_normal((16, 6)).astype(np.float32), normalize=False, source="pixels(x)")
    path = tmp_path / "codebook.safetensors"
    book.save(path)
    back = Codebook.load(path)
    np.testing.assert_array_equal(back.centroids, book.centroids)
    assert (back.normalize, back.source, back.identity()) == (False, "pixels(x)", book.identity())
    x = rng.standard_normal((50, 6)).astype(np.float32)
    np.testing.assert_array_equal(back.assign(x), book.assign(x))
    assert not list(tmp_path.glob("*.tmp*"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a codebook")
    with pytest.raises(Exception):
        Codebook.load(tmp_path / "junk.safetensors")
    with pytest.raises(InputError):
        Codebook.load(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="dims"):
        back.assign(np.zeros((2, 5), np.float32))


def test_tokens_follow_the_model_patch_grid():
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (64, 100, 256)]
    for featurizer in (PixelPatchFeaturizer(patch_px=4), StubImageTeacher()):
        tok = KMeansTokenizer(featurizer, num_codes=6, iters=5)
        for grid in (4, 16):
            feats = featurizer.patch_features(images, grid)
            assert feats.shape == (3, grid * grid, featurizer.feature_dim)
            book = tok.fit(feats.reshape(-1, featurizer.feature_dim))
            tokens = tok.tokens(images, grid, book)
            assert tokens.shape == (3, grid * grid)
            assert tokens.min() >= 0 and tokens.max() < 6
    with pytest.raises(InputError, match="no codebook"):
        KMeansTokenizer(PixelPatchFeaturizer()).tokens(images, 4)
    with pytest.raises(InputError):
        KMeansTokenizer(PixelPatchFeaturizer(), num_codes=1)


def test_pixel_patches_are_row_major_from_the_north():
    # Top half red, bottom half blue: the first grid row's tokens see red, the last row's blue.
    img = np.zeros((32, 32, 3), np.uint8)
    img[:16, :, 0] = 255
    img[16:, :, 2] = 255
    feats = PixelPatchFeaturizer(patch_px=2).patch_features([img], 4)
    per_patch = feats[0].reshape(16, 3, 4).mean(-1)  # channel means per patch
    assert np.allclose(per_patch[:4], [1, 0, 0], atol=0.01)    # first row: red
    assert np.allclose(per_patch[-4:], [0, 0, 1], atol=0.01)   # last row: blue
