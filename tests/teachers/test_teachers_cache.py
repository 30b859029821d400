"""Teacher cache: computed once per dataset, keyed by the teachers' identities (paper 4.2)."""
import json

import numpy as np
import pytest

from refound_core.errors import InputError
from refound_core.teachers import IGNORE_TOKEN, TeacherCache, TeacherTargets, stub_teachers
from refound_core.teachers.sentence import embed_long_texts
from refound_core.teachers.stubs import StubImageTeacher, StubSentenceEmbedder


def test_outputs_masks_and_shapes(tmp_path, samples):
    t = stub_teachers(codebook_size=8)
    out = TeacherCache(tmp_path).get_or_compute(samples, t, patches_per_side=4, batch_size=5, progress=False)
    n = len(samples)
    assert out.folder.parent == tmp_path / "teacher_cache"
    assert out.u_P.shape == (n, t.sentence.dim) and out.u_S.shape == (n, t.visual.dim)
    assert out.visual_tokens.shape == (n, 16) and out.visual_tokens.dtype == np.int16
    assert isinstance(out.u_P, np.memmap)
    np.testing.assert_array_equal(out.poi_valid, [s.has_pois for s in samples])
    np.testing.assert_array_equal(out.image_valid, [s.has_image for s in samples])
    # Invalid rows are zero / ignored; valid rows are the teachers' outputs.
    assert not out.u_P[~out.poi_valid].any() and not out.u_S[~out.image_valid].any()
    assert (out.visual_tokens[~out.image_valid] == IGNORE_TOKEN).all()
    tokens = out.visual_tokens[out.image_valid]
    assert tokens.min() >= 0 and tokens.max() < 8
    texts = out.descriptions()
    assert len(texts) == n and all(bool(x) == s.has_pois for x, s in zip(texts, samples))
    ref = StubSentenceEmbedder()  # fresh copy of the same stand-in
    i = int(np.flatnonzero(out.poi_valid)[0])
    np.testing.assert_allclose(out.u_P[i], embed_long_texts(ref, [texts[i]])[0], atol=2e-3)  # float16 storage
    j = int(np.flatnonzero(out.image_valid)[0])
    np.testing.assert_allclose(out.u_S[j], StubImageTeacher().embed_images([samples[j].image])[0], rtol=2e-3, atol=2e-3)
    # The tokens are the stored codebook's nearest codes of the teacher's patch features.
    np.testing.assert_array_equal(out.visual_tokens[j], out.codebook.assign(t.visual.patch_features([samples[j].image], 4))[0])
    # v_S is the visual teacher's image embedding (paper 4.2.1, last paragraph).
    assert out.meta["v_S"] == "u_S" and out.v_S is out.u_S
    rows = out.rows([j, i])
    assert rows["u_P"].dtype == np.float32 and rows["visual_tokens"].dtype == np.int64
    assert rows["image_valid"][0] and rows["poi_valid"][1]
    assert out.meta["provenance"]["visual"]["paper"].startswith("CN-CLIP")
    assert not [p for p in (tmp_path / "teacher_cache").iterdir() if p.name.startswith(".")]  # no temp left
    import pickle
    blob = pickle.dumps(out)
    assert len(blob) < 2000  # the folder, not the arrays
    back = pickle.loads(blob)
    assert isinstance(back.u_P, np.memmap)
    np.testing.assert_array_equal(back.visual_tokens, out.visual_tokens)


def test_unchanged_teachers_reuse_without_recomputing(tmp_path, samples):
    t = stub_teachers()
    first = TeacherCache(tmp_path).get_or_compute(samples, t, 4, progress=False)
    calls = (t.describer.calls, t.sentence.calls, t.visual.embed_calls, t.visual.patch_calls)
    assert all(calls)
    t2 = stub_teachers()  # equal teachers built afresh: same identity
    second = TeacherCache(tmp_path).get_or_compute(samples, t2, 4, progress=False)
    assert second.folder == first.folder
    assert (t2.describer.calls, t2.sentence.calls, t2.visual.embed_calls, t2.visual.patch_calls) == (0, 0, 0, 0)
    np.testing.assert_array_equal(second.visual_tokens, first.visual_tokens)
    assert TeacherCache(tmp_path).load(samples, t2, 4) is not None


