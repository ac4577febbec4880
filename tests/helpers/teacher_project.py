"""A tiny project for the teacher tests: the repo's params.yaml in a temporary folder, the sample built and prepared.

The teacher reads only the val split: image 200001 (9 instances) and 200002 (7). With 4 instances per shard the
shards hold rows [0-3] [4-7] [8-11] [12-15]: image 200001 fills shards 0 and 1 and the first row of shard 2,
image 200002 the rest, so both images straddle the shard 2 boundary.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

from picosam_pipeline.config import Config, load_config
from picosam_pipeline.device import resolve_runtime
from picosam_pipeline.reports import last_run
from tests.helpers.paths import REPO

TINY = (
    "sample.train_images=1",
    "sample.plant_bad_inputs=false",
    "teacher.splits=[val]",
    "teacher.instances_per_shard=4",
    "teacher.executor=local",
    "teacher.allow_random_weights=true",
)
# The console script of the environment running the tests (what dvc.yaml's `cmd` calls).
BIN = Path(sys.executable).parent
CLI = str(BIN / "picosam-pipeline")


def tiny_project(root: Path, val_images: int = 2, *overrides: str) -> list[str]:
    """Write ``root/params.yaml`` (the repo's) and build ``root/data/datasets/sample`` and ``root/data/prepared``.

    Returns the ``--set`` overrides (``TINY`` + ``val_images`` + ``overrides``) the teacher runs should use;
    paths stay the relative defaults, so stages must run with ``root`` as the working directory.
    """
    from picosam_pipeline.stages import prepare, sample

    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    sets = [*TINY, f"sample.val_images={val_images}", *overrides]
    cwd = Path.cwd()
    os.chdir(root)
    try:
        cfg = load_config("params.yaml", sets)
        with contextlib.redirect_stderr(io.StringIO()):  # progress bars
            sample.run(cfg, resolve_runtime(cfg.runtime))
            prepare.run(cfg, resolve_runtime(cfg.runtime))
    finally:
        os.chdir(cwd)
    return sets


def config(root: Path, sets: list[str], *more: str) -> Config:
    """The config of the project at ``root`` (run it with ``root`` as the working directory)."""
    return load_config(root / "params.yaml", [*sets, *more])


def stage_figures(metrics_dir: Path) -> dict:
    """metrics/teacher-logits.json merged with the run log's facts of the latest run (rate, what was computed)."""
    return {**json.loads((metrics_dir / "teacher-logits.json").read_text()), **last_run(metrics_dir, "teacher-logits")}


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store except config.resolved.json (which names the out path and the executor)."""
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != "config.resolved.json"
    }
