"""Fixtures shared by every test directory."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The reference's example images (``both.png``, ``flute.jpg``), kept in the repository so that
#: the tests need nothing beside the checkout.
SHARED_IMAGES = REPO_ROOT / "tests" / "data" / "images"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (independent of the working directory)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_images() -> Path:
    """Folder of example images; skips the test when it is absent."""
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"example images not found at {SHARED_IMAGES}")
    return SHARED_IMAGES


@pytest.fixture(scope="session")
def flute_jpg(shared_images: Path) -> Path:
    """``flute.jpg`` from :func:`shared_images` (skips when absent)."""
    path = shared_images / "flute.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path
