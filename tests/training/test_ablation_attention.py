"""Ablation study (paper 5.2.2) and the POI -> image attention view (paper 5.2.3)."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from refound_core.errors import InputError
from training.finetune import ablation
from training.finetune.attention_view import attention_map, category_attention, load_for_view, select_sample

from tests.training.finetune_fixtures import make_checkpoint, make_dataset

ALL5 = {"dlfm", "dvfm", "dvlfm", "mgdm", "cmsa"}
# What each variant keeps, written from the paper's 5.2.2 list (not from the code under test).
PAPER = {
    "full": (ALL5, True),
    "no_moge": (ALL5, False),
    "no_dlfm": (ALL5 - {"dlfm"}, True),
    "no_dvfm": (ALL5 - {"dvfm"}, True),
    "no_dvlfm": (ALL5 - {"dvlfm"}, True),
    "no_dist": ({"mgdm", "cmsa"}, True),          # w/o Dist: all three distillations
    "no_mgdm": ({"dlfm", "dvfm", "dvlfm"}, True),  # CMSA relies on masked patches: dropped too
    "no_cmsa": (ALL5 - {"cmsa"}, True),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    ds = make_dataset(root / "ds")
    return ds, make_checkpoint(root / "ckpt", ds)


def _settings(pretrain_ds, data, out, **kw):
    base = dict(pretrain_data=str(pretrain_ds), data=str(data), out=str(out), steps=2, preset="tiny",
                variants=("full", "no_cmsa"), tasks=("population", "urban_village"), runs=1, epochs=2,
                device="cpu", pretrain_batch_size=8, warmup_steps=1, precision="fp32", workers=0)
    return ablation.AblationSettings(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- ablation
def test_each_variant_drops_exactly_what_the_paper_says(tmp_path):
    assert set(ablation.VARIANTS) == set(PAPER)
    for name, (objectives, moge) in PAPER.items():
        s = _settings("DS", "DS2", tmp_path, variants=(name,))
        cfg = ablation.variant_train_config(name, s, tmp_path / name)
        assert set(cfg.loss_config().active()) == objectives, name
        assert cfg.model.get("use_moge", True) is moge, name
        assert cfg.steps == 2 and cfg.seed == 0 and cfg.preset == "tiny"
    # everything but the variant's own flags is shared
    a = ablation.variant_train_config("full", _settings("DS", "D", tmp_path), tmp_path / "x").to_dict()
    b = ablation.variant_train_config("no_dist", _settings("DS", "D", tmp_path), tmp_path / "x").to_dict()
    assert [k for k in a if a[k] != b[k]] == ["losses"]
    with pytest.raises(InputError, match="unknown"):
        _settings("DS", "D", tmp_path, variants=("full", "no_everything")).validate()


def _count_train(monkeypatch):
    from training.pretrain import engine

    calls = []
    real = engine.train

    def counting(cfg, *, resume=False):
        calls.append(resume)
        return real(cfg, resume=resume)

    monkeypatch.setattr(engine, "train", counting)
    return calls


def test_finished_variant_is_reused_killed_one_resumed(tmp_path, pretrain_ds, tiny, monkeypatch, one_thread):
    ds, _ = tiny
    calls = _count_train(monkeypatch)
    s = _settings(pretrain_ds, ds.folder, tmp_path / "abl", save_every=1)
    first = ablation.ensure_pretrained("no_cmsa", s, log=lambda m: None)
    ckpt = tmp_path / "abl" / "checkpoints" / "no_cmsa"
    assert first["status"] == "trained" and calls == [False] and (ckpt / "model.safetensors").is_file()
    mtime = (ckpt / "model.safetensors").stat().st_mtime_ns

    again = ablation.ensure_pretrained("no_cmsa", s, log=lambda m: None)
    assert again["status"] == "reused" and calls == [False]
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == mtime

    # Settings that only change how, not what, is trained do not force a new run ...
    assert ablation.ensure_pretrained("no_cmsa", _settings(pretrain_ds, ds.folder, tmp_path / "abl", workers=1),
                                      log=lambda m: None)["status"] == "reused"
    # ... settings that change the checkpoint refuse to overwrite it
    with pytest.raises(InputError, match="steps"):
        ablation.ensure_pretrained("no_cmsa", _settings(pretrain_ds, ds.folder, tmp_path / "abl", steps=3))

    # a run killed before its final checkpoint (a state was saved): resumed, not restarted
    (ckpt / "config.json").unlink()
    (ckpt / "model.safetensors").unlink()
    resumed = ablation.ensure_pretrained("no_cmsa", s, log=lambda m: None)
    assert resumed["status"] == "resumed" and calls == [False, True]
    from refound_core.model.checkpoint import load_checkpoint
    assert load_checkpoint(ckpt).config.name == "refound_tiny"


def test_run_killed_before_any_state_is_restarted(tmp_path, pretrain_ds, tiny, monkeypatch, one_thread):
    ds, _ = tiny
    calls = _count_train(monkeypatch)
    run_dir = tmp_path / "abl" / "checkpoints" / "full" / "training"
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    res = ablation.ensure_pretrained("full", _settings(pretrain_ds, ds.folder, tmp_path / "abl", steps=1),
                                     log=lambda m: None)
    assert res["status"] == "trained" and calls == [False]
    assert (run_dir.parent / "config.json").is_file()


def test_ablate_end_to_end_two_variants(tmp_path, pretrain_ds, tiny, monkeypatch, one_thread):
    from training.commands import ablate as cmd

    ds, _ = tiny
    out = tmp_path / "abl"
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    argv = ["--pretrain-data", str(pretrain_ds), "--data", str(ds.folder), "--preset", "tiny", "--steps", "2",
            "--out", str(out), "--variants", "full,no_cmsa", "--tasks", "population,urban_village", "--runs", "1",
            "--epochs", "2", "--device", "cpu", "--pretrain-batch-size", "8", "--warmup-steps", "1",
            "--precision", "fp32", "--workers", "0"]
    assert cmd.run(p.parse_args(argv)) == 0

    report = json.loads((out / "ablation.json").read_text())
    assert list(report["variants"]) == ["full", "no_cmsa"]
    assert report["variants"]["no_cmsa"]["objectives"] == ["dlfm", "dvfm", "dvlfm", "mgdm"]
    assert report["tasks"]["population"]["primary"] == "RMSE" and report["tasks"]["urban_village"]["primary"] == "AUC"
    for v in ("full", "no_cmsa"):
        for t, key in (("population", "RMSE"), ("urban_village", "AUC")):
            m = report["variants"][v]["tasks"][t]["summary"][key]
            assert np.isfinite(m["mean"]) and m["std"] == 0.0  # one run
    md = (out / "ablation.md").read_text()
    assert "w/o CMSA" in md and "population RMSE ↓" in md and "urban_village AUC ↑" in md
    assert "test fixture" in md  # the downstream data's provenance is in the header
    full_rmse = report["variants"]["full"]["tasks"]["population"]["summary"]["RMSE"]["mean"]
    assert f"{full_rmse:.4g}" in md
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))

    # run again: nothing is pre-trained or evaluated a second time
    calls = _count_train(monkeypatch)
    from training.finetune import evaluate
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a, **k: pytest.fail("evaluation was not reused"))
    assert cmd.run(p.parse_args(argv)) == 0
    assert calls == []
    again = json.loads((out / "ablation.json").read_text())
    assert again["variants"]["full"]["pretraining"] == "reused" and again["variants"]["full"]["evaluation_reused"]


def test_ablate_checks_labels_before_pretraining(tmp_path, pretrain_ds, monkeypatch):
    from training.pretrain import engine

    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("pre-trained despite a bad task"))
    with pytest.raises(InputError, match="label column"):
        ablation.run_ablation(_settings(pretrain_ds, pretrain_ds, tmp_path / "o", tasks=("population",)),
                              log=lambda m: None)


# ---------------------------------------------------------------------------------------------- attention
def _region_with(ds, min_pois=3):
    for i in range(len(ds)):
        s = ds[i]
        if s.has_image and s.num_pois >= min_pois and len(set(s.poi_categories)) >= 2:
            return i, s
    raise AssertionError("fixture has no suitable region")


class _PlantedAttention(torch.nn.Module):
    """A stand-in backbone whose attention is planted: tokens of category ``target_id`` send half
    of head 0's attention to patch ``k0`` and half of head 1's to patch ``k1`` (the rest to the [P]
    CLS key); every other token attends uniformly. Only the category ids decide who is who."""

    def __init__(self, cfg, target_id, k0, k1):
        super().__init__()
        self.config, self.target_id, self.k0, self.k1 = cfg, target_id, k0, k1

    def forward_batch(self, batch, output_attentions_layer=None):
        from refound_core.model.refound import ReFoundOutput

        cats = batch["category_ids"][0]
        lp = cats.shape[0]
        total = lp + 1 + self.config.num_patches
        probs = torch.full((1, 2, total, total), 1.0 / total)
        for t in torch.nonzero(cats == self.target_id).flatten().tolist():
            probs[0, :, t] = 0.0
            probs[0, :, t, 0] = 0.5
            probs[0, 0, t, lp + 1 + self.k0] = 0.5
            probs[0, 1, t, lp + 1 + self.k1] = 0.5
        h = torch.zeros(1, total, 4)
        flag = torch.ones(1, dtype=torch.bool)
        return ReFoundOutput(hidden_states=h, poi_cls=h[:, 0], img_cls=h[:, lp], num_poi_tokens=lp,
                             has_pois=flag, has_image=flag, attentions=probs)


def test_map_picks_the_category_tokens_and_is_oriented_row_major(tiny):
    ds, ckpt = tiny
    model, feat = load_for_view(ckpt)
    _, sample = _region_with(ds)
    cat = sample.poi_categories[0]
    p = model.config.patches_per_side
    k0, k1 = 1 * p + 3, 2 * p + 0            # (row 1, col 3) and (row 2, col 0)
    fake = _PlantedAttention(model.config, feat.category_vocab.id_of(cat), k0, k1)
    view = category_attention(fake, feat, sample, cat)
    expected = np.zeros((p, p))
    expected[1, 3] = expected[2, 0] = 0.5   # one head each, averaged over 2 heads
    np.testing.assert_allclose(view.map, expected, atol=1e-7)
    n_cat = sum(c == cat for c in sample.poi_categories)
    assert len(view.poi_indices) == n_cat and view.num_heads == 2
    raw = category_attention(fake, feat, sample, cat, normalize="none")
    np.testing.assert_allclose(raw.map, expected / 2, atol=1e-7)   # half of each row went to the CLS key
    assert raw.patch_mass == pytest.approx(0.5)


def test_real_model_map_shape_and_normalisation(tiny):
    ds, ckpt = tiny
    model, feat = load_for_view(ckpt)
    index, sample = _region_with(ds)
    cat = sample.poi_categories[-1]
    p = model.config.patches_per_side
    amap = attention_map(model, feat, sample, cat)
    assert amap.shape == (p, p) and (amap >= 0).all()
    assert amap.sum() == pytest.approx(1.0, abs=1e-6)           # re-normalised over the patches
    raw = category_attention(model, feat, sample, cat, normalize="none")
    assert 0 < raw.map.sum() < 1 and raw.map.sum() == pytest.approx(raw.patch_mass, rel=1e-5)

    # independent recomputation: the model's own attention rows of the tokens carrying this category id
    enc = feat.encode(sample, np.random.default_rng(0))
    batch = feat.collate([enc], model.config.image_size)
    with torch.inference_mode():
        out = model.forward_batch(batch, output_attentions_layer=-1)
    rows = torch.nonzero(batch["category_ids"][0] == feat.category_vocab.id_of(cat)).flatten()
    lp = out.num_poi_tokens
    manual = out.attentions[0][:, rows, lp + 1:].mean(dim=(0, 1)).reshape(p, p).double().numpy()
    np.testing.assert_allclose(raw.map, manual, rtol=1e-5, atol=1e-8)
    first = attention_map(model, feat, sample, cat, layer=0)
    assert not np.allclose(first, amap)
    assert select_sample(ds, cell=sample.cell_id).cell_id == sample.cell_id == select_sample(ds, index=index).cell_id


def test_attention_view_bad_inputs_are_input_errors(tiny):
    ds, ckpt = tiny
    model, feat = load_for_view(ckpt)
    sample = next(ds[i] for i in range(len(ds)) if ds[i].has_image and ds[i].num_pois
                  and len(set(ds[i].poi_categories)) < 4)
    absent = next(c for c in ["eatery", "rental", "office", "park"] if c not in sample.poi_categories)
    with pytest.raises(InputError, match=f"no POI of category '{absent}'.*its categories are"):
        attention_map(model, feat, sample, absent)
    empty = dataclasses.replace(sample, poi_names=[], poi_categories=[], poi_xy=np.zeros((0, 2)))
    with pytest.raises(InputError, match="has no POIs"):
        attention_map(model, feat, empty, "eatery")
    no_image = next(ds[i] for i in range(len(ds)) if not ds[i].has_image and ds[i].num_pois)
    with pytest.raises(InputError, match="no satellite image"):
        attention_map(model, feat, no_image, no_image.poi_categories[0])
    with pytest.raises(InputError, match="layers"):
        attention_map(model, feat, sample, sample.poi_categories[0], layer=model.config.num_layers)
    with pytest.raises(InputError, match="not in the dataset"):
        select_sample(ds, cell="EPSG:32650/256/99_99")
    with pytest.raises(InputError, match="out of range"):
        select_sample(ds, index=len(ds))


def test_attention_view_command_writes_png(tiny, tmp_path):
    from training.commands import attention_view as cmd

    ds, ckpt = tiny
    index, sample = _region_with(ds)
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    out = tmp_path / "fig4.png"
    args = p.parse_args(["--checkpoint", str(ckpt), "--checkpoint", str(ckpt), "--label", "w/o CMSA", "--label",
                         "ReFound", "--data", str(ds.folder), "--index", str(index), "--category",
                         sample.poi_categories[0], "--out", str(out)])
    assert cmd.run(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] == ["fig4.png"]
