"""Shared pytest fixtures: location of the real EM test data.

Tests that need real EM read it from ``$EMSEG_DATA`` or ``../shared/data``
(a folder next to the clone holding ``fixtures/`` and the full volumes; its
README lists every file with its source and SHA-256).  When neither exists
the tests skip with that reason locally, and fail when ``CI`` is set, so a CI
run without the data cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def _data_dir() -> Path | None:
    env = os.environ.get("EMSEG_DATA")
    for cand in ([Path(env)] if env else []) + [DEFAULT_DATA]:
        if (cand / "fixtures").is_dir():
            return cand
    return None


def missing_data(what: str) -> None:
    """Skip (locally) or fail (when ``$CI`` is set) because test data is missing."""
    where = os.environ.get("EMSEG_DATA") or str(DEFAULT_DATA)
    reason = (f"{what} not found (looked in {where}): set EMSEG_DATA to the folder "
              "holding fixtures/ and the EM volumes")
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$EMSEG_DATA`` or ``../shared/data``; skips locally, fails under ``CI``, when absent."""
    found = _data_dir()
    if found is None:
        missing_data("shared EM data")
    return found


@pytest.fixture(scope="session")
def fixtures_dir(data_dir: Path) -> Path:
    """The tiny real EM crops used by unit tests."""
    return data_dir / "fixtures"


@pytest.fixture(autouse=True)
def _train_in_thread(request, monkeypatch):
    """The Train dock trains in a worker thread in tests (so monkeypatched engine
    functions apply); tests marked ``child_process`` use the real child process."""
    if "child_process" not in request.keywords:
        monkeypatch.setenv("EMSEG_CHILD_PROCESS", "0")
