"""Image-folder fixtures built from real handwritten digits (see :mod:`kaedama.fixtures`).

* ``digits_folder``: a clean labeled folder (10 labels x 20 images), session-wide.
* ``dirty_digits_folder``: ``(root, GroundTruth)`` for the default dirty folder
  (10 x 50 originals plus planted duplicates, near-duplicates, cross-label copies,
  corrupt files and an extension-less JPEG), session-wide.
* ``make_digits``: a factory ``make_digits(**config_fields) -> (root, GroundTruth)``
  writing into a fresh temporary folder, for tests that need their own variant.

Session folders are shared: tests must not modify them (copy them first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from kaedama.fixtures import FixturesConfig, GroundTruth, make_digits_folder

CLEAN_PER_CLASS = 20


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean ``root/<digit>/<file>`` folder: 200 distinct digit photos, no dirt."""
    root = tmp_path_factory.mktemp("digits") / "clean"
    make_digits_folder(root, FixturesConfig(per_class=CLEAN_PER_CLASS).clean(), progress=False)
    return root


@pytest.fixture(scope="session")
def dirty_digits_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    """The default dirty folder and its ground truth (about 540 files)."""
    root = tmp_path_factory.mktemp("digits") / "dirty"
    truth = make_digits_folder(root, FixturesConfig(), progress=False)
    return root, truth


@pytest.fixture
def make_digits(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[Path, GroundTruth]]:
    """Factory: ``make_digits(per_class=5, classes=("a", "b"), ...) -> (root, truth)``."""

    def make(**fields) -> tuple[Path, GroundTruth]:
        root = tmp_path_factory.mktemp("digits") / "folder"
        config = replace(FixturesConfig(), **fields)
        return root, make_digits_folder(root, config, progress=False)

    return make
