"""The pre-training engine: schedule, optimizer groups, config precedence, an end-to-end tiny run,
non-finite handling and plot-log."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from refound_core.errors import InputError
from training.commands import pretrain as pretrain_cmd
from training.pretrain.engine import (NonFiniteLossError, TrainConfig, lr_at, param_groups, train)
from training.pretrain.logging import read_log

TERMS = ("loss", "dlfm", "dvfm", "dvlfm", "mgdm", "mgdm_poi", "mgdm_img", "cmsa")


def test_lr_schedule_linear_warmup_then_linear_decay():
    peak, warm, total = 1.0, 4, 12
    lrs = [lr_at(s, peak, warm, total) for s in range(total)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0  # (12 - 4) / 8
    assert lrs[8] == pytest.approx(0.5)
    assert lrs[11] == pytest.approx(1 / 8)
    assert lr_at(total, peak, warm, total) == 0.0
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from refound_core.losses import LossConfig, PretrainHeads
    from refound_core.model.config import refound_tiny
    from refound_core.model.refound import ReFound
    from training.pretrain.engine import PretrainModule

    cfg = refound_tiny(vocab_size=50, num_categories=5)
    module = PretrainModule(ReFound(cfg), PretrainHeads(cfg, LossConfig(), llm_dim=3, vfm_dim=3, codebook_size=4),
                            LossConfig())
    groups = param_groups(module, 0.01)
    names = {id(p): n for n, p in module.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert "backbone.embeddings.poi.word_embed.weight" in no_decay
    assert "backbone.embeddings.poi.grid_pos_embed.weight" in no_decay
    assert "backbone.embeddings.image.pos_embed" in no_decay
    assert "backbone.embeddings.image.cls_token" in no_decay
    assert not any(n.endswith(".bias") or ".norm." in n for n in decay)
    assert "backbone.encoder.layers.0.attn.qkv.weight" in decay
    assert "heads.mgdm_poi.fc1.weight" in decay
    assert [g["weight_decay"] for g in groups if g["weight_decay"] > 0] == [0.01]


def _parse(argv):
    p = argparse.ArgumentParser()
    pretrain_cmd.add_arguments(p)
    return p.parse_args(argv)


def test_config_precedence_defaults_file_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.001\nbatch_size: 4\nepochs: 3\nlosses:\n  temperature: 0.1\nmodel:\n  hidden_dropout: 0.0\n")
    d = pretrain_cmd.resolve_config(_parse(["--config", str(cfg_file), "--lr", "0.002", "--steps", "7",
                                            "--no-dist", "--no-moge", "--data", "DS", "--out", "O"]))
    assert d["lr"] == 0.002                  # flag beats file
    assert d["batch_size"] == 4              # file beats default
    assert d["weight_decay"] == 0.01         # default (paper A.2.1)
    assert d["steps"] == 7 and d["epochs"] is None   # the flag's run length replaces the file's
    assert d["losses"]["temperature"] == 0.1
    assert (d["losses"]["dlfm"], d["losses"]["dvfm"], d["losses"]["dvlfm"]) == (False, False, False)
    assert d["losses"]["mgdm"] and d["losses"]["cmsa"]
    assert d["model"] == {"hidden_dropout": 0.0, "use_moge": False}
    cfg = TrainConfig.from_dict(d)
    assert cfg.loss_config().active() == ("mgdm", "cmsa")
    d = pretrain_cmd.resolve_config(_parse(["--no-mgdm", "--epochs", "2"]))
    assert not d["losses"]["mgdm"] and not d["losses"]["cmsa"] and d["losses"]["dlfm"]
    assert d["init"] is None and pretrain_cmd.resolve_config(_parse(["--init", "CK", "--steps", "1"]))["init"] == "CK"
    d = pretrain_cmd.resolve_config(_parse(["--dvfm-patch-weight", "0.5", "--steps", "1"]))
    assert d["losses"]["w_dvfm_patch"] == 0.5 and d["losses"]["dvfm"]
    assert "dvfm_patch" in TrainConfig.from_dict(d).loss_config().active()
    with pytest.raises(InputError, match="--dvfm-patch-weight"):
        pretrain_cmd.resolve_config(_parse(["--dvfm-patch-weight", "-1", "--steps", "1"]))


def test_bad_settings_are_input_errors(tmp_path, pretrain_ds):
    with pytest.raises(InputError, match="--steps N or --epochs N"):
        train(TrainConfig(data=str(pretrain_ds), out=str(tmp_path / "o"), preset="tiny"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        train(TrainConfig(data=str(pretrain_ds), out=str(tmp_path / "full"), preset="tiny", steps=1, device="cpu"))
    with pytest.raises(InputError, match="no training state"):
        train(TrainConfig(data=str(pretrain_ds), out=str(tmp_path / "new"), preset="tiny", steps=1, device="cpu"),
              resume=True)
    with pytest.raises(InputError, match="fewer than one optimizer step"):
        train(TrainConfig(data=str(pretrain_ds), out=str(tmp_path / "big"), preset="tiny", steps=1, batch_size=64,
                          device="cpu"))


def _small(ds, out, **kw):
    base = dict(data=str(ds), out=str(out), preset="tiny", batch_size=8, lr=2e-3, warmup_steps=3, save_every=0,
                device="cpu", precision="fp32", workers=0, log_every=1000, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def test_tiny_run_logs_every_term_and_every_term_falls(tmp_path, pretrain_ds, one_thread):
    from refound_core.model.checkpoint import load_checkpoint, load_codebook
    from refound_core.teachers.cache import TeacherTargets
    from training.pretrain.plot import plot_log

    out = tmp_path / "run"
    steps = 40
    result = train(_small(pretrain_ds, out, steps=steps, workers=1, save_every=20))
    assert result.steps == steps and result.skipped == 0

    rows = read_log(out / "training")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    header = (out / "training" / "log.csv").read_text().splitlines()[0].split(",")
    for term in TERMS + ("mgdm_poi_acc", "cmsa_acc", "lr", "regions_per_s", "data_wait", "grad_norm"):
        assert term in header and all(term in r for r in rows), term
    for term in TERMS:
        v = np.array([r[term] for r in rows])
        assert np.isfinite(v).all()
        first, last = v[:8].mean(), v[-8:].mean()
        assert last < first, f"{term} did not fall: {first:.4f} -> {last:.4f}"

    ckpt = load_checkpoint(out)  # the final checkpoint, next to training/
    assert ckpt.config.name == "refound_tiny" and set(ckpt.files) >= {"tokenizer", "category_vocab", "codebook"}
    targets = TeacherTargets.open(next((pretrain_ds / "teacher_cache").iterdir()))
    np.testing.assert_array_equal(load_codebook(out)["centroids"].numpy(), targets.codebook.centroids)
    resolved = json.loads((out / "training" / "pretrain_config.json").read_text())
    assert resolved["resolved"]["total_steps"] == steps and resolved["resolved"]["objectives"] == [
        "dlfm", "dvfm", "dvlfm", "mgdm", "cmsa"]
    assert sorted(p.name for p in (out / "training" / "state").glob("step-*")) == ["step-00000020", "step-00000040"]

    png = plot_log(out, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="already holds a pre-training run"):
        train(_small(pretrain_ds, out, steps=1))


def test_non_finite_loss_skips_steps_then_stops(tmp_path, pretrain_ds, one_thread):
    cfg = _small(pretrain_ds, tmp_path / "nan", steps=10, max_nonfinite=3,
                 losses={"w_dlfm": float("nan"), "dvlfm": False, "mgdm": False})
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(cfg)
    rows = read_log(tmp_path / "nan" / "training")
    assert [r["skipped"] for r in rows] == [1, 1, 1]
    assert all(math.isnan(r["loss"]) for r in rows)


def test_ablation_run_has_no_masking_and_no_dropped_terms(tmp_path, pretrain_ds, one_thread):
    train(_small(pretrain_ds, tmp_path / "abl", steps=2, losses={"mgdm": False, "dvlfm": False},
                 model={"use_moge": False}))
    rows = read_log(tmp_path / "abl" / "training")
    assert {"dlfm", "dvfm"} <= set(rows[0]) and not {"mgdm", "cmsa", "dvlfm"} & set(rows[0])
    resolved = json.loads((tmp_path / "abl" / "training" / "pretrain_config.json").read_text())
    assert resolved["resolved"]["model"]["use_moge"] is False


def test_dense_dvfm_term_trains_the_patches_and_needs_patch_features(tmp_path, pretrain_ds, one_thread):
    import shutil

    train(_small(pretrain_ds, tmp_path / "dense", steps=30, losses={"w_dvfm_patch": 1.0}))
    rows = read_log(tmp_path / "dense" / "training")
    cos = np.array([r["dvfm_patch_cos"] for r in rows])
    assert np.isfinite(cos).all() and cos[-8:].mean() > cos[:8].mean() + 0.05
    resolved = json.loads((tmp_path / "dense" / "training" / "pretrain_config.json").read_text())
    assert resolved["resolved"]["objectives"] == ["dlfm", "dvfm", "dvfm_patch", "dvlfm", "mgdm", "cmsa"]
    # A cache written before the patch features were kept (format 1) gets one actionable error.
    src = next(p for p in (pretrain_ds / "teacher_cache").iterdir() if not p.name.startswith("."))
    old = tmp_path / "old_cache"
    shutil.copytree(src, old)
    (old / "patch_features.npy").unlink()
    meta = json.loads((old / "meta.json").read_text())
    meta.update(format=1, patch_features=False)
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="run `refound teachers` again"):
        train(_small(pretrain_ds, tmp_path / "dense_old", steps=1, teachers=str(old), losses={"w_dvfm_patch": 1.0}))
    train(_small(pretrain_ds, tmp_path / "paper_old", steps=1, teachers=str(old)))  # the paper's objective reads it


def test_plot_log_command_errors_without_log(tmp_path):
    from training.commands import plot_log as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    with pytest.raises(InputError, match="no log.jsonl"):
        cmd.run(p.parse_args([str(tmp_path), "--out", str(tmp_path / "x.png")]))


def test_masked_batch_keeps_geo_positions(pretrain_ds):
    """Masking changes token ids only: word / POI / grid positions and categories are untouched."""
    from refound_core.losses import LossConfig
    from refound_core.model.config import preset
    from training.pretrain.data import PretrainCollator, PretrainData, PretrainDataset

    mcfg = preset("tiny")
    data = PretrainData.open(pretrain_ds, mcfg.patches_per_side)
    mcfg = mcfg.replace(vocab_size=data.vocab_size, num_categories=data.num_categories)
    fz = data.featurizer(mcfg)
    ds = PretrainDataset(data, fz, seed=0)
    items = [ds[i] for i in range(16)]
    plain = PretrainCollator(fz, 64, 4, LossConfig(mgdm=False), vocab_size=mcfg.vocab_size)(items)
    masked = PretrainCollator(fz, 64, 4, LossConfig(poi_mask_ratio=0.5), vocab_size=mcfg.vocab_size)(items)
    assert "mlm_mask" not in plain and "masked_patches" not in plain
    for key in ("word_pos", "poi_pos", "grid_pos", "category_ids", "poi_mask", "image"):
        assert torch.equal(plain[key], masked[key]), key
    assert torch.equal(masked["mlm_labels"], plain["token_ids"])
    assert masked["mlm_mask"].any() and not torch.equal(masked["token_ids"], plain["token_ids"])
    assert torch.equal(masked["token_ids"][~masked["mlm_mask"]], plain["token_ids"][~masked["mlm_mask"]])
    no_image = ~masked["has_image"]
    assert no_image.any() and not masked["masked_patches"][no_image].any()
    assert not masked["visual_tokens_valid"][no_image].any()


def test_init_continues_from_a_checkpoint_with_its_vocabulary(tmp_path, pretrain_ds, one_thread):
    """--init: the run starts from the checkpoint's backbone and keeps its tokenizer and category
    vocabulary (another dataset's ids would scramble the trained embeddings), and says so."""
    from safetensors.torch import load_file

    from refound_core.model.checkpoint import load_checkpoint
    from tests.training.pretrain_fixtures import build_dataset

    other = build_dataset(tmp_path / "other", n=16, seed=5)
    first = tmp_path / "first"
    train(_small(pretrain_ds, first, steps=2))
    tiny_lr = 1e-12  # AdamW moves each weight by about lr: far below the tolerance below
    cont = tmp_path / "cont"
    train(_small(other, cont, steps=1, lr=tiny_lr, warmup_steps=0, init=str(first), preset="base"))
    scratch = tmp_path / "scratch"
    train(_small(other, scratch, steps=1, lr=tiny_lr, warmup_steps=0, seed=7))

    a, b, c = (load_file(str(p / "model.safetensors")) for p in (first, cont, scratch))
    assert load_checkpoint(cont).config.name == "refound_tiny"  # the checkpoint's architecture, not --preset
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert any(not torch.allclose(c[k], a[k], atol=1e-3) for k in a if c[k].shape == a[k].shape)
    for name in (p.name for p in (first / "tokenizer").iterdir()):
        assert (cont / "tokenizer" / name).read_bytes() == (first / "tokenizer" / name).read_bytes()
    assert (cont / "category_vocab.json").read_bytes() == (first / "category_vocab.json").read_bytes()
    prov = json.loads((cont / "provenance.json").read_text())
    assert prov["pretraining"]["init"]["checkpoint"] == str(first.resolve())
    assert prov["training_data"]["folder"] == str(other.resolve())

    with pytest.raises(InputError, match="not a loadable ReFound checkpoint"):
        train(_small(other, tmp_path / "bad", steps=1, init=str(tmp_path / "missing")))
    with pytest.raises(InputError, match="architecture comes from the checkpoint"):
        train(_small(other, tmp_path / "bad2", steps=1, init=str(first), model={"use_moge": False}))