def test_changed_teacher_gets_a_new_folder(tmp_path, samples):
    cache = TeacherCache(tmp_path)
    base = cache.get_or_compute(samples, stub_teachers(), 4, progress=False)
    old_meta = (base.folder / "meta.json").read_text()
    changed_visual = stub_teachers()
    changed_visual.visual = changed_visual.tokenizer.featurizer = StubImageTeacher(seed=1)
    changed_sentence = stub_teachers()
    changed_sentence.sentence = StubSentenceEmbedder(dim=24)
    folders = {base.folder}
    for t in (changed_visual, changed_sentence, stub_teachers(codebook_size=6)):
        out = cache.get_or_compute(samples, t, 4, progress=False)
        assert out.folder not in folders
        folders.add(out.folder)
        assert t.visual.embed_calls > 0  # really recomputed
    # Another patch grid or storage dtype is another cache too.
    assert cache.folder_for(samples, stub_teachers(), 2) not in folders
    assert cache.folder_for(samples, stub_teachers(), 4, dtype="float32") not in folders
    assert (base.folder / "meta.json").read_text() == old_meta  # old cache untouched
    assert cache.get_or_compute(samples, changed_sentence, 4, progress=False).u_P.shape[1] == 24
    # Same describer and data: descriptions are reused, not regenerated (LLMs are slow).
    assert changed_sentence.describer.calls == 0
    assert json.loads((cache.folder_for(samples, changed_sentence, 4) / "meta.json").read_text())["descriptions_reused"]


def test_dataset_fingerprint_is_part_of_the_key(tmp_path, samples):
    class DS(list):
        def __init__(self, items, fingerprint):
            super().__init__(items)
            self.fingerprint = fingerprint

    cache = TeacherCache(tmp_path)
    t = stub_teachers()
    a = cache.folder_for(DS(samples, "v1"), t, 4)
    assert cache.folder_for(DS(samples, "v2"), t, 4) != a
    assert cache.folder_for(samples[:-1], t, 4) != cache.folder_for(samples, t, 4)


def test_second_pass_without_spill_gives_the_same_tokens(tmp_path, samples):
    spilled = TeacherCache(tmp_path / "a").get_or_compute(samples, stub_teachers(), 4, progress=False)
    streamed = TeacherCache(tmp_path / "b").get_or_compute(samples, stub_teachers(), 4, progress=False,
                                                           spill_limit_bytes=0)
    # Both fit on every patch here (fewer than max_fit_vectors), so the codebooks agree up to
    # float16 spill rounding, and so do almost all tokens.
    agree = (spilled.visual_tokens == streamed.visual_tokens).mean()
    assert agree > 0.95
    assert streamed.meta["num_codes"] == 8


def test_patch_features_are_kept_as_the_dense_dvfm_targets(tmp_path, samples):
    t = stub_teachers()
    out = TeacherCache(tmp_path / "a").get_or_compute(samples, t, 4, progress=False)
    assert out.meta["format"] == 2 and out.meta["patch_features"] and out.has_patch_features
    j = int(np.flatnonzero(out.image_valid)[0])
    want = t.visual.patch_features([samples[j].image], 4)[0]
    assert out.patch_features.shape == (len(samples), 16, want.shape[1])
    np.testing.assert_allclose(out.patch_features[j], want, rtol=2e-3, atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(out.visual_tokens[j], out.codebook.assign(np.asarray(out.patch_features[j:j + 1],
                                                                                        np.float32))[0])
    assert not out.patch_features[~out.image_valid].any()
    # Centred like u_S: over all valid patches the mean is zero; rows without an image stay zero.
    assert "patch_features" not in out.normalized("centered").stats  # the big array is read only when asked
    cen = out.normalized("centered", patches=True)
    assert "patch_features" not in cen.rows([j])  # only read when asked for (the dense DVFM term)
    rows = cen.rows(np.arange(len(samples)), patches=True)["patch_features"]
    assert np.abs(rows[out.image_valid].reshape(-1, want.shape[1]).mean(axis=0)).max() < 1e-3
    assert not rows[~out.image_valid].any()
    import pickle  # DataLoader workers reopen the cache from its folder: the patch statistics come along
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(cen)).rows([j], patches=True)["patch_features"],
                                  rows[j:j + 1])
    # With a fixed codebook (no fit) the features are kept too; over the spill limit they are not.
    from refound_core.teachers.tokenizer_vq import KMeansTokenizer

    t2 = stub_teachers()
    t2.tokenizer = KMeansTokenizer(t2.visual, codebook=out.codebook)
    fixed = TeacherCache(tmp_path / "b").get_or_compute(samples, t2, 4, progress=False)
    np.testing.assert_array_equal(fixed.patch_features, out.patch_features)
    small = TeacherCache(tmp_path / "c").get_or_compute(samples, stub_teachers(), 4, progress=False, spill_limit_bytes=0)
    assert not small.meta["patch_features"] and not small.has_patch_features
    assert "patch_features" not in small.rows([j], patches=True)
    assert not (small.folder / "patch_features.npy").exists()


