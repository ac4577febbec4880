"""Running one stage in-process on the repo's params with its output moved (tests of what stages write)."""

from __future__ import annotations

from pathlib import Path

from picosam_pipeline.config import load_config
from picosam_pipeline.stages import STAGES
from tests.helpers.paths import REPO

PARAMS = REPO / "params.yaml"

# Each stage's output param.
OUT_KEY = {
    "sample": "sample.out_dir",
    "prepare": "prepare.out_dir",
    "teacher-logits": "teacher.out",
    "pack": "pack.out_dir",
    "train": "train.out_dir",
    "evaluate": "evaluate.out_dir",
    "quantize": "quantize.out_dir",
    "export": "export.out_dir",
    "package": "package.out_dir",
    "evaluate-int8": "evaluate.int8_out_dir",
}

# the sample stage anywhere but the dataset folder (dataset.name sample ties them), small and without bad inputs
SMALL_SAMPLE = (
    "dataset.name=coco2017",
    "sample.plant_bad_inputs=false",
    "sample.train_images=2",
    "sample.val_images=1",
)


def stage_config(stage: str, out: str, *more: str):
    return load_config(
        PARAMS,
        [
            f"{OUT_KEY[stage]}={out}",
            "runtime.metrics_dir=metrics",
            "runtime.device=cpu",
            *(SMALL_SAMPLE if stage == "sample" else ()),
            *more,
        ],
    )


def run_stage(stage: str, cfg) -> dict:
    return STAGES[stage].load()(cfg, None)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_project(root: Path) -> Path:
    """A project-like folder (dvc.yaml, params.yaml, .git) with a file of the user's in it."""
    (root / ".git").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("{}\n")
    (root / "notes.txt").write_text("mine")
    return root
