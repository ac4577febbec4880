"""The one rule for every written path (``picosam_pipeline/written_paths.py``): a stage or command replaces only what
it wrote, never an input, another stage's output, the project's own files or the project root.

The five ways to lose data of issue 31 each have a test here (prediction file over params.yaml, a user's
``<out>.replaced``, user files named like the lock, evaluate-int8 over evaluate, the teacher's stores inside
another output or the project root), then the rule for every stage and for the commands that write files.
Every refusal happens before any work, so the stages run on the repo's params with nothing built.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from picosam_pipeline.config import load_config
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.outputs import StageOutput
from picosam_pipeline.written_paths import check_output_file, json_written_by
from tests.helpers.stage_outputs import OUT_KEY, PARAMS, make_project, run_stage, snapshot, stage_config

CLI = str(Path(sys.executable).parent / "picosam-pipeline")


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = make_project(tmp_path / "project")
    monkeypatch.chdir(root)
    return root


def _evaluation_folder(folder: str) -> Path:
    """A finished (empty) output of the evaluate stage at ``folder``, marker and all."""
    cfg = load_config(PARAMS, [f"evaluate.out_dir={folder}"])
    with StageOutput(cfg, "evaluate", "evaluate.out_dir", folder, sections=["evaluate"], inputs={}):
        pass
    return Path(folder)


# --------------------------------------------------------------------------------------------------
# the five cases


@pytest.mark.parametrize("target", ["params.yaml", "data/prepared/index.parquet"])
def test_evaluate_never_writes_its_predictions_over_params_or_an_input(project, target):
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_bytes(b"precious")
    before = snapshot(project)
    cfg = stage_config("evaluate", "data/evaluate", f"evaluate.write_predictions={target}")
    with pytest.raises(PipelineError, match=rf"evaluate.write_predictions: '{target}' is not inside evaluate.out_dir"):
        run_stage("evaluate", cfg)
    assert snapshot(project) == before  # no predictions, no .crop.yaml beside it


def test_the_cli_refuses_predictions_over_params_yaml_in_one_paragraph(project):
    (project / "params.yaml").write_text(PARAMS.read_text())
    before = snapshot(project)
    proc = subprocess.run(
        [CLI, "run-stage", "evaluate", "--set", "evaluate.write_predictions=params.yaml"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "evaluate.write_predictions: 'params.yaml' is not inside evaluate.out_dir" in proc.stderr
    assert snapshot(project) == before


def test_a_users_replaced_folder_is_neither_deleted_nor_renamed_into_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = stage_config("sample", "v")
    user = tmp_path / "v.replaced"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(PipelineError, match=r"v.replaced is in the place .* not an output this stage wrote"):
        run_stage("sample", cfg)  # no output yet: the user's folder must not become the output
    assert (user / "thesis.tex").read_text() == "years of work" and not (tmp_path / "v").exists()

    user.rename(tmp_path / "aside")
    run_stage("sample", cfg)  # an earlier output of the stage's own
    (tmp_path / "aside").rename(user)
    output = snapshot(tmp_path / "v")
    with pytest.raises(PipelineError, match=r"v.replaced is in the place"):
        run_stage("sample", cfg)  # with one: the user's folder must not be deleted as a killed publish's leftover
    assert (user / "thesis.tex").read_text() == "years of work" and snapshot(tmp_path / "v") == output


@pytest.mark.parametrize("suffix", [".stage-lock", ".stage-lock.holder"])
@pytest.mark.parametrize("content", [b"my notes\n", b'{"pid": 1}\n', b""])
def test_user_files_named_like_the_lock_are_refused_not_deleted(tmp_path, monkeypatch, suffix, content):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / f"v{suffix}"
    mine.write_bytes(content)
    if not content:  # an empty lock file is a run's for a moment after it creates it; an old one is not
        os.utime(mine, (1, 1))
    with pytest.raises(PipelineError, match=re.escape(f"v{suffix}") + " .*not written by this pipeline"):
        run_stage("sample", stage_config("sample", "v"))
    assert mine.read_bytes() == content and not (tmp_path / "v").exists()


def test_evaluate_int8_never_replaces_the_evaluate_stages_folder(project):
    with pytest.raises(PipelineError, match=r"evaluate.int8_out_dir: 'data/evaluate' is evaluate.out_dir"):
        run_stage("evaluate-int8", stage_config("evaluate-int8", "data/evaluate"))
    # evaluate's folder from an earlier run with other params: both read the evaluate section, its marker names
    # the stage that wrote it
    folder = _evaluation_folder("old-evaluation")
    before = snapshot(folder)
    with pytest.raises(PipelineError, match=r"holds \['config.resolved.json'\], which stage evaluate-int8 did not"):
        run_stage("evaluate-int8", stage_config("evaluate-int8", "old-evaluation"))
    assert snapshot(folder) == before
    assert json.loads(before["config.resolved.json"])["_output"] == {
        "stage": "evaluate",
        "key": "evaluate.out_dir",
        "path": "old-evaluation",
    }


@pytest.mark.parametrize(
    ("stores_dir", "said"),
    [
        ("data/prepared", r"teacher.stores_dir: 'data/prepared' is prepare.out_dir \('data/prepared'\)"),
        ("data/shards/train", r"teacher.stores_dir: 'data/shards/train' lies inside pack.out_dir"),
        (".", r"teacher.stores_dir: '.' is the project folder"),
    ],
)
def test_teacher_stores_never_land_in_another_output_or_the_project_root(project, stores_dir, said):
    before = snapshot(project)
    cfg = load_config(PARAMS, [f"teacher.stores_dir={stores_dir}", "runtime.device=cpu"]).teacher_pass("sam2")
    with pytest.raises(PipelineError, match=said):
        run_stage("teacher-logits", cfg)
    assert snapshot(project) == before and sorted(p.name for p in project.iterdir()) == sorted(
        [".git", "dvc.yaml", "params.yaml", "notes.txt"]
    )


def test_a_stage_never_writes_into_another_stages_output_found_on_disk(project):
    """An output written under other params is still another stage's: its marker says so."""
    _evaluation_folder("evaluations/first")
    cfg = load_config(PARAMS, ["teacher.stores_dir=evaluations/first/stores", "runtime.device=cpu"])
    with pytest.raises(PipelineError, match=r"lies inside .*evaluations/first, the output of stage evaluate"):
        run_stage("teacher-logits", cfg.teacher_pass("sam2"))
    assert not (project / "evaluations/first/stores").exists()


