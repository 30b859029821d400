"""The paper's teachers plug in from local folders: CLIP / CN-CLIP image encoders, sentence-transformers
folders (M3E-base), local causal LMs. Tested with tiny random models written to a temp folder."""
import json

import numpy as np
import pytest

from refound_core.teachers import TeacherCache, build_teachers


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    cfg = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 50},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=12)
    import torch
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    return folder


def test_clip_folder_as_visual_and_vl_teacher(tiny_clip, tmp_path, samples):
    t = build_teachers({"visual": f"clip:{tiny_clip}", "sentence": "stub", "describer": "template", "codebook_size": 4})
    assert t.vl_is_visual  # paper: CN-CLIP's image encoder for DVFM and DVLFM
    images = [s.image for s in samples if s.has_image][:3]
    emb = t.visual.embed_images(images)
    assert emb.shape == (3, 12) and t.visual.dim == 12 and t.visual.image_size == 32
    np.testing.assert_allclose(emb, t.visual.embed_images(images), rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    feats = t.visual.patch_features(images, 2)  # 4x4 ViT patches pooled to the 2x2 model grid
    assert feats.shape == (3, 4, 16) and t.visual.feature_dim == 16
    up = t.visual.patch_features(images, 8)  # finer grid than the ViT's: interpolated
    assert up.shape == (3, 64, 16)
    out = TeacherCache(tmp_path).get_or_compute(samples, t, 2, progress=False)
    assert out.u_S.shape == (len(samples), 12) and out.v_S is out.u_S
    assert "clip-image(transformers" in out.meta["key"]["teachers"]["visual"]


def test_sentence_transformers_folder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cafe", "bank", "school", "a", "the", "区", "域"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    import torch
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    t = build_teachers({"sentence": f"hf:{tmp_path}", "visual": "stub"})
    emb = t.sentence.embed_texts(["a cafe", "the bank school", "区域"])
    assert emb.shape == (3, 8) and t.sentence.max_chunk_chars == 30
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    before = t.sentence.identity()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert build_teachers({"sentence": f"hf:{tmp_path}", "visual": "stub"}).sentence.identity() != before


def test_local_causal_lm_describer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["facilities in the region", "区域中有下列设施"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path)
    import torch
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=1024, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(tmp_path)
    t = build_teachers({"describer": f"llm:{tmp_path}", "max_new_tokens": 6, "preset": "stub"})
    text = t.describer.describe(["Cafe A", "Bank B"], ["food", "finance"])
    assert isinstance(text, str) and text  # greedy decoding of a random model: some text
    assert text == t.describer.describe(["Cafe A", "Bank B"], ["food", "finance"])
    assert t.describer.describe([], []) == ""
    assert "max_new_tokens=6" in t.describer.identity()
