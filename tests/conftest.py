"""Shared fixtures. Tests run on CPU with the built-in sample; ../shared/data is optional."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_or_skip(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test (a user's fresh clone has no ../shared)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} not found: real COCO/LVIS data lives in ../shared/data beside the repo "
            "(CI has it, a fresh clone does not)"
        )
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


def run_checked(cmd: list, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail the test with its output unless it exits 0."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """``(venv, env)``: the wheel installed into a new virtualenv whose only extra path is this environment's
    site-packages (torch, sam2, zarr, ... at the tested pins), without its editable install of this repo. The wheel
    is in ``venv.parent / "dist"``. Built once per session (tests/test_packaging.py, tests/test_init.py)."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the files a clone has (plus uncommitted work): the build leaves nothing in the checkout,
    # and neither the stages' outputs nor DVC's cache go into it.
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, f"the wheel is built from git's list of the checkout's files: {listed.stderr}"
    src = root / "src"
    for name in listed.stdout.split("\0"):
        if name and (REPO / name).is_file():  # a tracked file deleted in the work tree is listed too
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run_checked(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
        cwd=root,
        env=env,
    )
    (wheel,) = (root / "dist").glob("picosam_pipeline-*.whl")
    venv = root / "venv"
    run_checked([sys.executable, "-m", "venv", venv], cwd=root, env=env)
    purelib = Path(
        run_checked(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=root,
            env=env,
        ).stdout.strip()
    )
    # A plain path line: the pinned stack is importable, while the .pth files inside it (our editable install's
    # finder among them) are not processed.
    (purelib / "pinned_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run_checked(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=root, env=env
    )
    return venv, env
