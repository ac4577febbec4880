"""Shared fixtures. Tests run on CPU with the built-in sample; ../shared/data is optional."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_or_skip(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test (a user's fresh clone has no ../shared)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: real COCO/LVIS data lives in ../shared/data beside the repo (CI has it, a fresh clone does not)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_reproducible_env():
    # Tests that make git repos (DVC) need an identity; DVC must not phone home.
    os.environ.setdefault("GIT_AUTHOR_NAME", "picosam test")
    os.environ.setdefault("GIT_AUTHOR_EMAIL", "test@picosam.invalid")
    os.environ.setdefault("GIT_COMMITTER_NAME", "picosam test")
    os.environ.setdefault("GIT_COMMITTER_EMAIL", "test@picosam.invalid")
    os.environ["DVC_NO_ANALYTICS"] = "1"
    yield
