"""`picosam-pipeline summary` on hand-written metrics, reports and resolved configs (no pipeline run), and the one
line `run-stage` ends a stage with (issue 32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.config import load_config
from picosam_pipeline.summary import WIDTH, format_summary, stage_line, summarize

METRICS = {
    "sample": {"annotations": 102, "bad_inputs": 11, "images": 18},
    "prepare": {"dropped": 21, "kept": 81},
    "teacher-logits@sam2": {
        "all_instances_empty": False,
        "bytes_per_instance": 4495.6,
        "confidence_mean": 0.5556,
        "instances": 81,
        "model": "sam2.1_hiera_tiny",
        "random_weights": True,
    },
    "pack": {"bytes_per_sample": 10492.8, "samples": 81},
    "train": {"val_iou_after": 0.5867, "val_iou_before": 0.3943},
    "evaluate": {
        "crop_map": 0.28,
        "crop_miou": 0.5867,
        "full_miou": 0.5876,
        "teacher": {"crop_map": 0.05, "crop_miou": 0.3732, "full_miou": 0.3757},
    },
    "quantize": {"crop_miou_drop": 0.00055, "int8_crop_miou": 0.5862, "int8_within_target": True},
    "export": {"fakequant_mask_agreement": 0.99499, "mctq_mask_agreement": 0.99121},
    "evaluate-int8": {"student_int8": {"crop_map": 0.279, "crop_miou": 0.5860, "full_miou": 0.5877}},
    "package": {"fits": True, "model_bytes": 1439552, "utilization": 0.4582},
}
FILES = {  # beside the stages' outputs: what the summary reads besides the metrics
    "data/prepared/config.resolved.json": {
        "prepare": {
            "splits": [
                {
                    "annotations": "data/datasets/sample/annotations/instances_train.json",
                    "images": "data/datasets/sample/train",
                },
                {
                    "annotations": "data/datasets/sample/annotations/instances_val.json",
                    "images": "data/datasets/sample/val",
                },
            ]
        }
    },
    "data/train/config.resolved.json": {
        "recipe": {"name": "picosam3", "size": "auto"},
        "train": {"student": "picosam3"},
    },
    "data/train/report.json": {"steps": 300, "best_step": 200, "val_iou_best": 0.6012},
    "data/quantize/report.json": {"metrics": {"max_miou_drop": 0.01}},
    "data/export/config.resolved.json": {"export": {"min_mask_agreement": 0.98}},
    "data/package/report.json": {"memory": {"used_bytes": 3844000, "available_bytes": 8388480}},
    "metrics/runs/teacher-logits@sam2.jsonl": {"instances_per_s": 0.557},
}


def write_project(root: Path, stages=METRICS, files=FILES) -> None:
    """Write ``stages``' metrics files and ``files`` under ``root``."""
    for stage, metrics in stages.items():
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / f"{stage}.json").write_text(json.dumps(metrics))
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data) + "\n")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("teachers:\n  sam2: {}\n")
    return tmp_path


def rows(summary) -> dict[str, str]:
    return {row.stage: row.result for row in summary.rows}


def test_every_stage_present(project):
    write_project(project)
    summary = summarize(load_config("params.yaml"))
    assert rows(summary) == {
        "sample": "18 images, 102 annotations (11 bad inputs planted)",
        "prepare": "81 instances kept, 21 dropped",
        "teacher-logits@sam2": "81 instances, 0.557 instances/s",
        "pack": "81 samples, 10.5 kB/sample",
        "train": "300 steps, val IoU 0.394 -> 0.601 (best step 200)",
        "evaluate": "crop mIoU student 0.587, teacher 0.373, INT8 0.586",
        "quantize": "INT8 drop 0.0006 crop mIoU, within target 0.01",
        "export": "checks ok; masks agree fakequant 99.5%, mctq 99.1%",
        "evaluate-int8": "INT8 (ONNX) crop mIoU 0.586",
        "package": "fits: 3.7 of 8.0 MiB (46%)",
    }
    assert (summary.dataset, summary.recipe) == ("sample", "picosam3 (sample)")
    text = format_summary(summary)
    assert "not run" not in text
    assert "sam2.1_hiera_tiny" in text and "student picosam3" in text


def test_stages_not_run_and_missing_details(project):
    """Only sample and prepare ran, and prepare's resolved config is gone: the rest read "not run"."""
    write_project(project, {k: METRICS[k] for k in ("sample", "prepare")}, files={})
    summary = summarize(load_config("params.yaml"))
    assert [r.stage for r in summary.rows if not r.ran] == [
        "teacher-logits@sam2",
        "pack",
        "train",
        "evaluate",
        "quantize",
        "export",
        "evaluate-int8",
        "package",
    ]
    assert summary.dataset == "sample"  # params' dataset.name when prepare's resolved config is missing
    text = format_summary(summary)
    assert "SMOKE TEST" not in text
    assert text.count("not run") == 8


def test_random_weights_banner_on_top(project):
    write_project(project)
    text = format_summary(summarize(load_config("params.yaml")))
    assert text.splitlines()[0].startswith("SMOKE TEST: teacher sam2 (sam2.1_hiera_tiny) had RANDOM WEIGHTS")
    real = {**METRICS, "teacher-logits@sam2": {**METRICS["teacher-logits@sam2"], "random_weights": False}}
    write_project(project, real)
    text = format_summary(summarize(load_config("params.yaml")))
    assert "SMOKE" not in text and "RANDOM" not in text