def test_fixed_codebook_is_used_as_is(tmp_path, samples):
    from refound_core.teachers.tokenizer_vq import KMeansTokenizer

    fitted = TeacherCache(tmp_path / "a").get_or_compute(samples, stub_teachers(), 4, progress=False)
    t = stub_teachers()
    t.tokenizer = KMeansTokenizer(t.visual, codebook=fitted.codebook)
    out = TeacherCache(tmp_path / "b").get_or_compute(samples, t, 4, progress=False)
    np.testing.assert_array_equal(out.codebook.centroids, fitted.codebook.centroids)
    np.testing.assert_array_equal(out.visual_tokens, fitted.visual_tokens)


def test_failed_computation_leaves_no_cache_and_resumes(tmp_path, samples):
    """A teacher that fails mid-way: no cache folder that looks complete, no lock; only the hidden
    .partial folder, from which the next call continues (and ends with the same targets)."""
    t = stub_teachers()
    real = t.visual.embed_images
    calls = []

    def boom_on_second_batch(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("teacher crashed")
        return real(images)

    t.visual.embed_images = boom_on_second_batch
    with pytest.raises(RuntimeError):
        TeacherCache(tmp_path).get_or_compute(samples, t, 4, batch_size=4, progress=False)
    left = sorted(p.name for p in (tmp_path / "teacher_cache").iterdir())
    assert len(left) == 1 and left[0].endswith(".partial") and left[0].startswith(".")
    messages = []
    t.visual.embed_images = real
    out = TeacherCache(tmp_path).get_or_compute(samples, t, 4, batch_size=4, progress=False, log_fn=messages.append)
    assert out.meta["resumed_after_rows"] == 4 and any("resuming" in m for m in messages)
    fresh = TeacherCache(tmp_path / "fresh").get_or_compute(samples, stub_teachers(), 4, batch_size=4,
                                                            progress=False)
    np.testing.assert_array_equal(np.asarray(out.u_S), np.asarray(fresh.u_S))
    np.testing.assert_array_equal(np.asarray(out.visual_tokens), np.asarray(fresh.visual_tokens))
    assert sorted(p.name for p in (tmp_path / "teacher_cache").iterdir()) == [out.folder.name]
    with pytest.raises(InputError):
        TeacherTargets.open(tmp_path / "teacher_cache" / "nothing")
    with pytest.raises(InputError):
        TeacherCache(tmp_path).get_or_compute(samples, stub_teachers(), 4, dtype="int8", progress=False)


def test_separate_vl_teacher_is_stored(tmp_path, samples):
    t = stub_teachers()
    t.vl = StubImageTeacher(dim=5, seed=7)
    out = TeacherCache(tmp_path).get_or_compute(samples, t, 4, progress=False)
    assert out.meta["v_S"] == "v_S" and out.v_S.shape == (len(samples), 5)
    j = int(np.flatnonzero(out.image_valid)[0])
    np.testing.assert_allclose(out.v_S[j], StubImageTeacher(dim=5, seed=7).embed_images([samples[j].image])[0],
                               rtol=2e-3, atol=2e-3)
    assert not out.v_S[~out.image_valid].any()


def test_dataset_without_images_still_caches_poi_targets(tmp_path, samples):
    from dataclasses import replace

    no_images = [replace(s, image=None, image_coverage=0.0) for s in samples]
    out = TeacherCache(tmp_path).get_or_compute(no_images, stub_teachers(), 4, progress=False)
    assert not out.image_valid.any() and (out.visual_tokens == IGNORE_TOKEN).all()
    assert out.poi_valid.sum() == sum(s.has_pois for s in samples)
    assert out.codebook.num_codes == 8


@pytest.mark.parametrize("mode", ["centered", "zscore"])
def test_normalized_targets_remove_the_shared_direction(tmp_path, samples, mode):
    # Teacher features share one dominant mean direction; pre-training regresses them centred
    # (docs/PRETRAINING.md, choice 12). Statistics come from valid rows only.
    import pickle
    raw = TeacherCache(tmp_path).get_or_compute(samples, stub_teachers(), 4, progress=False)
    norm = raw.normalized(mode)
    idx = np.arange(len(samples))
    got, ref = norm.rows(idx), raw.rows(idx)
    for name, valid in (("u_P", ref["poi_valid"]), ("u_S", ref["image_valid"])):
        v = valid.astype(bool)
        x = ref[name][v].astype(np.float64)
        want = x - x.mean(0)
        if mode == "zscore":
            want = want / np.maximum(x.std(0), 1e-6)
        np.testing.assert_allclose(got[name][v], want, atol=1e-4)
        assert not got[name][~v].any()  # invalid rows stay zero: the losses mask them
    np.testing.assert_array_equal(got["visual_tokens"], ref["visual_tokens"])  # MGDM targets untouched
    back = pickle.loads(pickle.dumps(norm))  # DataLoader workers keep the normalisation
    np.testing.assert_allclose(back.rows(idx)["u_S"], got["u_S"], atol=1e-6)
    with pytest.raises(InputError, match="not one of"):
        raw.normalized("whiten")
