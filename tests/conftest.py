"""Shared test fixtures. Paths to the read-only shared data sit next to the repository."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REFOUND_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.fail(f"shared data folder not found at {SHARED}; set REFOUND_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def parity_dir(shared_dir) -> Path:
    return shared_dir / "parity"
