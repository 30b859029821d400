"""MoGE transformer behaviour: expert routing, key masks, permutation symmetry, missing modalities."""
from __future__ import annotations

import pytest
import torch

from refound_core.errors import InputError
from refound_core.model.config import refound_tiny
from refound_core.model.refound import ReFound

ATOL = 1e-5


def test_output_shapes_and_cls_positions(tiny_model, make_batch):
    cfg = tiny_model.config
    batch = make_batch(cfg)
    with torch.no_grad():
        out = tiny_model.forward_batch(batch)
    b, lp = batch["token_ids"].shape
    assert out.num_poi_tokens == lp
    assert out.hidden_states.shape == (b, lp + cfg.num_patches + 1, cfg.hidden_size)
    assert torch.equal(out.poi_cls, out.hidden_states[:, 0])
    assert torch.equal(out.img_cls, out.hidden_states[:, lp])
    assert out.poi_hidden.shape[1] == lp and out.image_hidden.shape[1] == cfg.num_patches + 1
    assert out.region_tokens.shape == (b, 2, cfg.hidden_size)
    assert torch.equal(out.has_pois, batch["has_pois"]) and out.attentions is None


def test_routing_uses_the_explicit_split(tiny_model, make_batch):
    """Below fusion_start the P-FFN sees exactly the POI positions and the S-FFN exactly the image
    positions; from fusion_start on only the PS-FFN runs, on every position. (Checked on the
    batch-major reference path; test_fused.py shows the fused path gives the same numbers.)"""
    cfg = tiny_model.config
    tiny_model.encoder.fused = False
    batch = make_batch(cfg)
    seen, attn_out, hooks = [], {}, []
    for i, layer in enumerate(tiny_model.encoder.layers):
        hooks.append(layer.attn.register_forward_hook(lambda m, a, o, i=i: attn_out.__setitem__(i, o[0])))
        for name in ("ffn_poi", "ffn_img", "ffn_ps"):
            if hasattr(layer, name):
                hooks.append(getattr(layer, name).register_forward_hook(
                    lambda m, a, o, i=i, name=name: seen.append((i, name, a[0]))))
    with torch.no_grad():
        out = tiny_model.forward_batch(batch)
    tiny_model.encoder.fused = True
    for h in hooks:
        h.remove()
    lp, total = out.num_poi_tokens, out.hidden_states.shape[1]
    fs = cfg.fusion_start
    assert 0 < fs < cfg.num_layers
    assert [(i, n) for i, n, _ in seen] == (
        [(i, n) for i in range(fs) for n in ("ffn_poi", "ffn_img")] + [(i, "ffn_ps") for i in range(fs, cfg.num_layers)])
    for i, name, x in seen:
        a = attn_out[i]
        if name == "ffn_poi":
            assert torch.equal(x, a[:, :lp])
        elif name == "ffn_img":
            assert torch.equal(x, a[:, lp:]) and x.shape[1] == cfg.num_patches + 1
        else:
            assert torch.equal(x, a) and x.shape[1] == total
    # fusion layers own the unused P/S experts (official layout) and their PS expert
    assert all(hasattr(layer, "ffn_poi") and hasattr(layer, "ffn_img") for layer in tiny_model.encoder.layers)
    assert [hasattr(layer, "ffn_ps") for layer in tiny_model.encoder.layers] == [i >= fs for i in range(cfg.num_layers)]


