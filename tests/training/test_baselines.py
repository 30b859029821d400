"""The evaluation's baselines (training/finetune/baselines): each runs through the shared loop on a
tiny region dataset and returns well-formed predictions of its best validation epoch.

Tests marked ``teachers`` load the real offline weights (MiniLM, EfficientNet-Lite0, USE) that
`make setup` installs; the others use ReFound-tiny's ViT shape or stand-in teachers.
"""
import math

import numpy as np
import pytest
import torch

from refound_core.data.dataset import RegionDataset, RegionDatasetWriter
from refound_core.data.sample import RegionSample
from training.finetune import baselines
from training.finetune.baselines import common
from training.finetune.methods import REGISTRY, EvalContext, Split
from training.finetune.metrics import HIGHER_IS_BETTER, PRIMARY, task_metrics
from training.finetune.tasks import TaskSpec

CRS = "EPSG:32650"
CELL = 256.0
IMG = 32
N = 24
UV = TaskSpec("uv", "uv", "binary")
POP = TaskSpec("pop", "pop", "regression", log_target=True)


def _cell(i, rng):
    """Even cells are 'villages' (market names, bright red chips), odd ones offices (dark blue).
    Every 6th cell has no POIs, every 7th no image: the label still follows the other modality."""
    village = i % 2 == 0
    col, row = i % 6, i // 6
    x0, y0 = 1000.0 + col * CELL, 5000.0 + row * CELL
    names, cats = [], []
    if i % 6 != 5:
        for j in range(2 + i % 4):
            names.append(f"{'village market' if village else 'office tower'} {j}")
            cats.append("shopping;market" if village else "business;office")
    xy = np.column_stack([x0 + rng.uniform(1, CELL - 1, len(names)), y0 + rng.uniform(1, CELL - 1, len(names))])
    image = None
    if i % 7 != 3:
        base = np.array([200, 60, 40] if village else [30, 40, 120], dtype=np.int16)
        image = np.clip(base + rng.integers(-25, 26, (IMG, IMG, 3)), 0, 255).astype(np.uint8)
    return RegionSample(cell_id=f"{CRS}/256/{col}_{row}", bounds=(x0, y0, x0 + CELL, y0 + CELL), crs=CRS,
                        poi_names=names, poi_categories=cats, poi_xy=xy.reshape(-1, 2), image=image,
                        image_coverage=1.0 if image is not None else 0.0,
                        labels={"uv": float(village), "pop": float(10 * len(names) + 5 * village)})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("baselines") / "ds"
    with RegionDatasetWriter(folder, crs=CRS, cell_size=CELL, image_size=IMG, label_names=["uv", "pop"]) as w:
        for i in range(N):
            w.add(_cell(i, rng))
    return RegionDataset(folder)


@pytest.fixture(scope="module")
def split():
    idx = np.arange(N)
    return Split(train=idx[idx % 3 == 0], val=idx[idx % 3 == 1], test=idx[idx % 3 == 2])


def _ctx(dataset, tmp_path, batch_size=4, **options):
    """Two epochs; ReFound-tiny's ViT shape and 64 px EfficientNet inputs keep the CPU cost small."""
    opts = {"vit_preset": "tiny", "effnet_image_size": 64}
    opts.update(options)
    return EvalContext(dataset=dataset, checkpoint=None, epochs=2, batch_size=batch_size, cache_dir=str(tmp_path),
                       options=opts)


def _check_result(res, task, split, epochs, dataset):
    assert res.val_pred.shape == (len(split.val),) and res.test_pred.shape == (len(split.test),)
    assert np.isfinite(res.val_pred).all() and np.isfinite(res.test_pred).all()
    if task.kind == "binary":
        assert ((res.val_pred >= 0) & (res.val_pred <= 1)).all()
        assert ((res.test_pred >= 0) & (res.test_pred <= 1)).all()
    assert len(res.history) == epochs
    key = PRIMARY[task.kind]
    scores = [h[f"val_{key}"] for h in res.history]
    sign = 1 if HIGHER_IS_BETTER[key] else -1
    finite = [k for k, s in enumerate(scores) if not math.isnan(s)]
    best = max(finite, key=lambda k: (sign * scores[k], -k)) if finite else 0  # first best epoch wins
    assert res.best_epoch == best
    # the returned validation predictions are the selected epoch's
    y_val = dataset.labels[task.label][split.val]
    assert task_metrics(task.kind, y_val, res.val_pred, y_val=y_val, val_pred=res.val_pred)[key] == pytest.approx(scores[best], rel=1e-9, abs=1e-12)


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    common.clear_memory_cache()
    yield
    common.clear_memory_cache()


