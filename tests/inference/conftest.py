"""Fixtures for inference tests (helpers in _inference_fixtures.py, shared with tests/backend)."""
from __future__ import annotations

import pytest

from tests.inference._inference_fixtures import build_tiny_checkpoint, make_city


@pytest.fixture(scope="session")
def uv_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "uv")


@pytest.fixture(scope="session")
def pop_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "pop", task="population", kind="regression",
                                 fusion="average", target={"target_scaler": {"mean": 500.0, "std": 100.0}})


@pytest.fixture(scope="session")
def backbone_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "backbone", task=None)


@pytest.fixture(scope="session")
def city(tmp_path_factory):
    """``{"tif", "gpkg", "n_pois", "folder"}``: a 2 m RGB GeoTIFF and 30 POIs in EPSG:32650."""
    return make_city(tmp_path_factory.mktemp("city"))
