"""Optional inference speed-ups (issue 18): ``torch.compile`` and int8 dynamic quantisation.

Both are opt-in and off by default. Measured on the 2-core CPU box (docs/BENCHMARKS.md):
whether they pay there is recorded next to the numbers; on a GPU ``torch.compile`` is the one to
try. int8 dynamic quantisation (``torch.ao.quantization.quantize_dynamic`` on every
``nn.Linear``: int8 weights, activations quantised per batch) is CPU-only and changes the
numbers, so its accuracy cost must be measured on the task before it is used.
"""
from __future__ import annotations

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear layers run int8 dynamic quantised (CPU inference only)."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def compile_model(model: nn.Module, mode: str | None = None) -> nn.Module:
    """``model`` with its ``forward`` replaced, in place, by ``torch.compile`` of it (dynamic
    shapes: batches differ in POI length), so ``model(...)`` and ``model.forward_batch(...)`` both
    run compiled; the first batch of each new shape class pays the compilation. Returns ``model``."""
    model.forward = torch.compile(model.forward, dynamic=True, mode=mode)
    return model
