"""Multi-modal geospatial embedding (paper 4.1.1) against its definitions."""
from __future__ import annotations

import torch

from refound_core.model.embeddings import normalize_image, patchify


def test_patchify_is_pixel_major_channel_minor():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 32, 48, generator=g)
    p = 16
    out = patchify(img, p)
    assert out.shape == (2, 2 * 3, p * p * 3)
    for b, r, c, i, j, ch in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 15, 3, 2), (0, 0, 1, 7, 9, 1), (1, 1, 0, 2, 15, 0)]:
        assert out[b, r * 3 + c, (i * p + j) * 3 + ch] == img[b, ch, r * p + i, c * p + j]
    # not the Conv2d (channel-first) order
    conv_order = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(2, 6, -1)
    assert not torch.equal(out, conv_order)


def test_uint8_normalisation_follows_the_official_loader():
    mean = torch.tensor([0.2, 0.4, 0.6])
    std = torch.tensor([0.1, 0.2, 0.3])
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = normalize_image(pixels, mean, std)
    expected = (torch.tensor([0.0, 0.2, 1.0]) - mean) / std
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    already = torch.randn(1, 3, 2, 2)
    assert normalize_image(already, mean, std) is already


def test_poi_embedding_is_the_sum_of_its_tables(tiny_model):
    """Eq. 1 (+ token type row 0), LayerNorm, no modality term yet; PAD word reads zero."""
    emb = tiny_model.embeddings.poi
    ids = dict(token_ids=torch.tensor([[101, 150, 0]]), word_pos=torch.tensor([[0, 1, 0]]),
               poi_pos=torch.tensor([[0, 1, 2]]), grid_pos=torch.tensor([[0, 17, 257]]),
               category_ids=torch.tensor([[0, 5, 0]]))
    with torch.no_grad():
        emb.word_embed.weight[0] = 3.0  # must not be read
        got = emb(**ids)
        words = emb.word_embed.weight[ids["token_ids"]] * (ids["token_ids"] != 0).unsqueeze(-1)
        raw = (words + emb.token_type_embed[0] + emb.word_pos_embed.weight[ids["word_pos"]]
               + emb.poi_pos_embed.weight[ids["poi_pos"]] + emb.grid_pos_embed.weight[ids["grid_pos"]]
               + emb.category_embed.weight[ids["category_ids"]])
        expected = torch.nn.functional.layer_norm(raw, raw.shape[-1:], emb.norm.weight, emb.norm.bias, emb.norm.eps)
    torch.testing.assert_close(got, expected)


def test_modality_embedding_is_added_after_the_layernorms(tiny_model, make_batch):
    cfg = tiny_model.config
    batch = make_batch(cfg)
    e = tiny_model.embeddings
    with torch.no_grad():
        images = normalize_image(batch["image"], tiny_model.image_mean, tiny_model.image_std)
        args = [batch[k] for k in ("token_ids", "word_pos", "poi_pos", "grid_pos", "category_ids")]
        x = e(*args, images)
        lp = batch["token_ids"].shape[1]
        torch.testing.assert_close(x[:, :lp], e.poi(*args) + e.modality_embed.weight[0])
        torch.testing.assert_close(x[:, lp:], e.image(images) + e.modality_embed.weight[1])
