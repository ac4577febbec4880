"""Crop-space metrics, full-image paste, prediction files and `score-predictions` (incl. the PicoSAM2 reference)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.data.crops import CropBox
from picosam_pipeline.evaluate.crop_metrics import (
    breakdown,
    crop_miou,
    crop_success_map_50_95,
    full_image_iou,
    gt_crop,
    paste_crop,
    size_buckets,
)
from picosam_pipeline.evaluate.prediction_scoring import load_coco
from picosam_pipeline.evaluate.predictions import (
    CROP_SCHEMA,
    CropPrediction,
    decode_masks,
    read_predictions,
    write_crop_predictions,
)
from picosam_pipeline.train.iou import crop_ious
from tests.helpers.paths import shared_data_or_skip


def _masks(n: int, size: int = 8) -> np.ndarray:
    return np.zeros((n, size, size), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# metrics on hand-made masks


def test_iou_thresholds_logits_at_zero_and_empty_union_counts_one():
    gt = _masks(4)
    gt[0, 0, :4] = 1  # 4 px
    gt[1, 0, :2] = 1
    logits = np.full((4, 8, 8), -3.0, dtype=np.float32)
    logits[0, 0, :2] = 2.0  # 2 of 4 GT px -> IoU 0.5
    logits[0, 0, 2] = 0.0  # logit exactly 0 = sigmoid 0.5: background (strict > 0)
    logits[1, 5, 5] = 0.1  # only a false positive -> IoU 0
    logits[3, 1, 1] = 5.0  # empty GT, one predicted px -> union 1, IoU 0
    # sample 2: empty prediction and empty GT -> 1.0
    expected = [0.5, 0.0, 1.0, 0.0]
    np.testing.assert_allclose(crop_ious(logits, gt), expected)
    # torch tensors with a channel axis give the same, and a {0,1} mask works as `pred` too
    np.testing.assert_allclose(
        crop_ious(torch.from_numpy(logits)[:, None], torch.from_numpy(gt)[:, None].float()), expected
    )
    np.testing.assert_allclose(crop_ious((logits > 0).astype(np.uint8), gt), expected)
    assert crop_miou(logits, gt) == pytest.approx(np.mean(expected))


def test_success_map_counts_only_non_empty_gt_and_uses_exact_decimal_thresholds():
    gt, pred = _masks(4), _masks(4)
    gt[0, 0, :5] = 1
    pred[0, 0, :3] = 1  # IoU exactly 3/5: passes t = .50, .55, .60 -> 3 of 10
    gt[1, 2, :4] = 1
    pred[1, 2, :4] = 1  # IoU 1: 10 of 10
    gt[2, 3, :2] = 1
    pred[2, 4, :2] = 1  # IoU 0: 0 of 10
    # sample 3: empty GT and empty prediction -> IoU 1, in mIoU but not in the success rate
    np.testing.assert_allclose(crop_ious(pred, gt), [0.6, 1.0, 0.0, 1.0])
    assert crop_miou(pred, gt) == pytest.approx((0.6 + 1 + 0 + 1) / 4)
    # 13/30. Counting the empty-GT sample would give 23/40; np.arange thresholds (0.6000000000000001) 12/30.
    assert crop_success_map_50_95(pred, gt) == pytest.approx(13 / 30)
    assert math.isnan(crop_success_map_50_95(_masks(2), _masks(2)))


def test_size_buckets_and_breakdown():
    areas = [0, 1023.9, 1024, 9215.5, 9216, 1e6]
    assert size_buckets(areas).tolist() == ["small", "small", "medium", "medium", "large", "large"]
    ious = np.array([1.0, 0.0, 0.6, 0.4, 1.0, 1.0])
    nonempty = np.array([True, True, True, True, True, False])
    table = breakdown(ious, nonempty, size_buckets(areas), order=("small", "medium", "large", "huge"))
    assert list(table) == ["small", "medium", "large"]
    assert table["small"] == {"samples": 2, "gt_nonempty": 2, "crop_miou": 0.5, "crop_success_map_50_95": 0.5}
    assert table["medium"]["crop_miou"] == pytest.approx(0.5)
    assert table["medium"]["crop_success_map_50_95"] == pytest.approx(3 / 20)  # 0.6 passes 3 of 10 t, 0.4 none
    assert table["large"]["gt_nonempty"] == 1 and table["large"]["crop_success_map_50_95"] == 1.0


# --------------------------------------------------------------------------------------------------
# back to the image frame


def test_paste_nearest_for_masks_bilinear_for_logits():
    box = CropBox(2, 3, 8, 7)  # 6 wide, 4 high, in a 10 x 12 image
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, :2] = True  # left half of the crop
    expected = np.zeros((10, 12), dtype=bool)
    expected[3:7, 2:5] = True  # PIL NEAREST: output columns 0..5 sample crop columns 0,0,1,2,2,3 (ties go low)
    np.testing.assert_array_equal(paste_crop(mask, box, (10, 12)), expected)
    logits = np.where(mask, 1.0, -1.0).astype(np.float32)
    # bilinear on logits: column 2 sits at crop x = 1.17 -> 1 - 2 * 0.17 > 0; column 3 at x = 1.83 -> < 0
    np.testing.assert_array_equal(paste_crop(torch.from_numpy(logits)[None], box, (10, 12)), expected)

    gt = expected.copy()
    gt[0, 0] = True  # one GT pixel outside the box
    assert full_image_iou(mask, box, gt) == pytest.approx(12 / 13)
    assert full_image_iou(np.zeros((4, 4), bool), box, np.zeros((10, 12))) == 1.0


def test_gt_crops_match_hand_computed_windows_and_paste_back_exactly():
    mask = np.zeros((150, 200), dtype=np.uint8)
    mask[20:50, 10:30] = 1
    # PicoSAM2: bbox centre (19, 34) -> window left = top = max(0, c - 48) = 0 -> crop = mask[:96, :96], no resize
    crop, box = gt_crop(mask, [10, 20, 20, 30], "picosam2-point")
    assert box == CropBox(0, 0, 96, 96)
    np.testing.assert_array_equal(crop, mask[:96, :96])
    assert full_image_iou(crop, box, mask) == 1.0  # unstretched window: the paste is exact

    # PicoSAM3: bbox [40, 40, 20, 10] -> padded [38, 39, 24, 12] -> square side 24 around (50, 45)
    mask = np.zeros((150, 200), dtype=np.uint8)
    mask[42:48, 41:58] = 1
    mask[44, 60] = 1
    crop, box = gt_crop(mask, [40, 40, 20, 10], "picosam3-roi")
    assert box == CropBox(38, 33, 62, 57)
    np.testing.assert_array_equal(crop, np.kron(mask[33:57, 38:62], np.ones((4, 4), np.uint8)))  # NEAREST x4
    assert full_image_iou(crop, box, mask) == 1.0

    # A large ROI is shrunk 180 -> 96: NEAREST keeps the source pixel whose centre is nearest to each output
    # centre ((i + 0.5) * 180 / 96 never lands on a tie); BILINEAR would blend the random pixels.
    mask = np.zeros((300, 400), dtype=np.uint8)
    mask[50:170, 100:250] = np.random.default_rng(0).random((120, 150)) > 0.5
    crop, box = gt_crop(mask, [100, 50, 150, 120], "picosam3-roi")
    assert box == CropBox(85, 20, 265, 200)
    idx = ((np.arange(96) + 0.5) * 180 / 96).astype(int)
    np.testing.assert_array_equal(crop, mask[20:200, 85:265][np.ix_(idx, idx)])


# --------------------------------------------------------------------------------------------------
# prediction files


def test_write_crop_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 96, 96)).astype(np.float32)
    records = [
        CropPrediction(
            image_id=7 + i // 3,
            logits=torch.from_numpy(logits[i])[None] if i % 2 else logits[i],
            score=0.1 * i,
            category_id=3,
            annotation_id=100 + i,
        )
        for i in range(5)
    ]
    path = tmp_path / "out" / "preds.crop.json"
    assert write_crop_predictions(records, path) == 5
    data = json.loads(path.read_text())
    assert data["schema"] == CROP_SCHEMA and data["crop_size"] == 96  # not a COCO results list: COCO tools refuse it
    entries = data["predictions"]
    assert [e["id"] for e in entries] == list(range(5))
    assert set(entries[0]) == {"image_id", "category_id", "segmentation", "score", "id", "annotation_id"}
    assert entries[0]["segmentation"]["size"] == [96, 96] and isinstance(entries[0]["segmentation"]["counts"], str)

    checked = read_predictions(path, {7: (480, 640), 8: (96, 96)})
    assert checked.frame == "crop" and not checked.problems
    grouped = checked.by_image
    assert list(grouped) == [7, 8] and [len(v) for v in grouped.values()] == [3, 2]
    decoded = np.concatenate([decode_masks(v) for v in grouped.values()])
    np.testing.assert_array_equal(decoded, logits > 0)
    assert [e["annotation_id"] for v in grouped.values() for e in v] == [100, 101, 102, 103, 104]
    assert [e["score"] for e in entries] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


# --------------------------------------------------------------------------------------------------
# score-predictions end to end on a hand-made COCO file


def _tiny_coco(tmp_path):
    """Two 120 x 160 images: image 1 has a polygon, a crowd RLE and a rectangle; image 2 one rectangle."""
    from pycocotools import mask as mask_utils

    def rect(x, y, w, h):
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    crowd = np.zeros((120, 160), np.uint8, order="F")
    crowd[5:15, 5:25] = 1
    crowd_rle = mask_utils.encode(crowd)
    crowd_rle["counts"] = crowd_rle["counts"].decode("ascii")
    anns = [
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [20, 30, 20, 20],
            "area": 400.0,
            "segmentation": [[20, 30, 40, 30, 30, 50]],
        },
        {
            "id": 12,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 1,
            "bbox": [5, 5, 20, 10],
            "area": 200.0,
            "segmentation": crowd_rle,
        },
        {
            "id": 13,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "bbox": [100, 60, 50, 50],
            "area": 2500.0,
            "segmentation": rect(100, 60, 50, 50),
        },
        {
            "id": 21,
            "image_id": 2,
            "category_id": 2,
            "iscrowd": 0,
            "bbox": [0, 0, 120, 110],
            "area": 13200.0,
            "segmentation": rect(0, 0, 120, 110),
        },
    ]
    data = {
        "images": [{"id": i, "width": 160, "height": 120, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _gt_records(ann_path, protocol, flip=False):
    coco = load_coco(ann_path)
    records = []
    for image_id in (1, 2):
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            crop, box = gt_crop(coco.annToMask(ann), ann["bbox"], protocol)
            records.append(
                CropPrediction(
                    image_id,
                    (1 - crop) if flip else crop,
                    1.0,
                    ann["category_id"],
                    ann["id"],
                    crop_box=tuple(box),
                    image_size=(120, 160),
                )
            )
    return records


def _score(*args):
    return CliRunner().invoke(cli, ["score-predictions", *map(str, args)])


@pytest.mark.parametrize("protocol", ["picosam2-point", "picosam3-roi"])
def test_score_predictions_aligns_skips_crowd_and_scores(tmp_path, protocol):
    ann_path = _tiny_coco(tmp_path)
    preds = tmp_path / "preds.json"
    write_crop_predictions(_gt_records(ann_path, protocol), preds)
    out = tmp_path / "metrics" / "score.json"
    result = _score("--annotations", ann_path, "--predictions", preds, "--protocol", protocol, "--json-out", out)
    assert result.exit_code == 0, result.output
    assert re.search(r"(?m)^crop mIoU\s+1\.000", result.output) and re.search(
        r"(?m)^crop mAP@\[\.5:\.95\]\s+1\.000", result.output
    )
    assert "crop-frame predictions: 3 samples from 2 images" in result.output
    report = json.loads(out.read_text())
    assert report["by_size"]["small"]["samples"] == 1 and report["by_size"]["large"]["samples"] == 1
    assert sorted(report["by_category"]) == ["cat", "dog"] and report["by_category"]["dog"]["samples"] == 2

    # Swapping image 1's two predictions must show up: alignment is by annotation order, not by best match.
    records = _gt_records(ann_path, protocol)
    records[:2] = [CropPrediction(1, records[1].logits, 1.0), CropPrediction(1, records[0].logits, 1.0)]
    write_crop_predictions(records, preds)
    result = _score("--annotations", ann_path, "--predictions", preds, "--protocol", protocol)
    assert result.exit_code == 0 and not re.search(r"(?m)^crop mIoU\s+1\.000", result.output)

    write_crop_predictions(_gt_records(ann_path, protocol, flip=True), preds)
    result = _score("--annotations", ann_path, "--predictions", preds, "--protocol", protocol)
    assert re.search(r"(?m)^crop mIoU\s+0\.000", result.output) and re.search(
        r"(?m)^crop mAP@\[\.5:\.95\]\s+0\.000", result.output
    )


def test_score_predictions_rejects_misaligned_files(tmp_path):
    ann_path = _tiny_coco(tmp_path)
    preds = tmp_path / "preds.json"
    args = ["--annotations", ann_path, "--predictions", preds, "--protocol", "picosam2-point"]
    records = _gt_records(ann_path, "picosam2-point")

    write_crop_predictions(records[1:], preds)  # image 1 loses one of its 2 predictions
    result = _score(*args)
    assert result.exit_code == 1
    assert (
        "image 1 has 1 prediction(s) but 2 non-crowd annotation(s)" in result.output
        and "--allow-partial" in result.output
    )

    write_crop_predictions(
        [CropPrediction(1, r.logits, 1.0, annotation_id=r.annotation_id) for r in reversed(records[:2])], preds
    )
    result = _score(*args)
    assert (
        result.exit_code == 1
        and "prediction 0 of image 1 names annotation 13 but the 0-th non-crowd annotation is 11" in result.output
    )

    write_crop_predictions([CropPrediction(99, records[0].logits, 1.0)], preds)
    result = _score(*args)
    assert (
        result.exit_code == 1
        and "1 entries for images that are not in the annotations (e.g. entry 0 (image 99))" in result.output
    )

    result = _score("--annotations", tmp_path / "nope.json", "--predictions", preds, "--protocol", "picosam3-roi")
    assert result.exit_code == 1 and "nope.json does not exist" in result.output


def _crop_entries(ann_path, protocol="picosam3-roi"):
    path = ann_path.parent / "good.crop.json"
    write_crop_predictions(_gt_records(ann_path, protocol), path)
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "holds no prediction"),
        ("unknown_image", "2 entries for images that are not in the annotations"),
        (
            "wrong_size",
            "1 entries whose mask size is neither the crop size nor the image's size (e.g. image 2: size [64, 64]",
        ),
        (
            "counts_sum",
            "1 entries whose RLE counts are garbage or do not add up to the mask size "
            "(e.g. entry 0 (image 1): sum 9215 for 96x96",
        ),
        (
            "garbage_counts",
            "1 entries whose RLE counts are garbage or do not add up to the mask size "
            "(e.g. entry 1 (image 1): garbage)",
        ),
        ("non_integer_id", "2 entries whose image_id is not an integer (e.g. entry 0: '1', entry 3: '2.5')"),
        ("duplicate_ids", "1 entries whose result id repeats an earlier entry's (e.g. entry 1 (image 1): id 0)"),
    ],
)
def test_score_predictions_refuses_bad_files_with_counts(tmp_path, case, message):
    """Issue 13 item 8: every kind of bad scoring input stops with what is wrong and how many (exit 1)."""
    ann_path = _tiny_coco(tmp_path)
    data = _crop_entries(ann_path)
    entries = data["predictions"]
    if case == "empty":
        data["predictions"] = []
    elif case == "unknown_image":
        entries += [dict(entries[0], image_id=99, id=10), dict(entries[0], image_id=98, id=11)]
    elif case == "wrong_size":
        entries[2]["segmentation"] = {"size": [64, 64], "counts": [64 * 64]}
    elif case == "counts_sum":
        entries[0]["segmentation"] = {"size": [96, 96], "counts": [9000, 215]}
    elif case == "garbage_counts":
        entries[1]["segmentation"]["counts"] = "\x7f\x7f~~garbage"
    elif case == "non_integer_id":
        entries[0]["image_id"] = "1"
        entries.append(dict(entries[2], image_id=2.5, id=10))
    elif case == "duplicate_ids":
        entries[1]["id"] = 0
    preds = tmp_path / "bad.crop.json"
    preds.write_text(json.dumps(data))
    result = _score("--annotations", ann_path, "--predictions", preds, "--protocol", "picosam3-roi")
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output

    if case != "empty":  # the explicit option scores what is sound and counts what it skipped
        result = _score(
            "--annotations", ann_path, "--predictions", preds, "--protocol", "picosam3-roi", "--allow-partial"
        )
        assert result.exit_code == 0, result.output
        assert "partial scoring: skipped" in result.output and "crop mIoU                  1.000" in result.output


def test_image_frame_predictions_score_with_cocoeval_and_match_the_crop_file(tmp_path):
    """Issue 14 item 6: the image-frame file is what COCOeval scores meaningfully; the crop file is refused by it."""
    from pycocotools.cocoeval import COCOeval

    from picosam_pipeline.evaluate.predictions import crop_predictions_path, write_predictions

    ann_path = _tiny_coco(tmp_path)
    preds = tmp_path / "predictions.json"
    paths = write_predictions(_gt_records(ann_path, "picosam3-roi"), preds)
    assert (
        paths == {"image": preds, "crop": crop_predictions_path(preds)}
        and paths["crop"].name == "predictions.crop.json"
    )
    coco = load_coco(ann_path)
    entries = json.loads(preds.read_text())
    assert [e["segmentation"]["size"] for e in entries] == [[120, 160]] * 3 and [e["category_id"] for e in entries] == [
        1,
        2,
        2,
    ]
    ev = COCOeval(coco, coco.loadRes(str(preds)), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[1] > 0.9  # AP50 of the GT crops pasted back: near-perfect masks, real categories
    with pytest.raises(AssertionError):
        coco.loadRes(str(paths["crop"]))  # a schema-marked object, not a results list: refused, not AP 0.000

    image = _score(
        "--annotations",
        ann_path,
        "--predictions",
        preds,
        "--protocol",
        "picosam3-roi",
        "--json-out",
        tmp_path / "i.json",
    )
    crop = _score(
        "--annotations",
        ann_path,
        "--predictions",
        paths["crop"],
        "--protocol",
        "picosam3-roi",
        "--json-out",
        tmp_path / "c.json",
    )
    assert image.exit_code == 0 and crop.exit_code == 0, image.output + crop.output
    image_report, crop_report = (json.loads((tmp_path / f).read_text()) for f in ("i.json", "c.json"))
    assert image_report["frame"] == "image" and crop_report["frame"] == "crop"
    assert image_report["coco_segm"]["ap50"] == pytest.approx(ev.stats[1])
    assert image_report["full_image_miou"] == pytest.approx(crop_report["full_image_miou"], abs=1e-12)
    assert "COCO segm AP [.5:.95]" in image.output and image_report["crop_miou"] is None


# --------------------------------------------------------------------------------------------------
# the PicoSAM2 reference outputs (../shared/data/coco-sample/picosam2_reference_preds)


@pytest.mark.parametrize("variant, miou", [("Trained", "0.381"), ("Distilled", "0.408"), ("Quantized", "0.407")])
def test_reproduces_picosam2_reference_miou(variant, miou):
    root = shared_data_or_skip("coco-sample")
    result = _score(
        "--annotations",
        root / "annotations" / "instances_val2017.json",
        "--predictions",
        root / "picosam2_reference_preds" / f"PicoSAM2_{variant}_pred.json",
        "--protocol",
        "picosam2-point",
        "--images-dir",
        root / "val2017",
    )
    assert result.exit_code == 0, result.output
    assert "190 samples from 24 images" in result.output
    assert re.search(rf"(?m)^crop mIoU\s+{re.escape(miou)}\b", result.output), result.output


def test_images_dir_accepts_exif_rotated_files_in_either_orientation(tmp_path):
    """The JSON may give the stored or the EXIF-rotated size (load_image accepts both); anything else is an error."""
    from types import SimpleNamespace

    from PIL import Image

    from picosam_pipeline.errors import PipelineError
    from picosam_pipeline.evaluate.prediction_scoring import _images_on_disk

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg", exif=exif)  # stored 40x30, shown 30x40
    coco = SimpleNamespace(
        imgs={
            1: {"file_name": "a.jpg", "width": 30, "height": 40},
            2: {"file_name": "a.jpg", "width": 40, "height": 30},
        }
    )
    assert _images_on_disk(coco, [1, 2], tmp_path) == {1, 2}
    coco.imgs[3] = {"file_name": "a.jpg", "width": 41, "height": 30}
    with pytest.raises(PipelineError, match="image is 40x30 but the annotations say 41x30"):
        _images_on_disk(coco, [3], tmp_path)
