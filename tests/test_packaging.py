"""The package as a user installs it: a wheel built from the sources, installed (not editable) into a fresh
virtualenv beside the pinned stack, run from a folder that is not the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """``(venv, env)``: the wheel installed into a new virtualenv whose only extra path is this environment's
    site-packages (torch, sam2, zarr, ... at the tested pins), without its editable install of this repo."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources, so the build leaves nothing in the checkout.
    src = root / "src"
    everywhere = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = {".git", ".venv", ".dvc", "data", "metrics", "build"} if Path(folder) == REPO else set()
        return (top & set(names)) | everywhere(folder, names)

    shutil.copytree(REPO, src, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
         str(src)], cwd=root, env=env)
    (wheel,) = (root / "dist").glob("picosam_pipeline-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=root, env=env)
    purelib = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=root, env=env).stdout.strip())
    # A plain path line: the pinned stack is importable, while the .pth files inside it (our editable install's
    # finder among them) are not processed.
    (purelib / "pinned_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root, env=env)
    return venv, env


def test_wheel_installs_stages_under_our_namespace(installed, tmp_path):
    venv, env = installed
    py = str(venv / "bin" / "python")
    probe = ("import importlib.util, picosam_pipeline.stages as s, picosam_pipeline.deploy as d, pathlib;"
             "print(s.__file__); print(importlib.util.find_spec('stages'));"
             "print(sorted(p.name for p in (pathlib.Path(d.__file__).parent / 'template').iterdir() if p.is_file()))")
    lines = run([py, "-c", probe], cwd=tmp_path, env=env).stdout.splitlines()
    assert lines[0].startswith(str(venv)) and lines[0].endswith("picosam_pipeline/stages/__init__.py")
    assert lines[1] == "None", "a top-level `stages` package was installed"
    assert lines[2] == "['README.md', 'picosam_imx500_demo.py']"
    wheel_names = zipfile.ZipFile(next((venv.parent / "dist").glob("*.whl"))).namelist()
    assert not [n for n in wheel_names if n.startswith("stages/")]
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in wheel_names)


def test_installed_cli_runs_sample_and_prepare_outside_the_repo(installed, tmp_path):
    venv, env = installed
    cli = str(venv / "bin" / "picosam-pipeline")
    listing = run([cli, "stages"], cwd=tmp_path, env=env).stdout
    assert [line.split()[0] for line in listing.splitlines()] == [
        "sample", "prepare", "teacher-logits", "pack", "train", "evaluate", "quantize", "export", "evaluate-int8",
        "package"]
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    small = ["--set", "sample.train_images=2", "--set", "sample.val_images=1", "--set", "sample.plant_bad_inputs=false"]
    run([cli, "run-stage", "sample", *small], cwd=tmp_path, env=env)
    run([cli, "run-stage", "prepare"], cwd=tmp_path, env=env)
    assert (tmp_path / "data/prepared/index.parquet").stat().st_size > 0
    assert (tmp_path / "metrics/prepare.json").is_file()
    # python -m works too, from the same install
    assert "Usage:" in run([str(venv / "bin" / "python"), "-m", "picosam_pipeline", "--help"], cwd=tmp_path, env=env).stdout
