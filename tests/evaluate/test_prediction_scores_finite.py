"""Issue 31 item 6: `score-predictions` refuses a prediction whose score is not a finite number.

Python's json reads the literals NaN, Infinity and -Infinity as floats; before, a file scored with them printed a
COCO segm AP (1.000 for these exact masks), a bool score was a numpy TypeError traceback, and a string or a missing
score printed "n/a". Now each is a counted problem of the file, named by entry, image and value, like any other.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.evaluate.crop_metrics import gt_crop
from picosam_pipeline.evaluate.prediction_scoring import load_coco
from picosam_pipeline.evaluate.predictions import (
    CropPrediction,
    encode_mask,
    read_predictions,
    write_crop_predictions,
)

PROBLEM = "entries whose score is missing or not a finite number (NaN, Infinity, true/false, a string)"


def _annotations(tmp_path):
    """Two 120 x 160 images with one rectangle each (categories 1 and 2)."""
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [20, 30, 40, 30], "area": 1200.0},
        {"id": 21, "image_id": 2, "category_id": 2, "iscrowd": 0, "bbox": [60, 10, 50, 80], "area": 4000.0},
    ]
    for ann in anns:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    data = {
        "images": [{"id": i, "width": 160, "height": 120, "file_name": f"{i:012d}.jpg"} for i in (1, 2)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _image_frame_entries(ann_path) -> list[dict]:
    """The GT masks as an image-frame COCO results list, score 0.9 each."""
    coco = load_coco(ann_path)
    return [
        {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "segmentation": encode_mask(coco.annToMask(ann)),
            "score": 0.9,
            "id": k,
        }
        for k, ann in enumerate(coco.loadAnns(coco.getAnnIds()))
    ]


def _score(ann_path, preds, *extra):
    args = ["--annotations", ann_path, "--predictions", preds, "--protocol", "picosam3-roi", *extra]
    return CliRunner().invoke(cli, ["score-predictions", *map(str, args)])


def _error(result) -> str:
    """The one-paragraph message the CLI printed for a refused file (exit 1, no traceback)."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    message = result.output.split("Error: ", 1)[1].rstrip("\n")
    assert "\n" not in message
    return message


# (the score as written in the file, the literal the message names)
BAD_SCORES = [
    ("NaN", "NaN"),
    ("Infinity", "Infinity"),
    ("-Infinity", "-Infinity"),
    ("1e400", "Infinity"),  # too large for a float: json reads inf
    ("1" + "0" * 400, "1" + "0" * 29),  # an integer too large for a float (the example is cut at 30 characters)
    ("true", "true"),
    ("false", "false"),
    ('"0.9"', '"0.9"'),
    ("null", "null"),
    ("[0.9]", "[0.9]"),
    (None, "missing"),
]


@pytest.mark.parametrize("written, named", BAD_SCORES, ids=[str(w)[:12] for w, _ in BAD_SCORES])
def test_a_non_finite_or_missing_score_is_refused_with_file_entry_and_value(tmp_path, written, named):
    ann_path = _annotations(tmp_path)
    entries = _image_frame_entries(ann_path)
    if written is None:
        del entries[1]["score"]
    else:
        entries[1]["score"] = "@SCORE@"
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps(entries).replace('"@SCORE@"', written or ""))

    message = _error(_score(ann_path, preds))
    assert message.startswith(f"{preds}: 1 problem(s) in its 2 entries: 1 {PROBLEM} (e.g. entry 1 (image 2): ")
    assert f"entry 1 (image 2): score {named})." in message and "--allow-partial" in message

    partial = _score(ann_path, preds, "--allow-partial")  # the other image is scored; the bad one is counted
    assert partial.exit_code == 0, partial.output
    assert "1 images" in partial.output and "'bad_score': 1" in partial.output
    assert "COCO segm AP [.5:.95]      1.000" in partial.output


def test_a_bad_score_keeps_its_place_in_the_alignment(tmp_path):
    """Only the score is wrong: no count mismatch is reported on top, and the image is skipped under partial."""
    ann_path = _annotations(tmp_path)
    entries = _image_frame_entries(ann_path)
    entries[0]["score"] = float("nan")
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps(entries))  # Python writes NaN
    checked = read_predictions(preds, {1: (120, 160), 2: (120, 160)})
    assert dict(checked.problems.counts) == {"bad_score": 1}
    assert checked.problems.examples["bad_score"] == ["entry 0 (image 1): score NaN"]
    assert checked.problems.bad_images == {1} and sorted(checked.by_image) == [1, 2]


def test_finite_scores_of_any_number_type_are_accepted(tmp_path):
    ann_path = _annotations(tmp_path)
    entries = _image_frame_entries(ann_path)
    entries[0]["score"], entries[1]["score"] = 1, -0.5  # an integer; any finite number ranks
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps(entries))
    result = _score(ann_path, preds)
    assert result.exit_code == 0, result.output
    assert "COCO segm AP [.5:.95]      1.000" in result.output


def test_crop_frame_files_are_checked_too(tmp_path):
    ann_path = _annotations(tmp_path)
    coco = load_coco(ann_path)
    records = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        crop, _ = gt_crop(coco.annToMask(ann), ann["bbox"], "picosam3-roi")
        records.append(CropPrediction(ann["image_id"], crop, float("inf"), ann["category_id"], ann["id"]))
    preds = tmp_path / "predictions.crop.json"
    write_crop_predictions(records, preds)  # the writer is not the gate: the scorer is
    message = _error(_score(ann_path, preds))
    assert f"2 {PROBLEM} (e.g. entry 0 (image 1): score Infinity, entry 1 (image 2): score Infinity)" in message
