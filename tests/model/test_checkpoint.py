"""Checkpoint folders: bit-exact round trip, atomic writes, clear errors, no unpickling."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from refound_core.errors import CheckpointError
from refound_core.model.checkpoint import FORMAT_VERSION, load_checkpoint, load_codebook, save_checkpoint
from refound_core.model.heads import TaskHead


@pytest.fixture
def saved(tmp_path, tiny_model):
    torch.manual_seed(1)
    head = TaskHead(tiny_model.hidden_size, kind="multiclass", num_classes=3, fusion="attention", dropout=0.2)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n", encoding="utf-8")
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"PAD": 0, "UNK": 1, "food": 2}), encoding="utf-8")
    path = save_checkpoint(tmp_path / "ck", tiny_model, head, task={"name": "land_use", "kind": "multiclass"},
                           tokenizer_dir=tok, category_vocab=cats, codebook={"codebook": torch.randn(16, 8)},
                           extra_files={"notes/readme.txt": b"hello", "labels.json": {"a": 1}},
                           provenance={"training_data": "synthetic city seed 3", "teachers": ["none"]})
    return path, tiny_model, head


def test_round_trip_is_bit_exact(saved, make_batch):
    path, model, head = saved
    ck = load_checkpoint(path)
    for a, b in ((model, ck.model), (head, ck.head)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ck.config == model.config and ck.head.spec() == head.spec()
    batch = make_batch(model.config)
    with torch.no_grad():
        a, b = model.eval().forward_batch(batch), ck.model.eval().forward_batch(batch)
        assert torch.equal(a.hidden_states, b.hidden_states)
        assert torch.equal(head.eval()(a), ck.head.eval()(b))


def test_folder_contents_and_metadata(saved):
    path, model, _ = saved
    meta = json.loads((path / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["model"]["hidden_size"] == model.config.hidden_size
    ck = load_checkpoint(path)
    assert ck.task == {"name": "land_use", "kind": "multiclass"}
    assert (path / ck.files["tokenizer"]).joinpath("vocab.txt").read_text().startswith("[PAD]")
    assert json.loads(open(ck.files["category_vocab"]).read())["food"] == 2
    assert open(ck.files["notes/readme.txt"], "rb").read() == b"hello"
    assert json.loads(open(ck.files["labels.json"]).read()) == {"a": 1}
    assert load_codebook(path)["codebook"].shape == (16, 8)
    prov = ck.provenance
    assert prov["training_data"] == "synthetic city seed 3" and prov["teachers"] == ["none"]
    assert prov["date"] and "git_revision" in prov and prov["refound_version"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".ck.")]  # no temp leftovers


def test_backbone_only_checkpoint(tmp_path, tiny_model):
    save_checkpoint(tmp_path / "bb", tiny_model)
    ck = load_checkpoint(tmp_path / "bb")
    assert ck.head is None and not (tmp_path / "bb" / "head.safetensors").exists()


def test_existing_folder_needs_overwrite(saved, tiny_model):
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(path, tiny_model)
    save_checkpoint(path, tiny_model, overwrite=True)
    assert load_checkpoint(path).head is None


def test_failed_save_leaves_no_partial_folder(tmp_path, tiny_model):
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "bad", tiny_model, tokenizer_dir=tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    path, _, _ = saved
    (path / "head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="head.safetensors is missing"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(path)


def test_paddle_file_is_pointed_to_convert_paddle(tmp_path):
    f = tmp_path / "model.pdparams"
    f.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="convert-paddle"):
        load_checkpoint(f)


@pytest.mark.parametrize("version,hint", [(2, "upgrade refound"), (0, "convert-paddle")])
def test_wrong_format_version(saved, version, hint):
    path, _, _ = saved
    meta = json.loads((path / "config.json").read_text())
    meta.update(format_version=version, refound_version="9.9.9")
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"format_version {version}.*written by refound 9\.9\.9.*{hint}"):
        load_checkpoint(path)


def test_wrong_shape_is_named(saved):
    path, _, _ = saved
    state = load_file(str(path / "model.safetensors"))
    state["embeddings.poi.word_embed.weight"] = state["embeddings.poi.word_embed.weight"][:10].clone()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"wrong shape.*word_embed.weight: file \(10, 64\)"):
        load_checkpoint(path)


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle
    path, _, _ = saved

    def refuse(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_checkpoint(path).model is not None


def test_codebook_from_a_safetensors_file(tmp_path, tiny_model):
    book = {"codebook": torch.arange(12.0).view(4, 3)}
    save_file(book, str(tmp_path / "book.safetensors"))
    save_checkpoint(tmp_path / "ck", tiny_model, codebook=tmp_path / "book.safetensors")
    assert torch.equal(load_codebook(tmp_path / "ck")["codebook"], book["codebook"])
    with pytest.raises(CheckpointError, match="codebook"):
        save_checkpoint(tmp_path / "ck2", tiny_model, codebook=tmp_path / "missing.pt")
