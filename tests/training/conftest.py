"""Fixtures of the pre-training tests: one small dataset with a stub-teacher cache per session."""
from __future__ import annotations

import pytest
import torch

from tests.training.pretrain_fixtures import build_dataset


@pytest.fixture(scope="session")
def pretrain_ds(tmp_path_factory):
    """40 regions, 64 px chips, 4 x 4 visual tokens (the tiny preset's patch grid)."""
    return build_dataset(tmp_path_factory.mktemp("pretrain") / "ds", n=40, image_size=64, patches_per_side=4)


@pytest.fixture
def one_thread():
    """Single-threaded torch: faster on the shared 2-core test machines, and the same
    arithmetic as the subprocess runs (OMP_NUM_THREADS=1), so results compare exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