def test_split_index_follows_the_batch_not_a_constant(tiny_model, make_batch):
    """The same regions padded to a longer POI length give the same real outputs: the split
    moves with the batch."""
    batch = make_batch(tiny_model.config)
    padded = {k: v for k, v in batch.items()}
    extra = 7
    for k in ("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids"):
        padded[k] = torch.cat([batch[k], torch.randint(1, 12, (batch[k].shape[0], extra))], dim=1)
    padded["poi_mask"] = torch.cat([batch["poi_mask"], torch.zeros(batch["poi_mask"].shape[0], extra, dtype=torch.bool)], 1)
    with torch.no_grad():
        a = tiny_model.forward_batch(batch)
        b = tiny_model.forward_batch(padded)
    lp = a.num_poi_tokens
    assert b.num_poi_tokens == lp + extra
    real = batch["poi_mask"]
    torch.testing.assert_close(b.poi_hidden[:, :lp][real], a.poi_hidden[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(b.image_hidden, a.image_hidden, rtol=0, atol=ATOL)
    torch.testing.assert_close(b.img_cls, a.img_cls, rtol=0, atol=ATOL)


def test_padded_token_content_changes_no_real_output(tiny_model, make_batch):
    batch = make_batch(tiny_model.config)
    noisy = dict(batch)
    pad = ~batch["poi_mask"]
    assert pad.any()
    for k in ("token_ids", "word_pos", "category_ids"):
        noisy[k] = torch.where(pad, torch.randint(1, 12, pad.shape), batch[k])
    with torch.no_grad():
        a, b = tiny_model.forward_batch(batch), tiny_model.forward_batch(noisy)
    real = batch["poi_mask"]
    torch.testing.assert_close(b.poi_hidden[real], a.poi_hidden[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(b.image_hidden, a.image_hidden, rtol=0, atol=ATOL)
    assert not torch.allclose(b.poi_hidden[pad], a.poi_hidden[pad])  # padded queries are still computed


def _permute_pois(batch, b, order):
    """Reorder region b's POI token blocks (tokens AND their position ids move together)."""
    pp = batch["poi_pos"][b]
    n = int(batch["poi_mask"][b].sum())
    blocks = [torch.nonzero(pp[:n] == j).flatten() for j in range(1, int(pp[:n].max()) + 1)]
    idx = torch.cat([torch.tensor([0])] + [blocks[j] for j in order] + [torch.arange(n, pp.shape[0])])
    out = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    for k in ("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids", "poi_mask"):
        out[k][b] = batch[k][b][idx]
    return out, idx


def test_poi_permutation_changes_output_only_through_positions(tiny_model, make_batch):
    batch = make_batch(tiny_model.config, num_pois=(5, 4, 3, 2))
    moved, idx = _permute_pois(batch, 0, [4, 2, 0, 3, 1])
    with torch.no_grad():
        a, b = tiny_model.forward_batch(batch), tiny_model.forward_batch(moved)
    # tokens moved with their position ids: attention is permutation-equivariant
    torch.testing.assert_close(b.poi_cls, a.poi_cls, rtol=0, atol=ATOL)
    torch.testing.assert_close(b.img_cls, a.img_cls, rtol=0, atol=ATOL)
    torch.testing.assert_close(b.poi_hidden[0], a.poi_hidden[0][idx], rtol=0, atol=ATOL)
    # tokens moved but position ids left in place: a different serialisation, a different output
    swapped = dict(moved)
    for k in ("word_pos", "poi_pos", "grid_pos"):
        swapped[k] = batch[k].clone()
    with torch.no_grad():
        c = tiny_model.forward_batch(swapped)
    assert (c.poi_cls[0] - a.poi_cls[0]).abs().max() > 1e-3
    torch.testing.assert_close(c.poi_cls[1:], a.poi_cls[1:], rtol=0, atol=ATOL)


def test_region_without_image_ignores_the_pixels(tiny_model, make_batch):
    cfg = tiny_model.config
    batch = make_batch(cfg, num_pois=(3, 2, 5, 2))
    batch["has_image"] = torch.tensor([True, False, True, False])
    other = dict(batch)
    other["image"] = torch.randint(0, 256, batch["image"].shape, dtype=torch.uint8)
    with torch.no_grad():
        a, b = tiny_model.forward_batch(batch), tiny_model.forward_batch(other)
    gone = ~batch["has_image"]
    torch.testing.assert_close(b.poi_hidden[gone], a.poi_hidden[gone], rtol=0, atol=ATOL)
    assert torch.isfinite(a.img_cls).all()          # [S] CLS still computed
    assert not torch.allclose(b.poi_hidden[~gone], a.poi_hidden[~gone])
    # average fusion of an image-less region is h[P] alone
    torch.testing.assert_close(a.average()[gone], a.poi_cls[gone], rtol=0, atol=ATOL)
    torch.testing.assert_close(a.average()[~gone], 0.5 * (a.poi_cls + a.img_cls)[~gone], rtol=0, atol=ATOL)


def test_region_without_pois_ignores_poi_tokens(tiny_model, make_batch):
    batch = make_batch(tiny_model.config, num_pois=(3, 2, 4, 1))
    flagged = dict(batch)
    flagged["has_pois"] = torch.tensor([True, False, True, True])
    with torch.no_grad():
        a = tiny_model.forward_batch(flagged)
        # same region with its POIs actually removed (only the [P] CLS left)
        empty = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        empty["poi_mask"][1, 1:] = False
        b = tiny_model.forward_batch(empty)
    torch.testing.assert_close(a.image_hidden[1], b.image_hidden[1], rtol=0, atol=ATOL)
    torch.testing.assert_close(a.poi_cls[1], b.poi_cls[1], rtol=0, atol=ATOL)
    torch.testing.assert_close(a.average()[1], a.img_cls[1], rtol=0, atol=ATOL)


def test_no_image_tensor_and_neither_modality_stay_finite(tiny_model, make_batch):
    batch = make_batch(tiny_model.config, num_pois=(0, 2))
    batch["image"], batch["has_image"] = None, torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        out = tiny_model.forward_batch(batch)
    assert torch.isfinite(out.hidden_states).all()
    assert not out.has_image.any()
    torch.testing.assert_close(out.average()[1], out.poi_cls[1], rtol=0, atol=ATOL)


def test_masked_patches_use_the_mask_embedding(tiny_model, make_batch):
    cfg = tiny_model.config
    batch = make_batch(cfg)
    mask = torch.zeros(4, cfg.num_patches, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        emb = tiny_model.embeddings.image
        images = batch["image"].float() / 255
        x = emb(images, mask)
        # a masked patch no longer depends on its pixels
        images2 = images.clone()
        images2[:, :, :cfg.patch_size, :cfg.patch_size] = 0.5
        y = emb(images2, mask)
        torch.testing.assert_close(x[:, 1], y[:, 1], rtol=0, atol=0)
        assert not torch.allclose(emb(images, None)[:, 1], emb(images2, None)[:, 1])
        out = tiny_model.forward_batch(batch, masked_patches=mask)
    assert torch.isfinite(out.hidden_states).all()


def test_attention_probabilities_of_the_last_layer(tiny_model, make_batch):
    batch = make_batch(tiny_model.config)
    with torch.no_grad():
        plain = tiny_model.forward_batch(batch)
        out = tiny_model.forward_batch(batch, output_attentions_layer=-1)
    p = out.attentions
    b, s = plain.hidden_states.shape[:2]
    assert p.shape == (b, tiny_model.config.num_heads, s, s)
    torch.testing.assert_close(p.sum(-1), torch.ones(b, tiny_model.config.num_heads, s), rtol=0, atol=1e-5)
    lp = out.num_poi_tokens
    assert (p[..., :lp][~batch["poi_mask"][:, None, None, :].expand(-1, p.shape[1], s, -1)] == 0).all()
    torch.testing.assert_close(out.hidden_states, plain.hidden_states, rtol=0, atol=ATOL)


def test_without_moge_one_shared_ffn(make_batch):
    torch.manual_seed(0)
    model = ReFound(refound_tiny(use_moge=False, vocab_size=400, num_categories=12)).eval()
    assert all(hasattr(l, "ffn") and not hasattr(l, "ffn_poi") for l in model.encoder.layers)
    with torch.no_grad():
        out = model.forward_batch(make_batch(model.config))
    assert torch.isfinite(out.hidden_states).all()


def test_bad_inputs_raise_input_error(tiny_model, make_batch):
    cfg = tiny_model.config
    batch = make_batch(cfg)
    with pytest.raises(InputError, match="image"):
        tiny_model.forward_batch({**batch, "image": batch["image"][:, :, :32]})
    long = {k: v for k, v in batch.items()}
    for k in ("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids", "poi_mask"):
        long[k] = batch[k][:, :1].repeat(1, cfg.max_word_pos + 1)
    with pytest.raises(InputError, match="max_poi_tokens"):
        tiny_model.forward_batch(long)
    with pytest.raises(InputError, match="collate"):
        tiny_model.forward_batch({"token_ids": batch["token_ids"]})
