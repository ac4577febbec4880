"""Evaluation: per-sample scores and reports from in-memory batches, the qualitative grid, LVIS from annotations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from picosam_pipeline.config import EvaluateConfig, LvisEvalConfig
from picosam_pipeline.data.index import read_index
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.crop_metrics import gt_crop
from picosam_pipeline.evaluate.lvis import evaluate_annotations
from picosam_pipeline.evaluate.plots import category_bars, iou_histogram, iou_vs_area, size_bars, student_vs_teacher
from picosam_pipeline.evaluate.predict import crop_rgb
from picosam_pipeline.evaluate.prediction_scoring import score_predictions
from picosam_pipeline.evaluate.report import GridPool, crop_prompt, draw_grid, errors_overlay
from picosam_pipeline.evaluate.score_table import (
    InstanceGT,
    category_report,
    evaluate_batches,
    evaluation_report,
    format_score_table,
)
from picosam_pipeline.stages import evaluate as evaluate_stage
from picosam_pipeline.train.checkpoints import load_student
from tests.helpers.paths import shared_data_or_skip

S = 96


class RedChannelModel:
    """A stand-in student: foreground (logit +5) where the crop's red channel is > 0.5, else -5."""

    name = "red-channel"
    input_size = S

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        self.inputs.append(rgb)
        return np.where(rgb[:, :1] > 0.5, 5.0, -5.0).astype(np.float32)


def _rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def _rect(shape: tuple[int, int], y1: int, y2: int, x1: int, x2: int) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


@pytest.fixture()
def batch_and_gt():
    """Three samples on a 200x200 image, crop box (0, 0, 96, 96): crop pixel = image pixel, so IoUs are countable.

    0: object rows 10:30, cols 80:120 (800 px, 320 inside the crop); student = the 320 px, teacher = rows 10:20.
    1: object entirely outside the crop (empty GT crop); student predicts nothing, teacher one pixel.
    2: as 0 but annotated area 20000 (COCO "large").
    """
    full = [
        _rect((200, 200), 10, 30, 80, 120),
        _rect((200, 200), 150, 160, 150, 160),
        _rect((200, 200), 10, 30, 80, 120),
    ]
    gt_crops = np.stack([m[:S, :S] for m in full])[:, None].astype(np.float32)
    image = np.zeros((3, 3, S, S), dtype=np.float32)
    image[:, 0] = gt_crops[:, 0]  # the red channel carries the student's answer
    teacher = np.full((3, 1, S, S), -4.0, dtype=np.float32)
    teacher[0, 0, 10:20, 80:96] = teacher[2, 0, 10:20, 80:96] = 4.0
    teacher[1, 0, 50, 50] = 4.0
    batch = {
        "image": image,
        "gt_mask": gt_crops,
        "teacher_logits": teacher,
        "ann_id": np.array([11, 12, 13]),
        "image_id": np.array([7, 7, 7]),
        "category_id": np.array([1, 2, 1]),
        "area": np.array([800.0, 100.0, 20000.0]),
        "crop_box": np.tile([0, 0, S, S], (3, 1)),
    }
    gt = InstanceGT([11, 12, 13], [_rle(m) for m in full], [200] * 3, [200] * 3, ["cat", "dog", "cat"], "test")
    return batch, gt


# --------------------------------------------------------------------------------------------------
# scores and reports


