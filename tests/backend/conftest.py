"""Backend fixtures: the tiny checkpoint of tests/inference and a server on 127.0.0.1, port 0."""
from __future__ import annotations

import pytest

from tests.inference._inference_fixtures import build_tiny_checkpoint


@pytest.fixture(scope="session")
def backend_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "uv")


@pytest.fixture(scope="session")
def backend_predictor(backend_checkpoint):
    from refound_core.inference.predictor import Predictor

    return Predictor(backend_checkpoint, device="cpu", batch_size=4)


@pytest.fixture()
def server(backend_predictor):
    """A server in a thread (small body limit so 413 is cheap to trigger)."""
    from refound_core.backend.server import BackendServer

    srv = BackendServer(backend_predictor, "127.0.0.1", 0, max_body_bytes=2 * 1024 * 1024)
    srv.start_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()