# --------------------------------------------------------------------------------------------------
# the rule for every stage


@pytest.mark.parametrize("stage", list(OUT_KEY))
def test_every_stage_refuses_project_files_and_another_stages_folder(stage, project):
    key = OUT_KEY[stage]
    before = snapshot(project)
    cases = {
        "params.yaml": "is the project's own params.yaml",
        ".git/objects": r"lies inside the project's \.git/",
        "metrics": r"is runtime.metrics_dir \('metrics'\)",
        "metrics/x": "lies inside runtime.metrics_dir",
    }
    if stage != "package":
        cases["data/package"] = r"is package.out_dir \('data/package'\), which stage package writes"
    more = ["train.state_dir=state"] if stage == "train" else []  # else <out>.state is refused first
    for out, said in cases.items():
        with pytest.raises(PipelineError, match=f"{key}: '{out}' {said}"):
            run_stage(stage, stage_config(stage, out, *more))
    assert snapshot(project) == before


def test_the_metrics_folder_may_not_be_the_project_or_another_output(project):
    for folder, said in ((".", "is the project folder"), ("data/prepared", "is prepare.out_dir")):
        cfg = stage_config("sample", "v", f"runtime.metrics_dir={folder}")
        with pytest.raises(PipelineError, match=f"runtime.metrics_dir: '{folder}' {said}"):
            run_stage("sample", cfg)


# --------------------------------------------------------------------------------------------------
# the commands' files


def test_check_output_file_refuses_inputs_links_project_files_and_foreign_files(project):
    (project / "photo.jpg").write_bytes(b"jpeg")
    (project / "photo-link.jpg").hardlink_to(project / "photo.jpg")
    (project / "other.json").write_text("{}")
    args = {"recognise": lambda path: json_written_by(path, "score-predictions"), "what": "JSON report"}
    cases = {
        "photo.jpg": "is the input --image",
        "photo-link.jpg": "is the input --image",  # the same file under another name
        "params.yaml": "is the project's own params.yaml",
        "dvc.lock": "is the project's own dvc.lock",
        ".": "is the project folder",
        "other.json": "exists and is not a JSON report written by score-predictions",
    }
    for path, said in cases.items():
        with pytest.raises(PipelineError, match=f"--json-out: '{path}' {said}"):
            check_output_file("score-predictions", "--json-out", path, inputs={"--image": "photo.jpg"}, **args)
    (project / "ours.json").write_text(json.dumps({"written_by": "picosam-pipeline score-predictions"}))
    check_output_file("score-predictions", "--json-out", "ours.json", **args)  # its own file: replaced
    check_output_file("score-predictions", "--json-out", "new/report.json", **args)
    _evaluation_folder("data/evaluate")
    with pytest.raises(PipelineError, match="lies inside .*data/evaluate, the output of stage evaluate"):
        check_output_file("score-predictions", "--json-out", "data/evaluate/scores.json", **args)