def test_batch_scores_crop_and_full_image_iou_per_model(batch_and_gt):
    batch, gt = batch_and_gt
    table, timing = evaluate_batches([batch], {"student": RedChannelModel()}, gt)
    assert table.models == ["student", "teacher"] and len(table) == 3
    np.testing.assert_allclose(table["student_iou"], [1.0, 1.0, 1.0])  # sample 1: empty GT and empty answer = 1
    np.testing.assert_allclose(table["teacher_iou"], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(table["student_full_iou"], [320 / 800, 0.0, 320 / 800])  # 60 % of the object is outside
    np.testing.assert_allclose(table["teacher_full_iou"], [160 / 800, 0.0, 160 / 800])
    np.testing.assert_array_equal(table["gt_nonempty"], [True, False, True])
    assert list(table["category"]) == ["cat", "dog", "cat"] and set(timing["model_seconds"]) == {"student"}

    report = evaluation_report(table)
    student, teacher = report["student"], report["teacher"]
    assert student["crop_miou"] == 1.0 and student["crop_success_map_50_95"] == 1.0
    assert teacher["crop_miou"] == pytest.approx(1 / 3)
    assert teacher["crop_success_map_50_95"] == pytest.approx(0.1)  # IoU 0.5 passes only t = 0.50; sample 1 not counted
    assert student["full_image_miou"] == pytest.approx(0.8 / 3)
    assert list(student["by_size"]) == ["small", "large"]
    assert teacher["by_size"]["small"] == {
        "samples": 2,
        "gt_nonempty": 1,
        "crop_miou": 0.25,
        "crop_success_map_50_95": pytest.approx(0.1),
        "full_image_miou": 0.1,
    }
    assert "not COCO AP" in format_score_table(report, ["student", "teacher"])


def test_plot_rows_histogram_shares_and_size_bars(batch_and_gt):
    batch, gt = batch_and_gt
    table, _ = evaluate_batches([batch], {"student": RedChannelModel()}, gt)
    hist = {(r["bin"], r["model"]): r["share"] for r in iou_histogram(table)}  # long format: one row per bin and model
    assert len(hist) == 40 and ("0.00-0.05", "student") in hist and ("0.95-1.00", "teacher") in hist
    assert sum(v for (_, m), v in hist.items() if m == "student") == pytest.approx(1.0)
    assert hist["0.95-1.00", "student"] == 1.0  # IoU 1.0: last bin
    assert hist["0.00-0.05", "teacher"] == pytest.approx(1 / 3) and hist["0.50-0.55", "teacher"] == pytest.approx(2 / 3)
    bars = size_bars(evaluation_report(table), ["student", "teacher"])
    assert [(b["size"], b["model"]) for b in bars] == [
        ("small", "student"),
        ("large", "student"),
        ("small", "teacher"),
        ("large", "teacher"),
    ]
    by_category = {m: category_report(table, m) for m in table.models}
    cats = category_bars(table, by_category)
    assert {(c["category"], c["model"]) for c in cats} == {
        (c, m) for c in by_category["student"] for m in ("student", "teacher")
    }
    area = iou_vs_area(table)
    assert len(area) == 2 * len(table) and {r["model"] for r in area} == {"student", "teacher"}
    pairs = student_vs_teacher(table)
    assert [(r["student_iou"], r["teacher_iou"]) for r in pairs] == [
        (round(float(s), 6), round(float(t), 6)) for s, t in zip(table["student_iou"], table["teacher_iou"])
    ]


def test_shards_from_another_index_are_an_error(batch_and_gt):
    batch, _ = batch_and_gt
    other = InstanceGT([99], [_rle(np.zeros((4, 4)))], [4], [4], ["x"], "other.parquet")
    with pytest.raises(PipelineError, match="not in the instance index other.parquet"):
        evaluate_batches([batch], {"student": RedChannelModel()}, other)


def test_protocol_is_read_off_the_crop_boxes():
    roi = np.array([[0, 0, 10, 10], [5, 5, 20, 20]])
    point = np.array([[0, 0, 96, 96], [5, 5, 20, 20]])
    gt = InstanceGT([1, 2], ["", ""], [1, 1], [1, 1], ["a", "b"], "t", {"picosam3-roi": roi, "picosam2-point": point})
    assert gt.protocol_of(np.array([2, 1]), roi[::-1]) == "picosam3-roi"
    assert gt.protocol_of(np.array([1]), point[:1]) == "picosam2-point"
    assert gt.protocol_of(np.array([1]), np.array([[1, 1, 2, 2]])) is None


# --------------------------------------------------------------------------------------------------
# qualitative grid


def _sample(i: int, iou: float, with_int8: bool) -> dict:
    logits = {"student": np.zeros((S, S), np.float32), "teacher": np.ones((S, S), np.float32)}
    if with_int8:
        logits["student_int8"] = np.zeros((S, S), np.float32)
    return {
        "image": np.full((S, S, 3), i % 255, np.uint8),
        "gt": np.eye(S, dtype=bool),
        "ann_id": i,
        "category": "c",
        "logits": logits,
        "iou": {m: iou for m in logits},
    }


def test_grid_pool_is_bounded_and_spreads_over_the_iou_range():
    pool = GridPool(4)
    for i in range(1000):
        pool.offer(_sample(i, (i % 100) / 100, with_int8=False))
    assert pool.seen == 1000 and sum(len(b) for b in pool._bins) == 40  # at most n per bin
    picked = pool.pick()
    assert [s["ann_id"] for s in picked] == [90, 60, 30, 0]  # bins 9, 6, 3, 0: both ends, best first
    few = GridPool(4)
    for i in range(3):
        few.offer(_sample(i, 0.5, with_int8=False))
    assert len(few.pick()) == 3


def test_grid_png_has_an_int8_column_only_when_int8_logits_exist(tmp_path):
    without = draw_grid(
        [_sample(i, 0.5, False) for i in range(2)],
        tmp_path / "a.png",
        title="t",
        int8_missing_reason="no int8 model given",
    )
    with_int8 = draw_grid(
        [_sample(i, 0.5, True) for i in range(2)],
        tmp_path / "b.png",
        title="t",
        int8_missing_reason="no int8 model given",
    )
    w_without, h = Image.open(without).size
    w_with, h2 = Image.open(with_int8).size
    assert h == h2 and w_with > w_without  # one more column
    assert draw_grid([], tmp_path / "empty.png", title="t").is_file()


def test_grid_colours_errors_apart_and_marks_the_prompt(tmp_path):
    """False positives and false negatives get their own colours; the prompt is drawn on every cell."""
    from picosam_pipeline.evaluate.report import FN_COLOUR, FP_COLOUR, TP_COLOUR

    image = np.full((S, S, 3), 128, np.uint8)
    gt = np.zeros((S, S), bool)
    gt[10:40, 10:40] = True
    pred = np.zeros((S, S), bool)
    pred[20:60, 20:60] = True
    out = errors_overlay(image, pred, gt)
    inside = {
        name: out[y, x].astype(float) for name, (y, x) in {"tp": (30, 30), "fp": (50, 50), "fn": (12, 30)}.items()
    }
    for name, colour in (("tp", TP_COLOUR), ("fp", FP_COLOUR), ("fn", FN_COLOUR)):
        others = [c for c in (TP_COLOUR, FP_COLOUR, FN_COLOUR) if c is not colour]
        assert all(np.abs(inside[name] - colour).sum() < np.abs(inside[name] - o).sum() for o in others), name
    assert (out[80, 80] == 128).all()  # true negatives untouched
    assert (out[39, 15] == FN_COLOUR).all() or (out[10, 15] == FN_COLOUR).all()  # solid outline

    # prompts in the crop frame: a point at the crop's centre pixel, a box scaled by crop size / box size
    assert crop_prompt(("point", (150.0, 250.0)), (100, 200, 196, 296), S) == ("point", (50.0, 50.0))
    kind, (x, y, w, h) = crop_prompt(("box", (110.0, 210.0, 48.0, 24.0)), (100, 200, 292, 392), S)
    assert kind == "box" and (x, y, w, h) == (4.5, 4.5, 24.0, 12.0)
    samples = [
        {**_sample(i, 0.5, False), "crop_box": (0, 0, S, S), "prompt": ("point", (40.0, 50.0))} for i in range(2)
    ]
    marked = np.asarray(Image.open(draw_grid(samples, tmp_path / "p.png", title="t")).convert("RGB"))
    plain = np.asarray(
        Image.open(draw_grid([_sample(i, 0.5, False) for i in range(2)], tmp_path / "n.png", title="t")).convert("RGB")
    )
    assert marked.shape == plain.shape and (marked != plain).any(axis=2).sum() > 4 * 30  # a mark in each of 4+ cells


# --------------------------------------------------------------------------------------------------
# LVIS straight from annotations + images


def _lvis_v1(tmp_path):
    """A tiny LVIS-v1-format file: 1203 categories, coco_url names, no iscrowd; two val2017 images on disk,
    one train2017 image that is not (its 2 annotations must be counted, not scored), one broken polygon and
    one annotation of an image id that does not exist."""
    rng = np.random.default_rng(0)
    images_dir = tmp_path / "val2017"
    images_dir.mkdir()
    images, anns = [], []
    for image_id, (w, h) in [(1, (160, 120)), (2, (100, 140)), (3, (64, 64))]:
        folder = "train2017" if image_id == 3 else "val2017"
        images.append(
            {
                "id": image_id,
                "width": w,
                "height": h,
                "coco_url": f"http://images.cocodataset.org/{folder}/{image_id:012d}.jpg",
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            }
        )
        if folder == "val2017":
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                images_dir / f"{image_id:012d}.jpg", quality=95
            )
    boxes = [
        (1, 10, 20, 30, 40),
        (1, 100, 5, 50, 60),
        (2, 0, 0, 100, 140),
        (2, 40, 60, 8, 6),
        (3, 1, 1, 20, 20),
        (3, 5, 5, 9, 9),
    ]
    for ann_id, (image_id, x, y, w, h) in enumerate(boxes, start=1):
        poly = [x, y, x + w, y, x + w, y + h, x, y + h]
        anns.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1 + ann_id,
                "bbox": [x, y, w, h],
                "area": w * h,
                "segmentation": [poly],
            }
        )
    anns.append(
        {"id": 99, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "area": 2.0, "segmentation": [[1, 1, 2, 2]]}
    )
    anns.append({**anns[0], "id": 100, "image_id": 42})  # an image id that is not in "images"
    cats = [{"id": i, "name": f"cat{i}", "synset": f"s{i}.n.01", "frequency": "f"} for i in range(1, 1204)]
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, images_dir, boxes