def test_registry_names_and_descriptions():
    assert set(baselines.NAMES) <= set(REGISTRY)
    for name in baselines.NAMES:
        cls = REGISTRY[name]
        assert cls.name == name
        assert cls.mode in ("fine-tuning", "feature-based")
        assert len(cls.stands_in_for) > 40
    assert REGISTRY["teacher_features"].mode == "feature-based"


# -- inputs ---------------------------------------------------------------------------------------
def test_text_inputs_zorder_sep_and_empty_regions(dataset):
    from refound_core.data.tokenizer import PoiTokenizer

    tok = PoiTokenizer.default()
    ids = common.poi_token_ids(dataset, range(N), tok, max_tokens=512, seed=0)
    for i in range(N):
        s = dataset[i]
        seq = ids[i]
        assert seq[0] == tok.cls_id and seq[-1] == tok.sep_id
        assert int((seq == tok.sep_id).sum()) == max(1, s.num_pois)  # one [SEP] per POI, [CLS][SEP] if none
        if s.num_pois:
            names = common.zordered_names(s, np.random.default_rng(0))
            want = [tok.cls_id] + [t for n in names for t in tok.encode_name(n) + [tok.sep_id]]
            assert sorted(seq.tolist()) == sorted(want)  # same tokens; order follows the Z-curve
    short = common.poi_token_ids(dataset, [1], tok, max_tokens=6, seed=0)[1]
    assert len(short) <= 6 and short[0] == tok.cls_id


def test_zordered_names_follow_the_z_curve():
    s = RegionSample("c", (0.0, 0.0, 256.0, 256.0), CRS, poi_names=["se", "nw", "ne", "sw"],
                     poi_categories=["a"] * 4, poi_xy=np.array([[200.0, 10.0], [10.0, 250.0], [200.0, 250.0],
                                                                 [10.0, 10.0]]))
    assert common.zordered_names(s, np.random.default_rng(0)) == ["nw", "ne", "sw", "se"]


def test_image_batch_zeros_and_flags_for_missing_images(dataset):
    x, has = common.image_batch(dataset, range(N), 48)
    assert x.shape == (N, 3, 48, 48) and x.dtype == torch.float32
    expect = dataset.image_coverage > 0
    assert has.numpy().tolist() == expect.tolist() and not expect.all()
    assert torch.count_nonzero(x[~has]) == 0
    assert (x[has].abs().amax(dim=(1, 2, 3)) > 0).all()


def test_index_batches_cover_once_and_shuffle_by_epoch():
    b = common.IndexBatches(4, seed=3, lengths=np.arange(20))
    idx = np.arange(5, 15)
    for shuffle, epoch in ((False, -1), (True, 0), (True, 1)):
        batches = b(idx, shuffle, epoch)
        got = np.concatenate([pos for _, pos in batches])
        assert sorted(got.tolist()) == list(range(len(idx)))
        for ds_idx, pos in batches:
            assert (ds_idx == idx[pos]).all()
    # length bucketing: no inference batch mixes short and long texts
    assert [sorted(p.tolist()) for _, p in b(idx, False, -1)] == [[6, 7, 8, 9], [2, 3, 4, 5], [0, 1]]
    plain = common.IndexBatches(4, seed=3)
    assert [p.tolist() for _, p in plain(idx, True, 0)] == [p.tolist() for _, p in plain(idx, True, 0)]
    assert [p.tolist() for _, p in plain(idx, True, 0)] != [p.tolist() for _, p in plain(idx, True, 1)]


