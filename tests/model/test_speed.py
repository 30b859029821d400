"""Optional speed-ups: int8 dynamic quantisation stays close to fp32 and leaves the original model alone."""
from __future__ import annotations

import torch

from refound_core.model.config import refound_tiny
from refound_core.model.refound import ReFound
from refound_core.model.speed import quantize_int8

from tests.model.conftest import random_batch


def test_int8_dynamic_quantisation_is_close_but_not_equal():
    torch.manual_seed(0)
    model = ReFound(refound_tiny()).eval()
    batch = random_batch(model.config, batch=4, seed=5)
    q = quantize_int8(model)
    assert any("Quantized" in type(m).__name__ or "quantized" in type(m).__module__ for m in q.modules())
    assert isinstance(model.encoder.layers[0].attn.qkv, torch.nn.Linear)  # the original is untouched
    with torch.no_grad():
        ref, out = model.forward_batch(batch).average(), q.forward_batch(batch).average()
    err = (out - ref).norm() / ref.norm()
    assert 0 < err < 0.05, float(err)
