"""Shared fixtures. Tests run on CPU with the built-in sample; ../shared/data is optional."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_or_skip(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test (a user's fresh clone has no ../shared)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: real COCO/LVIS data lives in ../shared/data beside the repo (CI has it, a fresh clone does not)")
    return path


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as module ``name`` (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_reproducible_env():
    # Tests that make git repos (DVC) need an identity; DVC must not phone home.
    os.environ.setdefault("GIT_AUTHOR_NAME", "picosam test")
    os.environ.setdefault("GIT_AUTHOR_EMAIL", "test@picosam.invalid")
    os.environ.setdefault("GIT_COMMITTER_NAME", "picosam test")
    os.environ.setdefault("GIT_COMMITTER_EMAIL", "test@picosam.invalid")
    os.environ["DVC_NO_ANALYTICS"] = "1"
    yield
