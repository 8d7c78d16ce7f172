"""Shared pytest fixtures: location of the real EM test data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    env = os.environ.get("EMSEG_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "fixtures").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` (or ``$EMSEG_DATA``); skips the test when absent."""
    found = _data_dir()
    if found is None:
        pytest.skip("shared EM data not found (set EMSEG_DATA)")
    return found


@pytest.fixture(scope="session")
def fixtures_dir(data_dir: Path) -> Path:
    """The tiny real EM crops used by unit tests."""
    return data_dir / "fixtures"
