"""Featurisation (paper 4.1.1, A.2.1) and batching; parity with the official loader (SEMANTICS.md 2)."""
import json
import time

import numpy as np
import pytest

from refound_core.data.featurize import Featurizer, collate, length_bucketed_batches
from refound_core.data.sample import RegionSample
from refound_core.data.vocab import CategoryVocab
from refound_core.errors import InputError

OFFICIAL_ARRAYS = {  # ours -> official name in official_tiny_inputs.npz
    "token_ids": "poi_name_token_ids",
    "poi_mask": "attn_mask_poi",
    "word_pos": "word_level_pos_ids",
    "poi_pos": "poi_level_pos_ids",
    "grid_pos": "grid_level_pos_ids",
    "category_ids": "poi_cate_ids",
}


class CharMapTokenizer:
    """Test-only stand-in of SEMANTICS.md 2.3: every non-space char of the lower-cased name -> one id."""

    def __init__(self, char2id, special_ids):
        self.char2id = dict(char2id)
        self.unk = special_ids["unk"]
        self.cls_id, self.sep_id, self.pad_id = special_ids["cls"], special_ids["sep"], special_ids["pad"]

    def encode_names(self, names):
        return [[self.char2id.get(c, self.unk) for c in n.lower() if not c.isspace()] for n in names]


