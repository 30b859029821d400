"""`refound convert-paddle`: .pdparams read without unpickling code, name/config mapping, errors."""
from __future__ import annotations

import argparse
import json
import os
import pickle

import numpy as np
import pytest
import torch

from refound_core.errors import InputError
from refound_core.model.checkpoint import load_checkpoint
from refound_core.model.convert_paddle import config_from_official, convert, read_paddle_weights
from training.commands import convert_paddle as cmd


@pytest.fixture(scope="module")
def fixture_weights(parity_dir):
    with np.load(parity_dir / "official_tiny_weights.npz") as z:
        return {k: z[k] for k in z.files}


def _state(path):
    return load_checkpoint(path).model.state_dict()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pdparams_equals_npz(tmp_path, parity_dir, fixture_weights, protocol):
    enc = {k: v for k, v in fixture_weights.items() if k.startswith("encoder.")}
    enc["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(enc)}  # as paddle.save writes it
    pd = tmp_path / "refound.pdparams"
    pd.write_bytes(pickle.dumps(enc, protocol=protocol))
    cfg = parity_dir / "official_tiny_config.json"
    convert(pd, cfg, tmp_path / "a")
    convert(parity_dir / "official_tiny_weights.npz", cfg, tmp_path / "b")
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_numpy2_pickles_are_accepted(tmp_path, fixture_weights):
    """numpy 2 writes ``numpy._core.multiarray``; the allow-list knows both spellings."""
    blob = pickle.dumps({"w": fixture_weights["encoder.img_embed_module.cls_token"]}, protocol=2)
    assert b"numpy.core.multiarray" in blob
    f = tmp_path / "n2.pdparams"
    f.write_bytes(blob.replace(b"numpy.core.multiarray", b"numpy._core.multiarray"))
    np.testing.assert_array_equal(read_paddle_weights(f)["w"], fixture_weights["encoder.img_embed_module.cls_token"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalLike:
    def __reduce__(self):  # the form paddle uses for LoDTensor: (eval, ('data', {...}))
        return (eval, ("1+1",))


class _CodecLike:
    def __reduce__(self):  # _codecs.encode is allowed for latin-1 only
        import codecs
        return (codecs.encode, ("x", "rot13"))


@pytest.mark.parametrize("make", [lambda m: _Evil(m), lambda m: _EvalLike(), lambda m: _CodecLike()])
def test_malicious_pdparams_is_refused_without_running_code(tmp_path, make):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pdparams"
    f.write_bytes(pickle.dumps({"encoder.x": np.zeros(2, np.float32), "y": make(marker)}, protocol=4))
    with pytest.raises(InputError, match="refusing"):
        read_paddle_weights(f)
    assert not marker.exists()


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_paddle_weights(tmp_path / "x.pdparams")
    (tmp_path / "w.pt").write_bytes(b"0")
    with pytest.raises(InputError, match="unknown weights format"):
        read_paddle_weights(tmp_path / "w.pt")
    (tmp_path / "t.pdparams").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="not a readable"):
        read_paddle_weights(tmp_path / "t.pdparams")


def test_official_full_config_maps_to_the_paper_shape(parity_dir):
    official = json.loads((parity_dir / "official_tiny_config.json").read_text())
    official.update(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    ps_layer_start_idx=10, vocab_size=21128, poi_cate_num=130)
    cfg = config_from_official(official)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (768, 12, 12, 3072)
    assert cfg.fusion_start == 10 and cfg.vocab_size == 21128 and cfg.num_categories == 130
    assert cfg.max_poi_tokens == cfg.max_word_pos == cfg.max_poi_pos == 512
    assert cfg.num_grid_ids == 258 and cfg.num_patches == 256 and cfg.layer_norm_eps == 1e-12
    del official["hidden_size"]
    with pytest.raises(InputError, match="hidden_size"):
        config_from_official(official)


def test_unknown_encoder_tensor_is_an_error(tmp_path, parity_dir, fixture_weights):
    w = dict(fixture_weights)
    w["encoder.transformer.layer.0.attention.selfattn.rotary.weight"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "w.npz", **w)
    with pytest.raises(InputError, match="does not know"):
        convert(tmp_path / "w.npz", parity_dir / "official_tiny_config.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_wrong_config_are_errors(tmp_path, parity_dir, fixture_weights):
    w = {k: v for k, v in fixture_weights.items() if "layer.2.ps_output" not in k}
    np.savez(tmp_path / "w.npz", **w)
    with pytest.raises(InputError, match="missing tensors"):
        convert(tmp_path / "w.npz", parity_dir / "official_tiny_config.json", tmp_path / "out")
    official = json.loads((parity_dir / "official_tiny_config.json").read_text())
    official["hidden_size"] = 32
    (tmp_path / "c.json").write_text(json.dumps(official))
    with pytest.raises(InputError, match="wrong shape"):
        convert(parity_dir / "official_tiny_weights.npz", tmp_path / "c.json", tmp_path / "out")


def test_head_conversion_and_plain_official_names(tmp_path, parity_dir, fixture_weights):
    """A real fine-tuned .pdparams has un-prefixed head names: same result as the fixture's pop:: ones."""
    w = {k: v for k, v in fixture_weights.items() if k.startswith("encoder.")}
    w.update({k[len("pop::"):]: v for k, v in fixture_weights.items() if k.startswith("pop::")})
    np.savez(tmp_path / "pop_ft.npz", **w)
    cfg = parity_dir / "official_tiny_config.json"
    convert(tmp_path / "pop_ft.npz", cfg, tmp_path / "a", task="pop", fusion="average")
    convert(parity_dir / "official_tiny_weights.npz", cfg, tmp_path / "b", task="pop", fusion="average")
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.head.pool is None and a.head.kind == "regression" and a.task["name"] == "population"
    sa, sb = a.head.state_dict(), b.head.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    backbone_only = {k: v for k, v in w.items() if k.startswith("encoder.")}
    np.savez(tmp_path / "pretrained.npz", **backbone_only)
    with pytest.raises(InputError, match="no fine-tuned head"):
        convert(tmp_path / "pretrained.npz", cfg, tmp_path / "c", task="uvd")
    # default fusion comes from the config's agg ('attn' in the fixture)
    convert(parity_dir / "official_tiny_weights.npz", cfg, tmp_path / "d", task="uvd")
    assert load_checkpoint(tmp_path / "d").head.fusion == "attention"


def test_cli_command(tmp_path, parity_dir, capsys):
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\n")
    argv = ["--weights", str(parity_dir / "official_tiny_weights.npz"), "--config",
            str(parity_dir / "official_tiny_config.json"), "--out", str(tmp_path / "ck"), "--task", "cap",
            "--tokenizer", str(tok)]
    assert cmd.run(parser.parse_args(argv)) == 0
    assert "commercial" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "ck")
    assert "tokenizer" in ck.files and ck.provenance["official_config"]["hidden_size"] == 64
    with pytest.raises(InputError, match="already exists"):
        cmd.run(parser.parse_args(argv))
    assert cmd.run(parser.parse_args(argv + ["--overwrite"])) == 0
