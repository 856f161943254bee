"""Shared pytest set-up: offline model hub, fixture plugins, and ../shared discovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub; pretrained weights come from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# google.auth must never probe the GCE metadata server (an address off this machine).
os.environ.setdefault("NO_GCE_CHECK", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"

pytest_plugins = ["tests.plugins.gcs", "tests.plugins.data"]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets``; tests that use it skip with a reason where it is absent."""
    if not DATASETS.is_dir():
        pytest.skip(f"real-photo datasets not found at {DATASETS} (only on the project's machines)")
    return DATASETS
