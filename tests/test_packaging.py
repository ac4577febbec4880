"""The package as a user installs it: a wheel built from the sources, installed (not editable) into a fresh
virtualenv beside the pinned stack, run from a folder that is not the repository."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.paths import run_checked as run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(installed_wheel) -> tuple[Path, dict[str, str]]:
    """The wheel installed into a fresh virtualenv (conftest.installed_wheel, built once per session)."""
    return installed_wheel


def test_wheel_installs_stages_under_our_namespace(installed, tmp_path):
    venv, env = installed
    py = str(venv / "bin" / "python")
    probe = (
        "import importlib.util, picosam_pipeline.stages as s, picosam_pipeline.deploy as d, pathlib;"
        "print(s.__file__); print(importlib.util.find_spec('stages'));"
        "print(sorted(p.name for p in (pathlib.Path(d.__file__).parent / 'template').iterdir() if p.is_file()))"
    )
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
    assert [line.split()[0] for line in listing.splitlines() if not line.startswith(" ")] == [
        "sample",
        "prepare",
        "teacher-logits",
        "pack",
        "train",
        "evaluate",
        "quantize",
        "export",
        "evaluate-int8",
        "package",
    ]
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    small = ["--set", "sample.train_images=2", "--set", "sample.val_images=1", "--set", "sample.plant_bad_inputs=false"]
    run([cli, "run-stage", "sample", *small], cwd=tmp_path, env=env)
    run([cli, "run-stage", "prepare"], cwd=tmp_path, env=env)
    assert (tmp_path / "data/prepared/index.parquet").stat().st_size > 0
    assert (tmp_path / "metrics/prepare.json").is_file()
    # python -m works too, from the same install
    assert (
        "Usage:"
        in run([str(venv / "bin" / "python"), "-m", "picosam_pipeline", "--help"], cwd=tmp_path, env=env).stdout
    )