def test_lvis_v1_from_annotations_counts_missing_images_and_scores_the_rest(tmp_path):
    path, images_dir, boxes = _lvis_v1(tmp_path)
    model = RedChannelModel()
    table, summary = evaluate_annotations(path, images_dir, model, "picosam3-roi", batch_size=3)
    assert (
        summary["dataset"]["format"] == "lvis" and summary["dataset"]["version"] == "v1" and summary["warnings"] == []
    )
    assert summary["annotations"] == 8 and summary["scored"] == 4 and len(table) == 4
    assert (
        summary["annotations_without_image"] == 2 and summary["images_missing"] == 1 and summary["images_scored"] == 2
    )
    assert summary["dropped_by_reason"] == {"bad_polygon": 1, "missing_image_id": 1}  # 8 = 4 + 2 + 2: all accounted for
    assert [len(x) for x in model.inputs] == [3, 1]  # batches of batch_size
    # each sample is the papers' crop: GT via crop_metrics.gt_crop, image via PIL bilinear, scored like the shards
    first_image = np.asarray(Image.open(images_dir / "000000000001.jpg").convert("RGB"))
    mask = np.zeros((120, 160), np.uint8)
    mask[20:60, 10:40] = 1  # annotation 1: polygon = its bbox
    crop, box = gt_crop(mask, [10, 20, 30, 40], "picosam3-roi")
    pixels = crop_rgb(first_image, box, S)
    np.testing.assert_allclose(model.inputs[0][0], np.moveaxis(pixels, -1, 0) / 255.0)
    red = pixels[..., 0] > 127
    expected = np.count_nonzero(red & (crop > 0)) / np.count_nonzero(red | (crop > 0))
    assert table["student_iou"][0] == pytest.approx(expected)
    assert list(table["category"]) == ["cat2", "cat3", "cat4", "cat5"]
    limited, summary = evaluate_annotations(path, images_dir, RedChannelModel(), "picosam3-roi", max_annotations=2)
    assert summary["annotations"] == 2 + 1 and len(limited) == 2  # the first 2, plus the one set aside at load


