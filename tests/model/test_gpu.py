"""CUDA checks (marker ``gpu``; run by scripts/gpu_check.sh when a GPU is lent, skipped without one)."""
from __future__ import annotations

import pytest
import torch

from refound_core.model.config import refound_small
from refound_core.model.refound import ReFound

from tests.model.conftest import random_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_fused_matches_cpu_reference_and_bf16_is_close():
    torch.manual_seed(0)
    cpu = ReFound(refound_small()).eval()
    batch = random_batch(cpu.config, batch=6, num_pois=(30, 0, 50, 12, 64, 3), seed=7)
    cpu.encoder.fused = False
    with torch.no_grad():
        ref = cpu.forward_batch(batch).hidden_states
    gpu = cpu.to("cuda")
    gpu.encoder.fused = True
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            out = gpu.forward_batch(batch).hidden_states.float().cpu()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf = gpu.forward_batch(batch).hidden_states.float().cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert torch.isfinite(bf).all() and (bf - ref).abs().mean() < 0.05
