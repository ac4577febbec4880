"""`dvc exp show` compares experiments by the headline metrics, and `dvc plots show` renders every plot (issue 14).

A tiny DVC project (a temporary git repository) holds this project's code and the `train` and `evaluate` stages of
its dvc.yaml with the top-level plots they feed, over shards packed from the built-in sample with the GT-mask
stand-in teacher (``pipeline_inputs.build_inputs``: no SAM2 pass). ``dvc repro``, then ``dvc exp run -S
train.steps=...`` and ``dvc exp run -S train.student=picosam2``: ``dvc exp show --json`` must hold only the headline
metrics (named as the stages write them), ``dvc exp show --only-changed`` must fit a 160-column terminal, and ``dvc
plots show`` must list every plot (its rendering in a browser: ``scripts/render_plots.py``, run here when Chromium
and the Vega scripts are at hand).

An experiment and back (issue 29): the same project plus the package stage, ``dvc repro``, other params, ``dvc
repro``, then the baseline's params, lock and metrics from git: ``dvc checkout`` must restore every output from the
cache, byte for byte, and leave ``dvc status`` clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers.paths import load_script
from tests.helpers.pipeline_inputs import tiny_export
from tests.helpers.teacher_project import BIN, REPO

pytestmark = pytest.mark.slow

STAGES = ("train", "evaluate")
# The plots of dvc.yaml whose data the two stages write (the quantize stage's float-vs-INT8 plot is not run here).
PLOTS = (
    "train_loss",
    "train_lambda",
    "train_lr",
    "train_val_iou",
    "iou_histogram",
    "by_size",
    "by_category",
    "iou_vs_area",
    "student_vs_teacher",
    "teacher_confidence",
)
HEADLINE = {
    "metrics/train.json": {"val_iou_before", "val_iou_after", "untrained"},
    "metrics/train/metrics.json": {"step", "loss"},
    "metrics/evaluate.json": {f"{m}{k}" for m in ("", "teacher.") for k in ("crop_miou", "crop_map", "full_miou")}
    | {"baseline.crop_miou"},
}


def sh(*args: str, cwd: Path, columns: int = 400) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "COLUMNS": str(columns),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def make_project(root: Path, sample: Path, stages: tuple[str, ...] = STAGES) -> None:
    """Code, ``stages`` (train + evaluate, and package if named) and their plots, params pointing at packed sample
    shards (a copy of ``sample``, the session's build_inputs folder) and, for package, a tiny network's export (paths
    relative)."""
    root.mkdir()
    inputs = root / "inputs"
    # sample/, prepared/, stores/, shards/: build_inputs + run_pack; not its metrics (prepare's and pack's: not
    # stages of this project) nor the session's student
    shutil.copytree(sample, inputs, ignore=shutil.ignore_patterns("metrics", "student.pt"))
    if "package" in stages:
        tiny_export(inputs)
        shutil.rmtree(inputs / "quantize")  # the export's own input, not one of the package stage
        shutil.rmtree(inputs / "metrics")  # export's: not a stage of this project
    shutil.copy(
        REPO / ".gitignore", root / ".gitignore"
    )  # the run logs (metrics/runs/) and train's state stay out of git
    for package in ("picosam_pipeline", "stages"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc" / "plots", root / "dvc_plots")  # our templates (moved in after `dvc init`)
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in ("check-params", *stages)}  # every stage needs it
    pipeline["plots"] = [p for p in pipeline["plots"] if isinstance(p, str) or next(iter(p)) in PLOTS]
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # recipe custom (PicoSAM3's values written out), so that `-S train.student=picosam2` is a legal experiment on
    # these ROI shards; under recipe picosam3 that pair is refused, rightly
    params["recipe"]["name"] = "custom"
    params["teacher"]["prompt"] = "roi"
    params["train"].update(
        shards="inputs/shards",
        steps=2,
        warmup_steps=1,
        eval_every=2,
        log_every=1,
        checkpoint_every=2,
        batch_size=8,
        student="picosam3",
        grad_clip=1.0,
        lambda_mode="confidence_batch_mean",
        temperature=0.2,
        area_weight=0.4,
    )
    params["evaluate"].update(shards="inputs/shards/val", index="inputs/prepared/index.parquet", grid_samples=3)
    params["package"].update(export_dir="inputs/export")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def commit(root: Path, message: str) -> None:
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message, cwd=root)


def init_project(root: Path, sample: Path, stages: tuple[str, ...] = STAGES) -> None:
    """:func:`make_project` as a git repository with DVC, committed."""
    make_project(root, sample, stages)
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    shutil.move(root / "dvc_plots", root / ".dvc" / "plots")
    commit(root, "project")


def flat(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out |= flat(value, f"{name}.") if isinstance(value, dict) else {name}
    return out


@pytest.fixture(scope="module")
def sample(sample_shards) -> Path:
    """The session's build_inputs folder with its shards (read-only: projects copy it)."""
    return sample_shards.parent


def test_exp_show_compares_two_experiments_by_headline_metrics(sample, tmp_path):
    root = tmp_path / "project"
    init_project(root, sample)
    sh("dvc", "repro", cwd=root)
    commit(root, "baseline")

    sh("dvc", "exp", "run", "-n", "longer", "-S", "train.steps=3", cwd=root)
    sh("dvc", "exp", "run", "-n", "pico2", "-S", "train.student=picosam2", cwd=root)
    table = json.loads(sh("dvc", "exp", "show", "--json", cwd=root))
    rows = {
        e.get("name") or e["rev"]: e["data"]
        for row in table
        for e in [row] + [x for x in row.get("experiments") or [] for x in x["revs"]]
    }
    assert {"workspace", "longer", "pico2"} <= set(rows), table
    for name, data in rows.items():  # the baseline, both experiments, the workspace: only the headline columns
        columns = {f: flat(d["data"]) for f, d in data["metrics"].items()}
        assert columns == HEADLINE, (name, columns)
    longer, pico2 = rows["longer"], rows["pico2"]
    assert pico2["params"]["params.yaml"]["data"]["train"]["student"] == "picosam2"
    assert longer["params"]["params.yaml"]["data"]["train"]["steps"] == 3
    assert (
        pico2["metrics"]["metrics/evaluate.json"]["data"]["crop_miou"]
        != longer["metrics"]["metrics/evaluate.json"]["data"]["crop_miou"]
    )

    # The table a person reads, at its natural width (a wide COLUMNS lets rich lay it out without squeezing): the
    # changed params and headline metrics, and DVC's column of each changed dependency's hash (here evaluate's
    # data/train/student.pt), which --drop '^data/' hides. That one must fit a 160-column terminal.
    def width(*options: str) -> tuple[int, str]:
        text = sh("dvc", "exp", "show", "--only-changed", "--no-pager", *options, cwd=root, columns=1000)
        return max(len(line.rstrip()) for line in text.splitlines()), text

    full, text = width()
    narrow, shown = width("--drop", "^data/")
    print(f"dvc exp show --only-changed: {full} columns; with --drop '^data/': {narrow}\n{text}")
    for column in ("train.steps", "train.student", "val_iou_after", "crop_miou", "loss"):
        assert column in shown, shown
    assert narrow <= 160, shown

    shown = sh("dvc", "plots", "show", "--json", cwd=root)
    plots = json.loads(shown)["data"]
    ids = set(plots)
    assert {p for p in PLOTS} <= ids and "data/evaluate/grid.png" in ids, ids
    # dvclive's files also get a plot each: against the logged step (10, 20, ...), not the row number DVC would use
    # (`picosam-pipeline plots` leaves these out: the train_* plots draw the same files)
    live = [k for k in plots if k.startswith("metrics/train/")]
    assert live, ids
    for name in live:
        content = plots[name][0]["content"]
        drawn = [row[content["encoding"]["x"]["field"]] for row in content["data"]["values"]]
        assert drawn == [line.split("\t")[0] for line in (root / name).read_text().splitlines()[1:]], name
    render = load_script("render_plots")
    try:
        marks = render.check(root, tmp_path / "render", None)
    except render.Unavailable as why:
        pytest.skip(f"dvc exp show checked; the browser rendering cannot run here: {why}")
    empty = [k for k, n in marks.items() if n == 0]
    assert not empty and set(PLOTS) <= set(marks), marks


PER_MACHINE = ("data/train.state/", "metrics/runs/")  # train's resumable state and the run logs: git-ignored


def outputs(root: Path) -> dict[str, bytes]:
    """Bytes of every file the stages write: their DVC outputs under data/ and the metrics and plots in git."""
    files = [f for folder in ("data", "metrics") for f in sorted((root / folder).rglob("*")) if f.is_file()]
    named = {str(f.relative_to(root)): f for f in files}
    return {name: f.read_bytes() for name, f in named.items() if not name.startswith(PER_MACHINE)}


def test_an_experiment_and_back_restores_every_output_from_the_cache(sample, tmp_path):
    """train and evaluate (as above: seconds on the packed sample) and package, on a tiny network's export so that its
    converter takes ~20 s a run (a student through quantize and export would take minutes). The experiment changes
    a param of each stage, so that each writes another output, then goes back."""
    root = tmp_path / "project"
    init_project(root, sample, STAGES + ("package",))
    sh("dvc", "repro", cwd=root)
    commit(root, "baseline")
    baseline = outputs(root)
    assert any(name.startswith("data/package/") for name in baseline), sorted(baseline)

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["steps"] = 3
    params["evaluate"]["grid_samples"] = 2  # evaluate's own: train's best checkpoint may stay the step-2 one
    params["package"]["input_persistency"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = sh("dvc", "repro", cwd=root)
    assert all(f"Running stage '{stage}'" in ran for stage in STAGES + ("package",)), ran
    changed = {
        name.split("/")[1]
        for name, data in outputs(root).items()
        if name.startswith("data/") and baseline.get(name) != data
    }
    assert {"train", "evaluate", "package"} <= changed, changed

    sh("git", "checkout", "--", "params.yaml", "dvc.lock", "metrics", cwd=root)
    restored = sh("dvc", "checkout", cwd=root)
    assert "failed" not in restored.lower(), restored
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=root)
    assert outputs(root) == baseline
    assert sh("git", "status", "--porcelain", cwd=root).strip() == ""