def test_lvis_v05_file_is_detected_and_its_missing_images_counted(tmp_path):
    path = shared_data_or_skip("lvis-sample", "lvis_v0.5_val_100.json")
    empty = tmp_path / "val2017"
    empty.mkdir()
    table, summary = evaluate_annotations(path, empty, RedChannelModel(), "picosam3-roi")
    assert summary["dataset"]["version"] == "v0.5" and summary["dataset"]["categories"] == 1230
    assert summary["annotations"] == 977 and summary["annotations_without_image"] == 977
    annotated = {a["image_id"] for a in json.loads(path.read_text())["annotations"]}
    assert summary["images_missing"] == len(annotated) == 93 and summary["scored"] == 0 and len(table) == 0
    assert any("not v1" in w for w in summary["warnings"]) and any(
        "no annotation was scored" in w for w in summary["warnings"]
    )
    assert evaluation_report(table, ["student"])["student"]["crop_miou"] is None


def test_a_coco_file_is_not_taken_for_lvis(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [{"id": 1, "image_id": 1, "iscrowd": 0}],
                "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
            }
        )
    )
    with pytest.raises(PipelineError, match="is a COCO instances file, not LVIS"):
        evaluate_annotations(path, tmp_path, RedChannelModel(), "picosam3-roi")