# -- methods end to end -----------------------------------------------------------------------------
def test_vit_scratch_runs_selects_and_is_deterministic(dataset, split, tmp_path):
    method = REGISTRY["vit_scratch"](_ctx(dataset, tmp_path))
    a = method.run(UV, split, seed=0)
    _check_result(a, UV, split, 2, dataset)
    b = method.run(UV, split, seed=0)
    np.testing.assert_array_equal(a.val_pred, b.val_pred)
    np.testing.assert_array_equal(a.test_pred, b.test_pred)
    c = method.run(UV, split, seed=1)
    assert not np.array_equal(a.test_pred, c.test_pred)


def test_vit_scratch_has_refound_small_shape(dataset, tmp_path):
    from refound_core.model.config import refound_small
    from training.finetune.baselines.image import ViTEncoder, vit_config

    cfg = vit_config(_ctx(dataset, tmp_path, vit_preset="small"))
    small = refound_small()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.image_size, cfg.patch_size) == \
        (small.hidden_size, small.num_layers, small.num_heads, small.image_size, small.patch_size)
    enc = ViTEncoder(cfg)
    assert len(enc.vit.blocks) == small.num_layers and enc.vit.embed_dim == small.hidden_size
    assert enc.vit.blocks[0].mlp.fc1.out_features == small.intermediate_size
    assert enc.vit.patch_embed.num_patches == small.num_patches


def _stub_teachers():
    from refound_core.teachers import stub_teachers

    return stub_teachers()


def test_teacher_features_cached_once_and_reused(dataset, split, tmp_path):
    teachers = _stub_teachers()
    ctx = _ctx(dataset, tmp_path, teachers=teachers)
    res = REGISTRY["teacher_features"](ctx).run(UV, split, seed=0)
    _check_result(res, UV, split, 2, dataset)
    calls = (teachers.sentence.calls, teachers.visual.embed_calls, teachers.describer.calls)
    assert calls[0] > 0 and calls[1] > 0
    assert teachers.describer.calls == int((dataset.poi_count > 0).sum())
    REGISTRY["teacher_features"](ctx).run(POP, split, seed=1)  # same process: memory
    common.clear_memory_cache()
    REGISTRY["teacher_features"](ctx).run(UV, split, seed=2)  # new process: disk
    assert (teachers.sentence.calls, teachers.visual.embed_calls, teachers.describer.calls) == calls
    assert len(list((tmp_path / common.FeatureCache.SUBDIR).glob("*.npz"))) == 1
    # another text source is another feature set
    REGISTRY["teacher_features"](_ctx(dataset, tmp_path, teachers=teachers, teacher_text="names")).run(UV, split, 0)
    assert teachers.sentence.calls > calls[0] and teachers.describer.calls == calls[2]
    assert len(list((tmp_path / common.FeatureCache.SUBDIR).glob("*.npz"))) == 2


def test_teacher_features_missing_modalities_are_zero_and_flagged(dataset, tmp_path):
    from training.finetune.baselines.features import compute_teacher_features

    f = compute_teacher_features(dataset, _stub_teachers())
    assert f["poi_valid"].tolist() == (dataset.poi_count > 0).tolist()
    assert f["image_valid"].tolist() == (dataset.image_coverage > 0).tolist()
    assert not f["u_P"][~f["poi_valid"]].any() and not f["u_S"][~f["image_valid"]].any()
    assert (np.abs(f["u_P"][f["poi_valid"]]).sum(1) > 0).all()


def test_teacher_features_regression_deterministic_and_learns(dataset, split, tmp_path):
    ctx = _ctx(dataset, tmp_path, teachers={"preset": "stub"})
    ctx.epochs = 15
    a = REGISTRY["teacher_features"](ctx).run(POP, split, seed=0)
    _check_result(a, POP, split, 15, dataset)
    b = REGISTRY["teacher_features"](ctx).run(POP, split, seed=0)
    np.testing.assert_array_equal(a.test_pred, b.test_pred)
    # the label is a function of the features: the MLP beats predicting the training mean
    y = dataset.labels["pop"]
    mean_rmse = np.sqrt(np.mean((y[split.test] - y[split.train].mean()) ** 2))
    assert np.sqrt(np.mean((y[split.test] - a.test_pred) ** 2)) < mean_rmse


