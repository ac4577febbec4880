"""Sharing the teacher pass through a DVC remote: a teammate's clone pulls the store and never runs the teacher.

In a temporary git repository holding this project's dvc.yaml, code and params.yaml (trimmed to one sample image):
``dvc repro teacher-logits`` (sample -> prepare -> teacher), ``dvc remote add -d`` a local folder, ``dvc push``,
commit; then ``git clone`` it, ``dvc pull``, and ``dvc repro teacher-logits`` in the clone must skip every stage:
the pulled store is used as it is (same bytes, untouched files, metrics not rewritten, no teacher output).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from teacher_project import BIN, REPO

pytestmark = pytest.mark.slow

STORE = Path("data/teacher/logits.zarr")
METRICS = Path("metrics/teacher-logits.json")


def sh(*args: str, cwd: Path) -> str:
    """Run a command (``dvc`` and ``picosam-pipeline`` from the test's environment first on PATH); its output."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file of the store and of the teacher metrics."""
    files = [f for f in sorted((root / STORE).rglob("*")) if f.is_file()] + [root / METRICS]
    return {str(f.relative_to(root)): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


def make_project(root: Path) -> None:
    """This project's pipeline files and code in ``root``, with params trimmed to one 9-instance image."""
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    for package in ("picosam_pipeline", "stages"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample"].update(train_images=1, val_images=1, plant_bad_inputs=False)
    params["teacher"].update(splits=["val"], instances_per_shard=8, executor="local", allow_random_weights=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_clone_pulls_the_teacher_store_and_skips_the_teacher(tmp_path):
    first, second, remote = tmp_path / "first", tmp_path / "second", tmp_path / "remote"
    make_project(first)
    sh("git", "init", "-q", cwd=first)
    sh("dvc", "init", "-q", cwd=first)
    out = sh("dvc", "repro", "teacher-logits", cwd=first)
    assert "Running stage 'teacher-logits'" in out and "[teacher-logits] done" in out
    sh("dvc", "remote", "add", "-d", "team", str(remote), cwd=first)
    sh("dvc", "push", cwd=first)
    sh("git", "add", "-A", cwd=first)
    sh("git", "commit", "-q", "-m", "teacher logits", cwd=first)

    sh("git", "clone", "-q", str(first), str(second), cwd=tmp_path)
    assert not (second / STORE).exists()
    sh("dvc", "pull", "--with-deps", "teacher-logits", cwd=second)
    assert "up to date" in sh("dvc", "status", "--with-deps", "teacher-logits", cwd=second)
    pulled = snapshot(second)
    assert {k: v[0] for k, v in pulled.items()} == {k: v[0] for k, v in snapshot(first).items()}

    out = sh("dvc", "repro", "teacher-logits", cwd=second)
    assert "Stage 'teacher-logits' didn't change, skipping" in out
    assert "Running stage" not in out and "[teacher-logits]" not in out  # no stage ran, no teacher was built
    assert snapshot(second) == pulled  # same bytes, files untouched, metrics not rewritten