# --------------------------------------------------------------------------------------------------
# the stage, end to end on the built-in sample (GT-mask teacher, random-weight student)


def _as_lvis_v1(coco_json, out):
    """The sample's val annotations rewritten in LVIS v1 form: 1203 synset categories, coco_url, no iscrowd."""
    data = json.loads(Path(coco_json).read_text())
    images = [
        {k: v for k, v in img.items() if k != "file_name"}
        | {"coco_url": f"http://images.cocodataset.org/val2017/{img['file_name']}"}
        for img in data["images"]
    ]
    anns = [{k: v for k, v in a.items() if k != "iscrowd"} for a in data["annotations"] if not a.get("iscrowd", 0)]
    names = {c["id"]: c["name"] for c in data["categories"]}
    cats = [
        {"id": i, "name": names.get(i, f"cat{i}"), "synset": f"s{i}.n.01", "frequency": "f"} for i in range(1, 1204)
    ]
    out.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return out, len(anns)


@pytest.fixture(scope="module")
def evaluated(sample_inputs, sample_shards, sample_student, tmp_path_factory):
    """The evaluate stage on the session's val shards and student (read-only), writing into this module's folder."""
    from tests.helpers.pipeline_inputs import elsewhere

    root = tmp_path_factory.mktemp("evaluate")
    cfg = elsewhere(sample_inputs, root)
    checkpoint = sample_student
    assert load_student(checkpoint)[1]["input_size"] == S
    # the float model exported to ONNX stands in for the quantize stage's fake-quant model
    int8_model = root / "student_int8.onnx"
    with pytest.warns(DeprecationWarning):  # the legacy TorchScript exporter
        torch.onnx.export(load_student(checkpoint)[0], torch.zeros(1, 3, S, S), str(int8_model), dynamo=False)
    val = cfg.prepare.splits[1]
    lvis_json, lvis_anns = _as_lvis_v1(val.annotations, root / "lvis_v1_val.json")
    cfg = dataclasses.replace(
        cfg,
        evaluate=EvaluateConfig(
            shards=str(sample_shards / "val"),
            checkpoint=str(checkpoint),
            index=cfg.pack.index,
            batch_size=16,
            grid_samples=4,
            int8_model=str(int8_model),
            write_predictions=str(root / "evaluate" / "predictions.json"),
            out_dir=str(root / "evaluate"),
            lvis=LvisEvalConfig(annotations=str(lvis_json), images=val.images),
        ),
    )
    summary = evaluate_stage.run(cfg, Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0))
    details = json.loads((Path(cfg.evaluate.out_dir) / "report.json").read_text())  # metrics/evaluate.json's details
    return cfg, summary, details, lvis_anns


