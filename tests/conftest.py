"""Shared fixtures and hooks only (helpers live in tests/helpers/). Tests run on CPU with the built-in sample;
../shared/data is optional."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers.memory import give_memory_back
from tests.helpers.paths import REPO, run_checked


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_reproducible_env():
    # Tests that make git repos (DVC) need an identity; DVC must not phone home.
    os.environ.setdefault("GIT_AUTHOR_NAME", "picosam test")
    os.environ.setdefault("GIT_AUTHOR_EMAIL", "test@picosam.invalid")
    os.environ.setdefault("GIT_COMMITTER_NAME", "picosam test")
    os.environ.setdefault("GIT_COMMITTER_EMAIL", "test@picosam.invalid")
    os.environ["DVC_NO_ANALYTICS"] = "1"
    yield


@pytest.fixture(autouse=True, scope="module")
def _give_memory_back_after_each_module():
    """What a module's tests freed (models, arrays, its module fixtures) goes back to the system when it ends: glibc
    would keep it in this process's heap, and every later module would start from the sum."""
    yield
    give_memory_back()


def pytest_collection_modifyitems(session, config, items):
    """The SAM3 stage tests (those using tests/teacher/test_sam3.py's ``sam3_memory``) run first: each builds a
    ~4.5 GiB model in this process, and the process stays under 6 GB only before it has loaded what the other tests
    load (measured in `make test-all`: 6.6 GiB peak with them in path order)."""
    first = [item for item in items if "sam3_memory" in getattr(item, "fixturenames", ())]
    if first:
        items[:] = first + [item for item in items if item not in first]


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


# --------------------------------------------------------------------------------------------------
# the pipeline inputs of the train, evaluate and deploy tests, built once per session (tests/helpers/pipeline_inputs)
#
# Shared by every test that asks for them: treat their files as read-only. A test that runs a stage on them points
# the stage's outputs at its own folder (pipeline_inputs.elsewhere, own_store, run_pack(cfg, tmp_path / ...)); a
# test that damages files copies them first (tests/train/test_loader.py's _copy). In `make test` (not slow) they and
# tests/train/test_trainer.py::test_stage_writes_student_metrics_and_plots (the train stage, 4 steps on them) are the
# one end-to-end run: sample -> prepare -> GT-mask teacher -> pack -> train.


@pytest.fixture(scope="session")
def sample_inputs(tmp_path_factory):
    """The built-in sample (6 train, 3 val images) prepared, with a GT-mask teacher store ``gt``: the
    :class:`~picosam_pipeline.config.Config` of ``pipeline_inputs.build_inputs`` (its pack section packs both splits
    into ``sample_shards``)."""
    from tests.helpers.pipeline_inputs import build_inputs

    return build_inputs(tmp_path_factory.mktemp("sample_inputs"))


@pytest.fixture(scope="session")
def sample_shards(sample_inputs) -> Path:
    """``sample_inputs`` packed as the pack section says (both splits, 8 samples per shard): the folder holding
    ``train/`` and ``val/`` (and the stage's ``report.json``)."""
    from tests.helpers.pipeline_inputs import run_pack

    out = Path(sample_inputs.pack.out_dir)
    run_pack(sample_inputs, out)
    return out


@pytest.fixture(scope="session")
def sample_student(sample_shards) -> Path:
    """A random-weight PicoSAM2 whose masks cover about half of each val crop (``half_foreground_student``), saved
    as a student checkpoint (input size 96, the ImageNet normalisation in its meta)."""
    import dataclasses

    from picosam_pipeline.train.checkpoints import save_student
    from picosam_pipeline.train.students import NORMALIZATION
    from tests.helpers.pipeline_inputs import half_foreground_student

    meta = {"student": "picosam2", "input_size": 96, "normalization": dataclasses.asdict(NORMALIZATION)}
    return save_student(sample_shards.parent / "student.pt", half_foreground_student(sample_shards / "val"), meta)


@pytest.fixture(scope="session")
def teacher_project(tmp_path_factory) -> tuple[Path, list[str]]:
    """``(root, sets)``: the teacher tests' project (``teacher_project.tiny_project(root, 2)``: params.yaml, the
    sample with 1 train and 2 val images, prepared), built once per session. Tests run stages with ``root`` as the
    working directory and their outputs (``teacher.out``, ``runtime.metrics_dir``) in their own folders."""
    from tests.helpers.teacher_project import tiny_project

    root = tmp_path_factory.mktemp("teacher-project")
    return root, tiny_project(root, 2)