@pytest.mark.teachers
@pytest.mark.slow
def test_bert_text_runs_and_is_deterministic(dataset, split, tmp_path):
    method = REGISTRY["bert_text"](_ctx(dataset, tmp_path, batch_size=8))
    a = method.run(UV, split, seed=0)
    _check_result(a, UV, split, 2, dataset)
    b = method.run(UV, split, seed=0)
    np.testing.assert_array_equal(a.test_pred, b.test_pred)


@pytest.mark.teachers
def test_text_encoder_grows_vocab_for_added_characters():
    from training.finetune.baselines.text import TextEncoder

    base = TextEncoder()
    n = base.bert.config.vocab_size
    grown = TextEncoder(vocab_size=n + 3)
    w = grown.bert.get_input_embeddings().weight
    assert w.shape[0] == n + 3
    torch.testing.assert_close(w[:n], base.bert.get_input_embeddings().weight)
    torch.testing.assert_close(w[n:], w[:n].mean(0).expand(3, -1))
    ids = torch.tensor([[101, n + 2, 102]])
    assert grown(ids, torch.ones_like(ids)).shape == (1, grown.hidden_size)


@pytest.mark.teachers
@pytest.mark.slow
def test_effnet_image_runs(dataset, split, tmp_path):
    res = REGISTRY["effnet_image"](_ctx(dataset, tmp_path, batch_size=8)).run(UV, split, seed=0)
    _check_result(res, UV, split, 2, dataset)


@pytest.mark.teachers
@pytest.mark.slow
def test_late_fusion_runs(dataset, split, tmp_path):
    res = REGISTRY["late_fusion"](_ctx(dataset, tmp_path, batch_size=8)).run(UV, split, seed=0)
    _check_result(res, UV, split, 2, dataset)


@pytest.mark.teachers
def test_teacher_features_with_real_teachers(dataset, split, tmp_path):
    res = REGISTRY["teacher_features"](_ctx(dataset, tmp_path)).run(UV, split, seed=0)
    _check_result(res, UV, split, 2, dataset)
    (npz,) = (tmp_path / common.FeatureCache.SUBDIR).glob("*.npz")
    with np.load(npz) as z:
        assert z["u_P"].shape == (N, 512) and z["u_S"].shape == (N, 1280)


class _FakeText(torch.nn.Module):
    hidden_size = 6

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 6)

    def forward(self, ids, mask):
        return self.emb(ids)[:, 0] + self.emb(ids).mean(1)


class _FakeImage(torch.nn.Module):
    hidden_size = 5

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 5)

    def forward(self, x, has_image):
        return self.lin(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("fusion", ["average", "attention"])
def test_late_fusion_ignores_the_missing_modality(fusion):
    from training.finetune.baselines.fusion import LateFusionModel

    torch.manual_seed(0)
    model = LateFusionModel(_FakeText(), _FakeImage(), 4, common.make_head(UV, 4, fusion=fusion)).eval()
    ids = torch.randint(1, 50, (3, 5))
    mask = torch.ones_like(ids)
    img = torch.randn(3, 3, 8, 8)
    has_pois = torch.tensor([True, False, True])
    has_image = torch.tensor([False, True, True])
    out = model(ids, mask, img, has_pois, has_image)
    out2 = model(torch.randint(1, 50, (3, 5)), mask, torch.randn(3, 3, 8, 8), has_pois, has_image)
    # row 0 sees only its text, row 1 only its image; row 2 sees both, so it changes with both
    assert not torch.allclose(out[0], out2[0]) and not torch.allclose(out[1], out2[1])
    out3 = model(ids, mask, torch.randn(3, 3, 8, 8), has_pois, has_image)
    torch.testing.assert_close(out3[0], out[0])
    assert not torch.allclose(out3[2], out[2])
    ids4 = ids.clone()
    ids4[1] = torch.randint(1, 50, (5,))
    torch.testing.assert_close(model(ids4, mask, img, has_pois, has_image)[1], out[1])