@pytest.mark.slow  # evaluated: the evaluate stage end to end
def test_stage_scores_student_and_teacher_on_the_val_shards(evaluated):
    cfg, summary, metrics, _ = evaluated
    n = read_index(cfg.evaluate.index, split="val", columns=["ann_id"]).num_rows
    assert summary["samples"] == metrics["samples"] == n and metrics["protocol"] == "picosam3-roi"
    out = Path(cfg.evaluate.out_dir)
    report = metrics
    # metrics/evaluate.json: the headline only (three figures per model, the LVIS student); details in report.json
    headline = json.loads((Path(cfg.runtime.metrics_dir) / "evaluate.json").read_text())
    assert set(headline) == {"crop_miou", "crop_map", "full_miou", "student_int8", "teacher", "baseline", "lvis"}
    assert headline["lvis"] == {"crop_miou": report["lvis"]["student"]["crop_miou"]}
    assert headline["baseline"] == {"crop_miou": report["baseline"]["crop_miou"]}  # the whole crop: nothing learned
    for model in ("student", "student_int8", "teacher"):
        figures = (
            {k: headline[k] for k in ("crop_miou", "crop_map", "full_miou")} if model == "student" else headline[model]
        )
        assert figures == {
            "crop_miou": report[model]["crop_miou"],
            "full_miou": report[model]["full_image_miou"],
            "crop_map": report[model]["crop_success_map_50_95"],
        }
        assert sum(g["samples"] for g in report[model]["by_size"].values()) == n
    # the stand-in teacher is the GT mask as logits: right up to boundary pixels of the stored crop
    assert metrics["teacher"]["crop_miou"] > 0.9 and metrics["teacher"]["full_image_miou"] > 0.85
    assert metrics["student_int8"]["crop_miou"] == pytest.approx(metrics["student"]["crop_miou"], abs=0.01)
    assert set(report["by_category"]) == {"student", "student_int8", "teacher", "baseline"}
    assert sum(g["samples"] for g in report["by_category"]["student"].values()) == n
    assert len((out / "per_sample.csv").read_text().splitlines()) == n + 1
    plots = {p.name: p.read_text().splitlines() for p in (out / "plots").iterdir()}
    assert set(plots) == {
        "iou_histogram.csv",
        "by_size.csv",
        "by_category.csv",
        "iou_vs_area.csv",
        "student_vs_teacher.csv",
        "teacher_confidence.csv",
    }
    assert len(plots["iou_vs_area.csv"]) == 3 * n + 1 and len(plots["student_vs_teacher.csv"]) == n + 1
    assert len(plots["teacher_confidence.csv"]) == 20 + 1  # one teacher, 20 bins
    assert Image.open(out / "grid.png").size[0] > 0 and (out / "config.resolved.json").is_file()


