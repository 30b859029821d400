"""The token-major fused encoder (issue 18) against the batch-major reference path, fp32.

Both paths share the parameters; the reference is the original per-slice formulation
(``encoder.fused = False``). Outputs, attention probabilities and gradients must agree within 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from refound_core.model.config import refound_tiny
from refound_core.model.refound import ReFound

from tests.model.conftest import random_batch

ATOL = 1e-5


def _both(model, batch, **kw):
    outs = []
    for fused in (False, True):
        model.encoder.fused = fused
        outs.append(model.forward_batch(batch, **kw))
    model.encoder.fused = True
    return outs


@pytest.mark.parametrize("use_moge", [True, False])
@pytest.mark.parametrize("with_image", [True, False])
def test_fused_equals_reference(use_moge, with_image):
    torch.manual_seed(0)
    model = ReFound(refound_tiny(use_moge=use_moge)).eval()
    assert model.encoder.fused  # the default
    batch = random_batch(model.config, batch=5, num_pois=(3, 0, 5, 2, 9), seed=1, with_image=with_image)
    valid = torch.ones(5, model.config.image_size, model.config.image_size, dtype=torch.bool)
    valid[1, :40] = False  # a partial image: some patch keys hidden
    batch["image_valid"] = valid
    with torch.no_grad():
        ref, fus = _both(model, batch, output_attentions_layer=1)
    assert fus.hidden_states.shape == ref.hidden_states.shape and fus.hidden_states.is_contiguous()
    torch.testing.assert_close(fus.hidden_states, ref.hidden_states, rtol=0, atol=ATOL)
    torch.testing.assert_close(fus.attentions, ref.attentions, rtol=0, atol=ATOL)
    torch.testing.assert_close(fus.average(), ref.average(), rtol=0, atol=ATOL)


def test_fused_gradients_equal_reference():
    torch.manual_seed(0)
    model = ReFound(refound_tiny()).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for layer in model.encoder.layers:
        layer.attn.attn_drop = 0.0
    batch = random_batch(model.config, batch=3, seed=2)
    grads = []
    for fused in (False, True):
        model.zero_grad()
        model.encoder.fused = fused
        model.forward_batch(batch).average().pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".ffn_poi." in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=ATOL, msg=n)


def test_fused_experts_see_contiguous_token_major_blocks():
    """In the fused path each expert gets one contiguous [L_P, B, H] / [1+N, B, H] block, so its
    Linear layers are single dense matmuls on views (no gather, no strided copy)."""
    torch.manual_seed(0)
    model = ReFound(refound_tiny()).eval()
    batch = random_batch(model.config, batch=4, seed=3)
    seen = []
    hooks = [layer.ffn_poi.register_forward_hook(lambda m, a, o: seen.append(("poi", a[0])))
             for layer in model.encoder.layers[:model.config.fusion_start]]
    hooks += [layer.ffn_img.register_forward_hook(lambda m, a, o: seen.append(("img", a[0])))
              for layer in model.encoder.layers[:model.config.fusion_start]]
    with torch.no_grad():
        out = model.forward_batch(batch)
    for h in hooks:
        h.remove()
    lp = out.num_poi_tokens
    assert len(seen) == 2 * model.config.fusion_start
    for name, x in seen:
        assert x.is_contiguous()
        assert x.shape[:2] == ((lp, 4) if name == "poi" else (model.config.num_patches + 1, 4))