def test_score_predictions_json_out_never_overwrites_its_annotations(project):
    (project / "ann.json").write_text('{"images": []}')
    (project / "preds.json").write_text("[]")
    before = snapshot(project)
    for out in ("ann.json", "preds.json", "params.yaml"):
        proc = subprocess.run(
            [CLI, "score-predictions", "--annotations", "ann.json", "--predictions", "preds.json"]
            + ["--protocol", "picosam3-roi", "--json-out", out],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and "--json-out" in proc.stderr, proc.stderr
    assert snapshot(project) == before


class _EmptyModel:
    """A crop model answering "nothing here" (logits -10 everywhere)."""

    name, input_size, crop = "empty", 96, None

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return np.full((rgb.shape[0], 1, 96, 96), -10.0, dtype=np.float32)


def test_predict_replaces_only_its_own_pngs(project):
    from picosam_pipeline.evaluate.predict import predict_to_files

    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(project / "photo.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(project / "holiday.png")
    before = snapshot(project)
    run = {"box": (10.0, 10.0, 20.0, 20.0), "model_path": "model.pt"}
    for mask, said in (
        ("photo.png", "is the input --image"),
        ("holiday.png", "exists and is not a PNG written by predict"),
        ("model.pt", "is the input --model"),
        ("params.yaml", "is the project's own params.yaml"),
    ):
        with pytest.raises(PipelineError, match=f"--out: '{mask}' {said}"):
            predict_to_files(_EmptyModel(), "photo.png", mask, None, **run)
    with pytest.raises(PipelineError, match="--out and --overlay both name"):
        predict_to_files(_EmptyModel(), "photo.png", "m.png", "m.png", **run)
    assert snapshot(project) == before
    predict_to_files(_EmptyModel(), "photo.png", "mask.png", "overlay.png", **run)
    predict_to_files(_EmptyModel(), "photo.png", "mask.png", "overlay.png", **run)  # a rerun replaces its own files
    assert Image.open("mask.png").info["Software"] == "picosam-pipeline predict"


def test_params_schema_writes_its_own_file_only(project):
    proc = subprocess.run([CLI, "params-schema", "-o", "params.yaml"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "is the project's own params.yaml" in proc.stderr, proc.stderr
    assert (project / "params.yaml").read_text() == "{}\n"
    for _ in range(2):  # the default file, then again over its own
        proc = subprocess.run([CLI, "params-schema"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    (project / "notes.json").write_text('{"mine": 1}')
    proc = subprocess.run([CLI, "params-schema", "-o", "notes.json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not a params JSON Schema written by params-schema" in proc.stderr


def test_an_output_of_an_earlier_version_is_recognised_by_the_param_it_records(project):
    """Markers without the ``_output`` record (written before it existed): the folder is the stage's when the param
    it records is this path, so evaluate's old folder is still not evaluate-int8's."""
    folder = _evaluation_folder("data/evaluate")
    marker = json.loads((folder / "config.resolved.json").read_text())
    del marker["_output"]
    (folder / "config.resolved.json").write_text(json.dumps(marker))
    owner = {"evaluate": ("evaluate.out_dir", True), "evaluate-int8": ("evaluate.int8_out_dir", False)}
    from picosam_pipeline.outputs import is_own_folder
    from picosam_pipeline.written_paths import Owner

    for stage, (key, ours) in owner.items():
        assert is_own_folder(folder, Owner(stage, key, "data/evaluate"), ["evaluate"]) is ours


def test_export_teacher_never_puts_its_cache_in_the_project_or_a_stage_output(project):
    from picosam_pipeline.teacher.sam2_onnx import export_teacher

    _evaluation_folder("data/evaluate")
    for folder, said in ((".", "is the project folder"), ("data/evaluate/onnx", "lies inside .*the output of stage")):
        with pytest.raises(PipelineError, match=f"teacher.onnx_dir: '{folder}' {said}"):
            export_teacher(load_config(PARAMS, [f"teacher.onnx_dir={folder}"]).teacher, None)
    assert sorted(p.name for p in (project / "data/evaluate").iterdir()) == ["config.resolved.json"]
