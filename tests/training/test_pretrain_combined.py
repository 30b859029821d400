"""Pre-training on several datasets at once (``refound pretrain --data A --data B``)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from refound_core.errors import InputError
from training.pretrain.data import PretrainData
from training.pretrain.engine import TrainConfig, train


def _image_only(folder: Path, codebook_from=None, n: int = 16, seed: int = 3) -> Path:
    """An image-only dataset (as `refound build-corpus` writes) with a stub-teacher cache; its visual
    tokens use ``codebook_from``'s codebook when given, else a codebook fitted on its own images."""
    from refound_core.data.dataset import RegionDataset, RegionDatasetWriter
    from refound_core.teachers.cache import TeacherCache
    from refound_core.teachers.stubs import stub_teachers
    from refound_core.teachers.tokenizer_vq import Codebook, KMeansTokenizer
    from tests.training.pretrain_fixtures import make_samples

    with RegionDatasetWriter(folder, crs="EPSG:32650", cell_size=256.0, image_size=64) as writer:
        for s in make_samples(n, 64, seed):
            if s.image is not None:
                writer.add(dataclasses.replace(s, poi_names=[], poi_categories=[], poi_xy=np.zeros((0, 2))))
    teachers = stub_teachers(codebook_size=8, seed=0)
    if codebook_from is not None:
        cache = next((Path(codebook_from) / "teacher_cache").iterdir())
        teachers = dataclasses.replace(teachers, tokenizer=KMeansTokenizer(
            teachers.visual, codebook=Codebook.load(cache / "codebook.safetensors")))
    TeacherCache(folder).get_or_compute(RegionDataset(folder), teachers, patches_per_side=4, progress=False)
    return folder


def _open(folder):
    return PretrainData.open(folder, 4, None, "centered")


def test_combined_corpus_indexes_every_part_with_its_own_targets(tmp_path, pretrain_ds):
    img = _image_only(tmp_path / "img", codebook_from=pretrain_ds)
    a, b = _open(pretrain_ds), _open(img)
    both = PretrainData.combine([a, b])
    assert len(both.dataset) == len(both.targets) == len(a.dataset) + len(b.dataset)
    n = len(a.dataset)
    for j in (0, len(b.dataset) - 1):
        assert both.dataset[n + j].cell_id == b.dataset[j].cell_id
        rows, own = both.targets.rows([n + j]), b.targets.rows([j])
        for key in own:
            np.testing.assert_array_equal(rows[key], own[key], err_msg=key)
    assert both.dataset[0].cell_id == a.dataset[0].cell_id
    mixed = both.targets.rows([1, n + 2, 0])
    assert mixed["u_S"].shape[0] == 3
    np.testing.assert_array_equal(mixed["u_S"][1], b.targets.rows([2])["u_S"][0])
    assert both.vocab_size == a.vocab_size and both.num_categories == a.num_categories  # the POI part's
    with pytest.raises(IndexError):
        both.dataset[len(both.dataset)]


def test_a_part_with_another_codebook_is_refused_with_the_fix(tmp_path, pretrain_ds):
    own = _image_only(tmp_path / "own")  # codebook fitted on its own images
    with pytest.raises(InputError, match="--codebook"):
        PretrainData.combine([_open(pretrain_ds), _open(own)])


def test_pretrain_on_two_datasets_trains_on_both_and_records_both(tmp_path, pretrain_ds, one_thread):
    img = _image_only(tmp_path / "img", codebook_from=pretrain_ds)
    out = tmp_path / "run"
    cfg = TrainConfig(data=[str(pretrain_ds), str(img)], out=str(out), preset="tiny", batch_size=8, lr=2e-3,
                      warmup_steps=1, save_every=0, device="cpu", precision="fp32", workers=0, log_every=1000,
                      tensorboard=False, steps=8, photometric_aug=0.5)
    result = train(cfg)
    assert result.steps == 8
    prov = json.loads((out / "provenance.json").read_text())
    parts = prov["training_data"]["parts"]
    assert [p["folder"] for p in parts] == [str(pretrain_ds.resolve()), str(img.resolve())]
    assert prov["training_data"]["regions"] == sum(p["regions"] for p in parts)
    assert len(prov["teachers"]["caches"]) == 2
    assert prov["pretraining"]["photometric_aug"] == 0.5
    from training.commands.doctor import checkpoint_report

    assert checkpoint_report(out)["training_data"] == f"{pretrain_ds.resolve()}, {img.resolve()}"
    with pytest.raises(InputError, match="one teacher cache per dataset"):
        TrainConfig(data=[str(pretrain_ds), str(img)], teachers=["x"]).teacher_folders()


def test_repeated_data_flag_parses_to_a_list_and_one_stays_a_string():
    import argparse

    from training.pretrain.options import add_arguments, resolve_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    two = resolve_config(p.parse_args(["--data", "A", "--data", "B", "--out", "o", "--steps", "1"]))
    one = resolve_config(p.parse_args(["--data", "A", "--out", "o", "--steps", "1"]))
    assert two["data"] == ["A", "B"] and one["data"] == "A"