def test_every_line_fits_the_width(project):
    """Long names (a big teacher, several passes, an unknown metrics layout) wrap inside their column."""
    (project / "params.yaml").write_text("teachers:\n  sam2: {}\n  sam3_with_a_long_name: {model: sam3}\n")
    long_teacher = {**METRICS["teacher-logits@sam2"], "model": "sam2.1_hiera_base_plus_with_a_long_suffix"}
    odd = {"some_new_metric_of_a_later_version": 0.123456, "another": {"nested": "value that is rather long"}}
    write_project(project, {**METRICS, "teacher-logits@sam3_with_a_long_name": long_teacher, "pack": odd})
    summary = summarize(load_config("params.yaml"))
    assert rows(summary)["pack"].startswith("some_new_metric_of_a_later_version=0.1235, another.nested=")
    text = format_summary(summary)
    assert max(len(line) for line in text.splitlines()) <= WIDTH, text
    assert "RANDOM WEIGHTS" in " ".join(text.splitlines()[:2]), text  # the banner, wrapped


def test_summary_command_text_and_json(project):
    write_project(project)
    result = CliRunner().invoke(cli, ["summary"])
    assert result.exit_code == 0, result.output
    assert all(len(line) <= WIDTH for line in result.output.splitlines())
    data = json.loads(CliRunner().invoke(cli, ["summary", "--json", "--params", "params.yaml"]).output)
    assert data["random_weights"] == ["sam2 (sam2.1_hiera_tiny)"]
    assert data["rows"][0] == {
        "stage": "sample",
        "ran": True,
        "result": "18 images, 102 annotations (11 bad inputs planted)",
        "source": "dataset sample",
        "metrics": METRICS["sample"],
    }


@pytest.mark.parametrize(
    ("label", "returned", "words"),
    [
        (
            "sample",
            {"images": {"train": 12, "val": 6}, "annotations": {"train": 60, "val": 42}, "bad_inputs": 11},
            "18 images (train 12, val 6), 102 annotations, 11 bad inputs planted",
        ),
        (
            "prepare",
            {"kept": 81, "dropped": {"bad_image": 5, "tiny_roi": 16}, "index": "data/prepared/index.parquet"},
            "81 instances kept, 21 dropped (bad_image 5, tiny_roi 16) -> data/prepared/index.parquet",
        ),
        (
            "teacher-logits@sam2",
            {
                "instances": 81,
                "random_weights": True,
                "instances_computed": 81,
                "shards_computed": 2,
                "instances_per_s": 0.557,
                "store": "data/teacher/stores/sam2.zarr",
            },
            "81 instances (81 computed now, 0.557 instances/s), RANDOM WEIGHTS -> data/teacher/stores/sam2.zarr",
        ),
        (
            "pack",
            {"train": {"samples": 48, "shards": 1, "bytes_per_sample": 10453}},
            "train 48 samples in 1 shards, 10.5 kB/sample",
        ),
        (
            "train",
            {
                "steps": 300,
                "val_iou_before": 0.3943,
                "val_iou_after": 0.5867,
                "best": (300, 0.5867),
                "samples_per_s": None,
            },
            "300 steps, val IoU 0.394 -> 0.587 (best at step 300)",
        ),
        (
            "train",
            {"steps": 300, "val_iou_before": 0.3943, "val_iou_after": 0.55, "best": (200, 0.6), "samples_per_s": 812.3},
            "300 steps, val IoU 0.394 -> 0.550 (best 0.600 at step 200), 812.3 samples/s",
        ),
        ("train", {"rank": "worker"}, "worker rank done (rank 0 writes the outputs)"),
        (
            "evaluate",
            {"samples": 33, "crop_miou": {"student": 0.5867, "teacher": 0.3732}, "seconds": 4.2},
            "33 samples, crop mIoU student 0.587, teacher 0.373",
        ),
        (
            "quantize",
            {"student": "picosam3", "float_crop_miou": 0.5867, "int8_crop_miou": 0.5862, "seconds": 30.1},
            "picosam3 crop mIoU float 0.587 -> INT8 0.586 (drop 0.0005)",
        ),
        (
            "export",
            {"mctq": {"max_diff_steps": 2.0, "mask_agreement": 0.99121}},
            "mctq masks agree 99.12%, max diff 2.0 steps",
        ),
        (
            "package",
            {
                "crop": "roi",
                "fits": True,
                "used_bytes": 3844000,
                "available_bytes": 8388480,
                "utilization": 0.458,
                "converter_seconds": 41.2,
            },
            "fits: 3.7 of 8.0 MiB (46%), roi crops, converter 41.2 s",
        ),
        ("train", {"steps": 3, "note": "an older layout"}, "steps=3, note=an older layout"),
        ("new-stage", {"a": 1.234567, "b": {"c": [1, 2]}}, "a=1.235, b.c=[1, 2]"),
    ],
)
def test_stage_line(label, returned, words):
    assert stage_line(label, 854.84, returned) == f"[{label}] done in 854.8 s: {words}"


def test_an_untrained_student_is_said_on_top_and_in_its_row(project):
    untrained = {**METRICS, "train": {**METRICS["train"], "untrained": True}}
    write_project(project, untrained)
    text = format_summary(summarize(load_config("params.yaml")))
    assert any(line.startswith("UNTRAINED STUDENT:") for line in text.splitlines()[:4])
    assert "UNTRAINED (warnings" in " ".join(text.split()) and max(map(len, text.splitlines())) <= 100
    write_project(project)
    assert "UNTRAINED" not in format_summary(summarize(load_config("params.yaml")))