@pytest.mark.slow  # evaluated: the evaluate stage end to end
def test_stage_predictions_file_scores_the_same_with_score_predictions(evaluated):
    cfg, _, metrics, _ = evaluated
    val = cfg.prepare.splits[1]
    image_file = Path(cfg.evaluate.write_predictions)
    crop_file = image_file.with_name("predictions.crop.json")
    scored = score_predictions(val.annotations, crop_file, "picosam3-roi", val.images)
    assert scored["frame"] == "crop" and scored["samples"] == metrics["samples"]
    assert 0.05 < metrics["student"]["crop_miou"] < 0.95
    # same masks, same GT crops (the shard's mask crop is crop_metrics.gt_crop's): the same figures
    assert scored["crop_miou"] == pytest.approx(metrics["student"]["crop_miou"], abs=1e-9)
    assert scored["crop_success_map_50_95"] == pytest.approx(metrics["student"]["crop_success_map_50_95"], abs=1e-9)
    # the full-image mIoU: evaluate, the crop-frame file and the image-frame file agree (one paste, NEAREST)
    in_image = score_predictions(val.annotations, image_file, "picosam3-roi", val.images)
    assert in_image["frame"] == "image" and in_image["samples"] == metrics["samples"]
    assert in_image["full_image_miou"] == pytest.approx(metrics["student"]["full_image_miou"], abs=1e-12)
    assert scored["full_image_miou"] == pytest.approx(metrics["student"]["full_image_miou"], abs=1e-12)
    assert in_image["coco_segm"] is not None and 0.0 <= in_image["coco_segm"]["ap"] <= 1.0


@pytest.mark.slow  # evaluated: the evaluate stage end to end
def test_stage_lvis_block_evaluates_from_annotations_and_images(evaluated):
    _, _, metrics, lvis_anns = evaluated
    lvis = metrics["lvis"]
    assert lvis["dataset"]["version"] == "v1" and lvis["protocol"] == "picosam3-roi"
    assert lvis["annotations"] == lvis_anns and lvis["annotations_without_image"] == 0
    assert (
        lvis["scored"] == lvis["student"]["samples"] == metrics["samples"]
    )  # the sample's val has nothing prepare drops
    # raw crops here vs JPEG crops in the shards: the same student, nearly the same figures
    assert lvis["student"]["crop_miou"] == pytest.approx(metrics["student"]["crop_miou"], abs=0.05)


@pytest.mark.slow  # evaluated, then the evaluate-int8 stage
def test_evaluate_int8_stage_puts_float_teacher_and_int8_side_by_side(evaluated):
    """Stage evaluate-int8 (after export in dvc.yaml): the INT8 file of evaluate.int8_onnx on the same val crops,
    its own metrics file and a grid with the INT8 column; the evaluate stage's own figures are unchanged."""
    from picosam_pipeline.stages import evaluate_int8

    cfg, _, metrics, _ = evaluated
    root = Path(cfg.evaluate.out_dir).parent
    section = dataclasses.replace(
        cfg.evaluate, int8_model=None, int8_onnx=cfg.evaluate.int8_model, int8_out_dir=str(root / "evaluate-int8")
    )
    evaluate_int8.run(
        dataclasses.replace(cfg, evaluate=section), Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)
    )
    side_by_side = json.loads((Path(cfg.runtime.metrics_dir) / "evaluate-int8.json").read_text())
    out = root / "evaluate-int8"
    report = json.loads((out / "report.json").read_text())
    assert report["int8_model"] == cfg.evaluate.int8_model and "lvis" not in side_by_side
    assert set(side_by_side) == {"student_int8"}  # the float student's and teacher's figures are evaluate's only
    # the same crops as the evaluate stage: the same figures (its report has all three models)
    assert side_by_side["student_int8"]["crop_miou"] == pytest.approx(metrics["student_int8"]["crop_miou"], abs=1e-9)
    for model in ("student", "teacher"):
        assert report[model]["crop_miou"] == pytest.approx(metrics[model]["crop_miou"], abs=1e-9)
    assert (out / "grid.png").is_file() and (out / "report.json").is_file() and (out / "per_sample.csv").is_file()
    assert Image.open(out / "grid.png").size == Image.open(Path(cfg.evaluate.out_dir) / "grid.png").size  # INT8 column
    headline = json.loads((Path(cfg.runtime.metrics_dir) / "evaluate.json").read_text())  # not overwritten
    assert headline["crop_miou"] == metrics["student"]["crop_miou"] and "student_int8" in headline
