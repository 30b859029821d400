"""Fixtures of the region tests: the inference tests' tiny checkpoint and city."""
from __future__ import annotations

import pytest

from tests.inference.conftest import city, uv_checkpoint  # noqa: F401 - shared session fixtures


@pytest.fixture(scope="session")
def uv_predictor(uv_checkpoint):  # noqa: F811
    from refound_core.inference.predictor import load_predictor

    return load_predictor(uv_checkpoint, device="cpu", batch_size=4)
