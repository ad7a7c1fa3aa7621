"""Shared fixtures: every test runs in its own folder with its own runs/ and cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach a model hub; huggingface_hub reads this once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVTOOL_RUNS", str(tmp_path / "runs"))
    # Unexpected exceptions are re-raised in tests so that bugs never hide behind a message.
    monkeypatch.setenv("KVTOOL_DEBUG", "1")


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` beside the checkout; tests that need it skip on a user's clone."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (only developers and CI have it)")
    return SHARED