@pytest.fixture(scope="module")
def raw(parity_dir):
    return json.loads((parity_dir / "official_tiny_raw_regions.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def official_inputs(parity_dir):
    return dict(np.load(parity_dir / "official_tiny_inputs.npz"))


def _sample_from_official(region, image=None):
    x_min, y_max, x_max, y_min = region["coord"]  # SEMANTICS.md 2.1: left, top, right, bottom
    pois = region["pois"] or []
    return RegionSample(
        cell_id=region["id"], bounds=(x_min, y_min, x_max, y_max), crs="EPSG:4326",
        poi_names=[p[0] for p in pois], poi_categories=[p[2] for p in pois],
        poi_xy=np.array([[p[3], p[4]] for p in pois], dtype=np.float64).reshape(-1, 2),
        image=image, image_coverage=1.0 if image is not None else 0.0)


def _official_featurizer(raw, **kw):
    tok = CharMapTokenizer(raw["char2id"], raw["special_ids"])
    return Featurizer(tok, category_vocab=None, max_poi_tokens=512, grid_cells=16, truncation="official",
                      order="given", category_pad_id=raw["pad_cate_id"], **kw)


def test_reproduces_official_inputs_exactly(raw, official_inputs):
    from refound_core.model.config import OFFICIAL_IMAGE_MEAN, OFFICIAL_IMAGE_STD
    img = official_inputs["img"]
    mean = np.array(OFFICIAL_IMAGE_MEAN, np.float32)[:, None, None]
    std = np.array(OFFICIAL_IMAGE_STD, np.float32)[:, None, None]
    pixels = np.rint((img * std + mean) * 255).astype(np.uint8)  # CHW, as documented in SEMANTICS.md 1
    feat = _official_featurizer(raw)
    rng = np.random.default_rng(0)
    encoded = [feat.encode(_sample_from_official(r, pixels[i].transpose(1, 2, 0)), rng)
               for i, r in enumerate(raw["regions"])]
    batch = feat.collate(encoded, image_size=256, pad_to_length=512)
    for ours, theirs in OFFICIAL_ARRAYS.items():
        got = batch[ours].numpy().astype(np.int64)
        want = official_inputs[theirs]
        assert got.shape == want.shape, ours
        bad = np.argwhere(got != want)
        assert bad.size == 0, f"{ours}: first mismatches at {bad[:5].tolist()}"
    assert batch["token_ids"].dtype.is_floating_point is False
    assert (batch["image"].numpy() == pixels).all()
    # what the fixture exercises (SEMANTICS.md 5): kept POIs and valid tokens per region
    assert [e.num_pois for e in encoded] == [0, 86, 9, 104]
    assert batch["poi_mask"].sum(1).tolist() == [1, 511, 60, 512]
    assert batch["has_pois"].tolist() == [False, True, True, True]
    # the default pad-to-multiple batch is 512 wide here too and equal
    again = feat.collate(encoded, image_size=256)
    assert again["token_ids"].shape[1] == 512 and (again["grid_pos"] == batch["grid_pos"]).all()


def _worked_example_samples():
    """SEMANTICS.md 2.4 scaled to a 16 m x 16 m region, so its 1 m Z-order units are the grid cells."""
    names = {"A": "咖啡馆", "B": "银行", "C": "学校"}
    frac = {"A": (0.10, 0.95), "B": (0.80, 0.90), "C": (0.12, 0.10)}
    cats = {"A": 5, "B": 2, "C": 7}
    return names, {k: (16 * x, 16 * y) for k, (x, y) in frac.items()}, cats


def test_worked_example_zorder_sequence():
    names, xy, cats = _worked_example_samples()
    char2id = {"咖": 1500, "啡": 1501, "馆": 1502, "银": 2000, "行": 2001, "学": 3000, "校": 3001}
    tok = CharMapTokenizer(char2id, {"unk": 100, "cls": 101, "sep": 102, "pad": 0})
    feat = Featurizer(tok, None, max_poi_tokens=512, truncation="official", category_pad_id=129)
    pad = 512 - 11
    want = {
        "token_ids": [101, 1500, 1501, 1502, 102, 2000, 2001, 102, 3000, 3001, 102] + [0] * pad,
        "poi_mask": [1] * 11 + [0] * pad,
        "word_pos": [0, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2] + list(range(pad)),
        "poi_pos": [0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3] + [4] * pad,
        "grid_pos": [0, 2, 2, 2, 2, 29, 29, 29, 226, 226, 226] + [257] * pad,
        "category_ids": [129, 5, 5, 5, 5, 2, 2, 2, 7, 7, 7] + [129] * pad,
    }
    for order in ("CBA", "BCA", "ABC"):  # input order must not matter: Z-order decides
        s = RegionSample("ex", (0.0, 0.0, 16.0, 16.0), "EPSG:3857", poi_names=[names[k] for k in order],
                         poi_categories=[cats[k] for k in order], poi_xy=np.array([xy[k] for k in order]))
        batch = feat.collate([feat.encode(s, np.random.default_rng(1))], image_size=8, pad_to_length=512)
        for key, values in want.items():
            expected = [bool(v) for v in values] if key == "poi_mask" else values
            assert batch[key][0].tolist() == expected, (order, key)


@pytest.mark.parametrize("pois", [None, []])
def test_region_without_pois_is_cls_only(raw, pois):
    region = {"id": "empty", "coord": [0.0, 1.0, 1.0, 0.0], "pois": pois}
    feat = _official_featurizer(raw)
    enc = feat.encode(_sample_from_official(region), np.random.default_rng(0))
    assert enc.token_ids.tolist() == [101] and enc.num_pois == 0 and not enc.has_pois
    assert (enc.word_pos.tolist(), enc.poi_pos.tolist(), enc.grid_pos.tolist()) == ([0], [0], [0])
    assert enc.category_ids.tolist() == [raw["pad_cate_id"]]
    b = feat.collate([enc], image_size=4, pad_to_length=512)
    # SEMANTICS.md 2.2 step 4
    assert b["token_ids"][0].tolist() == [101] + [0] * 511
    assert b["word_pos"][0].tolist() == [0, 0] + list(range(1, 511))
    assert b["poi_pos"][0].tolist() == [0] + [1] * 511
    assert b["grid_pos"][0].tolist() == [0] + [257] * 511
    assert b["poi_mask"][0].tolist() == [True] + [False] * 511
    assert not b["has_image"][0] and b["image"].abs().sum() == 0


# --- synthetic regions with the real tokenizer ----------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from refound_core.data.tokenizer import PoiTokenizer
    return PoiTokenizer.default()


WORDS = ["cafe", "bank", "school", "hospital", "park", "station", "market", "hotel", "noodle", "bakery",
         "central", "west", "north", "international", "bookstore", "pharmacy", "咖啡", "银行", "学校"]


def _random_region(n, rng, size=256.0, distinct_units=True, origin=(500_000.0, 4_400_000.0)):
    x0, y0 = origin
    if distinct_units:  # one POI per 1 m unit: no Z-order ties
        cells = rng.choice(int(size) * int(size), size=n, replace=False)
        local = np.column_stack([cells % int(size), cells // int(size)]) + rng.uniform(0.05, 0.95, (n, 2))
    else:
        local = rng.uniform(0, size, (n, 2))
    pool = [" ".join(rng.choice(WORDS, int(m))) for m in rng.integers(1, 5, min(n, 500))]
    names = [pool[i] for i in rng.integers(0, len(pool), n)]
    labels = [f"cat{c}" for c in range(12)]
    cats = [labels[i] for i in rng.integers(0, 12, n)]
    xy = np.column_stack([x0 + local[:, 0], y0 + size - local[:, 1]])
    return RegionSample("r", (x0, y0, x0 + size, y0 + size), "EPSG:32650", poi_names=names,
                        poi_categories=cats, poi_xy=xy)


def _arrays(enc):
    return [enc.token_ids, enc.word_pos, enc.poi_pos, enc.grid_pos, enc.category_ids]


def _poi_spans(enc, sep_id=102):
    """Split an encoded sequence into POIs: list of (token ids without SEP, grid, category)."""
    out, start = [], 1
    for end in np.flatnonzero(enc.token_ids == sep_id):
        out.append((enc.token_ids[start:end].tolist(), int(enc.grid_pos[end]), int(enc.category_ids[end])))
        start = end + 1
    return out


@pytest.mark.parametrize("truncation", ["random", "official"])
def test_output_invariant_to_input_order(tokenizer, truncation):
    rng = np.random.default_rng(3)
    s = _random_region(150, rng)
    vocab = CategoryVocab.build(s.poi_categories)
    feat = Featurizer(tokenizer, vocab, max_poi_tokens=96, truncation=truncation)
    ref = feat.encode(s, np.random.default_rng(11))
    assert ref.num_pois < 150  # the limit bites, so truncation is part of what is compared
    perm = rng.permutation(150)
    shuffled = RegionSample("r", s.bounds, s.crs, [s.poi_names[i] for i in perm],
                            [s.poi_categories[i] for i in perm], s.poi_xy[perm])
    got = feat.encode(shuffled, np.random.default_rng(11))
    for a, b in zip(_arrays(ref), _arrays(got)):
        np.testing.assert_array_equal(a, b)


def test_sequence_is_zordered_and_fields_consistent(tokenizer):
    rng = np.random.default_rng(5)
    s = _random_region(40, rng)
    vocab = CategoryVocab.build(s.poi_categories)
    feat = Featurizer(tokenizer, vocab)
    enc = feat.encode(s, np.random.default_rng(0))
    assert enc.num_pois == 40 and enc.num_tokens <= 512
    spans = _poi_spans(enc)
    # recover which input POI each span is (names may repeat, so match on (tokens, grid, category))
    xmin, ymin, xmax, ymax = s.bounds
    toks = tokenizer.encode_names(s.poi_names)
    gx = np.minimum((16 * (s.poi_xy[:, 0] - xmin) / (xmax - xmin)).astype(int), 15)
    gy = np.minimum((16 * (ymax - s.poi_xy[:, 1]) / (ymax - ymin)).astype(int), 15)
    keys = [(toks[i], int(16 * gy[i] + gx[i] + 1), int(vocab.id_of(s.poi_categories[i]))) for i in range(40)]
    col = np.floor(s.poi_xy[:, 0] - xmin).astype(np.int64)
    row = np.floor(ymax - s.poi_xy[:, 1]).astype(np.int64)
    z = [sum((((c >> b) & 1) << (2 * b)) | (((r >> b) & 1) << (2 * b + 1)) for b in range(9)) for c, r in zip(col, row)]
    expected = [keys[i] for i in np.argsort(z)]
    assert spans == expected
    # word_pos restarts per POI, poi_pos counts POIs, the category sits on every token incl. SEP
    assert enc.word_pos[0] == 0 and enc.poi_pos[0] == 0 and enc.grid_pos[0] == 0
    for k in range(1, 41):
        sel = enc.poi_pos == k
        assert enc.word_pos[sel].tolist() == list(range(sel.sum()))
        assert len(set(enc.category_ids[sel].tolist())) == 1 and len(set(enc.grid_pos[sel].tolist())) == 1


def test_random_truncation_drops_whole_pois_within_limit(tokenizer):
    rng = np.random.default_rng(8)
    s = _random_region(120, rng)
    vocab = CategoryVocab.build(s.poi_categories)
    full = Featurizer(tokenizer, vocab, max_poi_tokens=4096).encode(s, np.random.default_rng(0))
    full_spans = _poi_spans(full)
    assert full.num_tokens > 128
    kept_sets = set()
    for seed in range(6):
        enc = Featurizer(tokenizer, vocab, max_poi_tokens=128, truncation="random").encode(s, np.random.default_rng(seed))
        assert enc.num_tokens <= 128 and enc.num_pois_total == 120
        spans = _poi_spans(enc)
        assert len(spans) == enc.num_pois == int((enc.token_ids == 102).sum())
        # each kept POI is complete and the kept POIs keep their Z-order: a subsequence of the full one
        it = iter(full_spans)
        assert all(any(sp == f for f in it) for sp in spans)
        kept_sets.add(tuple(map(str, spans)))
    assert len(kept_sets) > 1  # the exclusion is random
    # nothing is dropped when everything fits
    assert Featurizer(tokenizer, vocab, max_poi_tokens=full.num_tokens).encode(s, np.random.default_rng(1)).num_pois == 120


def test_official_truncation_stops_at_first_overflow():
    tok = CharMapTokenizer({c: 104 + i for i, c in enumerate("abcdefghij")}, {"unk": 100, "cls": 101, "sep": 102, "pad": 0})
    names = ["ab", "abcdefgh", "a", "b"]  # costs 3, 9, 2, 2 with the SEP
    s = RegionSample("t", (0, 0, 16, 16), "x", names, [1, 2, 3, 4], np.array([[1, 1], [2, 2], [3, 3], [4, 4.0]]))
    enc = Featurizer(tok, None, max_poi_tokens=8, truncation="official", order="given").encode(s, np.random.default_rng(0))
    # 1 + 3 = 4 fits, + 9 overflows: stop, although "a" and "b" would still fit
    assert enc.token_ids.tolist() == [101, 104, 105, 102] and enc.num_pois == 1
    exact = Featurizer(tok, None, max_poi_tokens=13, truncation="official", order="given").encode(s, np.random.default_rng(0))
    assert exact.num_tokens == 13 and exact.num_pois == 2  # exact fill is allowed


def test_grid_clamps_both_sides():
    tok = CharMapTokenizer({}, {"unk": 100, "cls": 101, "sep": 102, "pad": 0})
    xy = np.array([[-50.0, 8.0],   # far west: the official int() would give column -4; we clamp to 0
                   [-0.5, 8.0],    # just west: truncation toward zero already gives 0
                   [16.0, 0.0],    # south-east corner exactly: clamp to column/row 15
                   [8.0, 40.0]])   # far north: row clamped to 0
    s = RegionSample("g", (0.0, 0.0, 16.0, 16.0), "x", ["", "", "", ""], [0, 0, 0, 0], xy)
    enc = Featurizer(tok, None, order="given").encode(s, np.random.default_rng(0))
    assert enc.grid_pos[1:].tolist() == [16 * 8 + 0 + 1, 16 * 8 + 0 + 1, 16 * 15 + 15 + 1, 8 + 1]
    assert enc.token_ids.tolist() == [101, 102, 102, 102, 102]  # empty names -> just [SEP]


def test_100k_pois_in_one_cell_is_fast(tokenizer):
    rng = np.random.default_rng(0)
    s = _random_region(100_000, rng, distinct_units=False)
    vocab = CategoryVocab.build(s.poi_categories)
    for truncation in ("random", "official"):
        feat = Featurizer(tokenizer, vocab, truncation=truncation)
        t0 = time.perf_counter()
        enc = feat.encode(s, np.random.default_rng(1))
        elapsed = time.perf_counter() - t0
        assert elapsed < 2.0, f"{truncation}: {elapsed:.2f} s"
        assert 400 < enc.num_tokens <= 512 and enc.num_pois_total == 100_000


def test_bad_input_is_reported():
    tok = CharMapTokenizer({}, {"unk": 100, "cls": 101, "sep": 102, "pad": 0})
    feat = Featurizer(tok, None)
    with pytest.raises(InputError, match="categories"):
        feat.encode(RegionSample("a", (0, 0, 1, 1), "x", ["a"], [], np.zeros((1, 2))), np.random.default_rng(0))
    with pytest.raises(InputError, match="non-finite"):
        feat.encode(RegionSample("a", (0, 0, 1, 1), "x", ["a"], [1], np.array([[np.nan, 0.0]])), np.random.default_rng(0))
    with pytest.raises(InputError, match="bounds"):
        feat.encode(RegionSample("a", (1, 0, 1, 1), "x"), np.random.default_rng(0))
    with pytest.raises(InputError, match="integer"):
        feat.encode(RegionSample("a", (0, 0, 1, 1), "x", ["a"], ["shop"], np.zeros((1, 2))), np.random.default_rng(0))
    with pytest.raises(InputError):
        Featurizer(tok, None, truncation="middle")


# --- images and batching --------------------------------------------------------------------------
def test_image_chw_and_collate_padding_rules():
    tok = CharMapTokenizer({c: 104 + i for i, c in enumerate("abc")}, {"unk": 100, "cls": 101, "sep": 102, "pad": 0})
    vocab = CategoryVocab.build(["shop", "food"])
    feat = Featurizer(tok, vocab, grid_cells=4, order="given")
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a = RegionSample("a", (0, 0, 4, 4), "x", ["abc", "b"], ["shop", "zzz"], np.array([[0.5, 3.5], [3.5, 0.5]]),
                     image=img, image_coverage=0.5, labels={"population": 3.0})
    b = RegionSample("b", (0, 0, 4, 4), "x", ["a"], ["food"], np.array([[2.0, 2.0]]))
    ea, eb = feat.encode(a, np.random.default_rng(0)), feat.encode(b, np.random.default_rng(0))
    assert ea.image.shape == (3, 8, 8) and ea.image.dtype == np.uint8
    np.testing.assert_array_equal(ea.image[1], img[:, :, 1])
    assert eb.image is None and not eb.has_image
    assert ea.category_ids.tolist() == [0] + [vocab.id_of("shop")] * 4 + [CategoryVocab.UNK_ID] * 2

    batch = feat.collate([ea, eb], image_size=8, pad_to_multiple=8)
    direct = collate([ea, eb], 8, 8, grid_cells=4, category_pad_id=0)
    assert all((direct[k] == batch[k]).all() for k in ("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids"))
    assert batch["token_ids"].shape == (2, 8)  # longest 7 -> 8
    assert batch["token_ids"][1].tolist() == [101, 104, 102, 0, 0, 0, 0, 0]
    assert batch["word_pos"][1].tolist() == [0, 0, 1, 0, 1, 2, 3, 4]
    assert batch["poi_pos"][1].tolist() == [0, 1, 1, 2, 2, 2, 2, 2]
    assert batch["grid_pos"][1].tolist() == [0] + [4 * 2 + 2 + 1] * 2 + [17] * 5
    assert batch["category_ids"][1, 3:].tolist() == [0] * 5
    assert batch["poi_mask"].sum(1).tolist() == [7, 3]
    assert batch["has_image"].tolist() == [True, False] and batch["has_pois"].tolist() == [True, True]
    assert batch["image_coverage"].tolist() == [0.5, 0.0]
    assert (batch["image"][0].numpy() == ea.image).all() and batch["image"][1].abs().sum() == 0
    assert batch["cell_ids"] == ["a", "b"]
    lab = batch["labels"]["population"]
    assert lab[0] == 3.0 and np.isnan(lab[1].item())
    small = feat.collate([ea], image_size=4)
    assert small["image"].shape == (1, 3, 4, 4)
    assert abs(float(small["image"].float().mean()) - float(img.mean())) < 8


def test_length_bucketed_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, 1000)
    plain = length_bucketed_batches(lengths, 32, shuffle=False)
    flat = [i for bt in plain for i in bt]
    assert sorted(flat) == list(range(1000))
    assert list(lengths[flat]) == sorted(lengths, reverse=True)  # longest first
    shuffled = length_bucketed_batches(lengths, 32, shuffle=True, rng=np.random.default_rng(4))
    assert sorted(i for bt in shuffled for i in bt) == list(range(1000))
    assert shuffled == length_bucketed_batches(lengths, 32, shuffle=True, rng=np.random.default_rng(4))
    assert shuffled != length_bucketed_batches(lengths, 32, shuffle=True, rng=np.random.default_rng(5))

    def padding(batches):
        return sum(len(bt) * lengths[bt].max() - lengths[bt].sum() for bt in batches)

    random_batches = [list(c) for c in np.array_split(rng.permutation(1000), 32)]
    assert padding(shuffled) < 0.5 * padding(random_batches)
    assert all(len(bt) == 32 for bt in length_bucketed_batches(lengths, 32, True, np.random.default_rng(1), drop_last=True))
