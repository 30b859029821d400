"""Task heads (A.2.2) and region fusion (4.3)."""
from __future__ import annotations

import pytest
import torch

from refound_core.model.heads import AttnPool, ReFoundWithHead, TaskHead


def test_head_structure_is_dense_gelu_dropout_decoder():
    torch.manual_seed(0)
    head = TaskHead(16, kind="regression", fusion="average", dropout=0.0).eval()
    z = torch.randn(5, 2, 16)
    fused = 0.5 * (z[:, 0] + z[:, 1])
    h = torch.nn.functional.gelu(fused @ head.mlp.fc1.weight.T + head.mlp.fc1.bias)  # exact erf GELU
    expected = h @ head.mlp.fc2.weight.T + head.mlp.fc2.bias
    torch.testing.assert_close(head(z), expected)
    assert head(z).shape == (5, 1)


@pytest.mark.parametrize("kind,n", [("binary", 1), ("regression", 1), ("multiclass", 4)])
def test_kinds_and_predict(kind, n):
    torch.manual_seed(0)
    head = TaskHead(16, kind=kind, num_classes=n, fusion="attention").eval()
    z = torch.randn(3, 2, 16)
    logits, pred = head(z), head.predict(z)
    assert logits.shape == pred.shape == (3, n)
    if kind == "binary":
        torch.testing.assert_close(pred, logits.sigmoid())
    elif kind == "multiclass":
        torch.testing.assert_close(pred, logits.softmax(-1))
    else:
        torch.testing.assert_close(pred, logits)


def test_bad_head_arguments():
    with pytest.raises(ValueError):
        TaskHead(8, kind="ordinal")
    with pytest.raises(ValueError):
        TaskHead(8, fusion="max")
    with pytest.raises(ValueError):
        TaskHead(8, kind="binary", num_classes=2)
    with pytest.raises(ValueError):
        TaskHead(8).fuse(torch.randn(2, 3, 8))


def test_attn_pool_uses_only_present_modalities():
    torch.manual_seed(0)
    pool = AttnPool(8)
    z = torch.randn(4, 2, 8)
    presence = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    pooled, beta = pool(z, presence, return_weights=True)
    torch.testing.assert_close(beta.sum(1), torch.ones(4))
    assert 0 < beta[0, 0] < 1
    torch.testing.assert_close(pooled[1], z[1, 0])
    torch.testing.assert_close(pooled[2], z[2, 1])
    torch.testing.assert_close(pooled[3], pool(z[3:])[0])  # neither: fall back to both
    assert pool.l2.bias is None and pool.l1.out_features == 32


def test_head_on_backbone_output_equals_head_on_stored_region_embedding(tiny_model, make_batch):
    batch = make_batch(tiny_model.config)
    head = TaskHead(tiny_model.hidden_size, kind="binary", fusion="attention").eval()
    with torch.no_grad():
        out = tiny_model.forward_batch(batch)
        torch.testing.assert_close(head(out), head(out.region_tokens, out.presence))


def test_frozen_backbone_trains_only_the_head(tiny_model, make_batch):
    batch = make_batch(tiny_model.config)
    model = ReFoundWithHead(tiny_model, TaskHead(tiny_model.hidden_size, kind="regression"), freeze_backbone=True)
    model.train()
    assert not model.backbone.training and model.head.training
    loss = model(batch).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_trainable_backbone_gets_gradients(tiny_model, make_batch):
    batch = make_batch(tiny_model.config)
    model = ReFoundWithHead(tiny_model, TaskHead(tiny_model.hidden_size, kind="binary", fusion="attention"))
    model.train()
    model(batch).sum().backward()
    assert model.backbone.embeddings.poi.word_embed.weight.grad is not None
    assert model.backbone.encoder.layers[0].ffn_poi.mlp.fc1.weight.grad.abs().sum() > 0
    assert model.predict(batch).shape == (4, 1)


@pytest.mark.parametrize("fusion", ["average", "attention"])
def test_folded_standardisation_is_the_same_function_of_raw_tokens(fusion):
    """A head trained on (z - mu) / sigma, folded, gives on raw z what it gave on standardised z,
    with one modality missing in some rows too."""
    from refound_core.model.heads import fold_token_standardization, token_standardization

    torch.manual_seed(0)
    h = 16
    z = torch.randn(12, 2, h) * torch.linspace(0.01, 5.0, h) + torch.linspace(-3.0, 3.0, h)
    presence = torch.ones(12, 2, dtype=torch.bool)
    presence[:4, 0] = False
    presence[4:6, 1] = False
    mu, sigma = token_standardization(z, presence, torch.arange(8))
    sel = z[:8][presence[:8]]
    torch.testing.assert_close(mu, sel.mean(0), atol=1e-5, rtol=1e-5)
    assert (sigma >= sel.std(0, unbiased=False) - 1e-5).all() and (sigma > 0).all()
    head = TaskHead(h, kind="regression", fusion=fusion).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
        want = head((z - mu) / sigma, presence)
        fold_token_standardization(head, mu, sigma)
        got = head(z, presence)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
