"""Sharing the pipeline's outputs through a DVC remote, by the README's recipe word for word.

The commands come from the README's sharing block (``<!-- sharing-recipe ... -->``), so the test fails when the
README changes without it. In a temporary git repository holding this project's dvc.yaml, code and params.yaml
(trimmed to one train and one val image, a few training steps): ``dvc repro`` (the whole pipeline), then your
commands; a teammate's clone runs theirs and ``dvc repro`` there must run no stage and leave ``dvc status``
clean. Then ``dvc exp run`` with other training steps and back restores ``train`` from DVC's run cache.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from teacher_project import BIN, REPO

pytestmark = pytest.mark.slow

RECIPE_MARK = "<!-- sharing-recipe:"
README_REMOTE = "/shared/picosam-dvc"
STORE = Path("data/teacher/logits.zarr")


def sh(*args: str, cwd: Path) -> str:
    """Run a command (``dvc`` and ``picosam-pipeline`` from the test's environment first on PATH); its output."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def recipe() -> tuple[list[list[str]], list[list[str]]]:
    """The README's sharing commands: (yours, the teammate's), each split as a shell would, comments dropped."""
    text = (REPO / "README.md").read_text()
    assert RECIPE_MARK in text, "the README lost its sharing-recipe block"
    start = text.index("```bash\n", text.index(RECIPE_MARK)) + len("```bash\n")
    block = text[start : text.index("```", start)]
    yours: list[list[str]] = []
    theirs: list[list[str]] = []
    current = yours
    for line in block.splitlines():
        if line.startswith("# a teammate"):
            current = theirs
            continue
        words = shlex.split(line, comments=True)
        if words:
            current.append(words)
    return yours, theirs


def make_project(root: Path) -> None:
    """This project's pipeline files and code in ``root``, with params trimmed to a two-image sample."""
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    for package in ("picosam_pipeline", "stages"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample"].update(train_images=1, val_images=1, plant_bad_inputs=False)
    params["teacher"].update(instances_per_shard=8, executor="local", allow_random_weights=True)
    params["train"].update(steps=4, warmup_steps=1, eval_every=4, log_every=2, checkpoint_every=2)
    params["evaluate"].update(grid_samples=2)
    params["quantize"].update(representative_batches=2, probe_samples=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def outputs(root: Path) -> dict[str, bytes]:
    """Bytes of every file of the teacher store and of every metrics file."""
    files = [f for f in sorted((root / STORE).rglob("*")) if f.is_file()]
    files += sorted((root / "metrics").glob("*.json"))
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


def test_the_readme_recipe_restores_every_stage_in_a_teammates_clone(tmp_path):
    yours, theirs = recipe()
    origin, first, second, remote = (tmp_path / n for n in ("origin.git", "first", "second", "remote"))
    sh("git", "init", "-q", "--bare", str(origin), cwd=tmp_path)
    make_project(first)
    sh("git", "init", "-q", cwd=first)
    sh("dvc", "init", "-q", cwd=first)
    sh("git", "add", "-A", cwd=first)
    sh("git", "commit", "-q", "-m", "project", cwd=first)
    sh("git", "remote", "add", "origin", str(origin), cwd=first)
    sh("git", "push", "-q", "-u", "origin", "HEAD", cwd=first)
    sh("git", "clone", "-q", str(origin), str(second), cwd=tmp_path)  # the teammate's clone, before any output

    out = sh("dvc", "repro", cwd=first)
    assert "Running stage 'package'" in out
    for words in yours:
        sh(*[str(remote) if w == README_REMOTE else w for w in words], cwd=first)
    # Nothing else was committed: the recipe's `git add` is all it takes.
    assert sh("git", "status", "--porcelain", "--untracked-files=no", cwd=first).strip() == ""

    said = [sh(*words, cwd=second) for words in theirs]
    assert "Running stage" not in said[-1] and "[teacher-logits]" not in said[-1], said[-1]
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=second)
    assert outputs(second) == outputs(first)

    # dvc exp run to other training steps and back: `train` comes back from the run cache, not retrained.
    changed = sh("dvc", "exp", "run", "-S", "train.steps=2", "train", cwd=first)
    assert "Running stage 'train'" in changed
    back = sh("dvc", "exp", "run", "-S", "train.steps=4", "train", cwd=first)
    assert "Running stage 'train'" not in back and "[train]" not in back, back
    assert "is cached" in back
