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

pytest_plugins = ["tests.plugins.gcs", "tests.plugins.data", "tests.plugins.serving"]


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets``; tests that use it skip with a reason where it is absent."""
    if not DATASETS.is_dir():
        pytest.skip(f"real-photo datasets not found at {DATASETS} (only on the project's machines)")
    return DATASETS


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test, restored after.

    Tests use tiny tensors on a shared 2-core machine, where a second thread only
    adds contention.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
