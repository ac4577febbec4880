"""Annotation loading, COCO / LVIS detection, per-annotation checks and mask decoding (pycocotools)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import shared_data_or_skip
from picosam_pipeline.data.coco import check_annotation, detect_format, load_annotations
from picosam_pipeline.data.index import decode_mask
from picosam_pipeline.errors import PipelineError

W, H = 8, 6  # the test image: 8 wide, 6 high


def _dataset(annotations, images=None, categories=None) -> dict:
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }


def _ann(ann_id=1, segmentation=None, bbox=(1, 1, 4, 4), **extra) -> dict:
    seg = [[1, 1, 5, 1, 5, 5, 1, 5]] if segmentation is None else segmentation
    return {"id": ann_id, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 16.0, "bbox": list(bbox),
            "segmentation": seg, **extra}


def _load(tmp_path, data, requested="auto"):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return load_annotations(path, requested)


def _check(tmp_path, ann):
    annset = _load(tmp_path, _dataset([ann]))
    return check_annotation(annset.annotations_of(1)[0], annset.images[1], annset.coco, annset.categories)


# --------------------------------------------------------------------------------------------------
# mask decoding


def test_polygon_square_rasterises_to_the_pixels_it_covers(tmp_path):
    # polygon (1,1)-(5,5): pixels x, y in 1..4 (pixel i spans [i, i+1)), area 16 = the polygon's area
    checked = _check(tmp_path, _ann())
    expected = np.zeros((H, W), np.uint8)
    expected[1:5, 1:5] = 1
    assert checked.drop is None and checked.conversions == []
    np.testing.assert_array_equal(checked.mask, expected)
    np.testing.assert_array_equal(decode_mask(checked.rle_counts, H, W), expected)


def test_multi_part_polygon_is_the_union(tmp_path):
    seg = [[0, 0, 2, 0, 2, 2, 0, 2], [6, 3, 8, 3, 8, 6, 6, 6]]  # 2x2 at the top-left, 2x3 at the bottom-right
    checked = _check(tmp_path, _ann(segmentation=seg, bbox=(0, 0, 8, 6)))
    expected = np.zeros((H, W), np.uint8)
    expected[0:2, 0:2] = 1
    expected[3:6, 6:8] = 1
    np.testing.assert_array_equal(checked.mask, expected)


def test_uncompressed_rle_is_column_major(tmp_path):
    # counts [7, 3, 38] on 6x8: 7 background (column 0, rows 0..5, then column 1 row 0), then 3 foreground
    # (column 1, rows 1..3); 7 + 3 + 38 = 48 = H*W
    checked = _check(tmp_path, _ann(segmentation={"size": [H, W], "counts": [7, 3, 38]}, bbox=(1, 1, 1, 3)))
    expected = np.zeros((H, W), np.uint8)
    expected[1:4, 1] = 1
    np.testing.assert_array_equal(checked.mask, expected)
    assert isinstance(checked.rle_counts, str)
    np.testing.assert_array_equal(decode_mask(checked.rle_counts, H, W), expected)


def test_compressed_rle_string_round_trips(tmp_path):
    expected = np.zeros((H, W), np.uint8)
    expected[2:6, 3:8] = 1
    rle = mask_utils.encode(np.asfortranarray(expected))
    seg = {"size": [H, W], "counts": rle["counts"].decode("ascii")}  # as stored in COCO JSON
    checked = _check(tmp_path, _ann(segmentation=seg, bbox=(3, 2, 5, 4)))
    np.testing.assert_array_equal(checked.mask, expected)
    assert checked.rle_counts == seg["counts"]


# --------------------------------------------------------------------------------------------------
# per-annotation checks: drops and conversions


@pytest.mark.parametrize(
    "ann, kind, bad_input",
    [
        (_ann(iscrowd=1), "crowd", False),
        (_ann(segmentation=[]), "no_segmentation", False),
        (_ann(category_id=7), "unknown_category", True),
        (_ann(bbox=(2, 2, 0, 3)), "degenerate_bbox", True),
        (_ann(bbox=(2, 2, 3, 0)), "degenerate_bbox", True),
        (_ann(bbox=(2, 2, 3)), "bad_bbox", True),
        (_ann(bbox=(20, 1, 4, 4)), "bbox_outside_image", True),
        # two points = 4 numbers, which pycocotools would read as a bbox [x, y, w, h]
        (_ann(segmentation=[[1, 1, 5, 5]]), "bad_polygon", True),
        (_ann(segmentation=[[1, 1, 5, 1, 5]]), "bad_polygon", True),  # odd number of coordinates
        (_ann(segmentation="polygon"), "bad_segmentation", True),
        (_ann(segmentation={"size": [H + 1, W], "counts": [48]}), "rle_size_mismatch", True),
        (_ann(segmentation={"size": [H, W], "counts": [7, 3]}), "bad_rle", True),  # sums to 10, not 48
        (_ann(segmentation={"size": [H, W], "counts": "a0171O1f0"}), "bad_rle", True),  # an 8x8 mask's runs
        (_ann(segmentation={"size": [H, W], "counts": "\u00ff"}), "bad_rle", True),  # not ASCII
        # a valid polygon entirely left of the image, bbox inside: rasterises to nothing
        (_ann(segmentation=[[-9, 1, -5, 1, -5, 5, -9, 5]]), "empty_mask", True),
    ],
)
def test_dropped_annotations(tmp_path, ann, kind, bad_input):
    checked = _check(tmp_path, ann)
    assert checked.mask is None and checked.drop is not None
    assert (checked.drop.kind, checked.drop.bad_input, checked.drop.action) == (kind, bad_input, "dropped")
    assert "annotation 1" in checked.drop.reason


def test_polygon_part_with_two_points_is_removed_and_the_rest_kept(tmp_path):
    checked = _check(tmp_path, _ann(segmentation=[[1, 1, 5, 1, 5, 5, 1, 5], [0, 0, 1, 1]]))
    assert checked.drop is None and [c.kind for c in checked.conversions] == ["polygon_part_removed"]
    assert checked.mask.sum() == 16


def test_bbox_partly_outside_is_clipped(tmp_path):
    # [6, -1, 5, 4] on an 8x6 image: x 6..11 -> 6..8, y -1..3 -> 0..3 => [6, 0, 2, 3]
    checked = _check(tmp_path, _ann(bbox=(6, -1, 5, 4), segmentation=[[6, 0, 8, 0, 8, 3, 6, 3]]))
    assert checked.drop is None and checked.bbox == (6.0, 0.0, 2.0, 3.0)
    assert [(c.kind, c.action) for c in checked.conversions] == [("bbox_clipped", "converted")]


def test_missing_area_is_taken_from_the_mask(tmp_path):
    ann = _ann()
    del ann["area"]
    checked = _check(tmp_path, ann)
    assert checked.area == 16.0 and [c.kind for c in checked.conversions] == ["area_computed"]


# --------------------------------------------------------------------------------------------------
# loading: malformed files, records that cannot be indexed


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "instances_val.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(PipelineError, match=r"instances_val\.json: malformed JSON at line 3, column 19.*re-download"):
        load_annotations(path)


@pytest.mark.parametrize("text", ['[1, 2]', '{"images": [], "annotations": []}'])
def test_json_that_is_not_an_instances_file(tmp_path, text):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(PipelineError, match=r"x\.json: not a COCO/LVIS instances file"):
        load_annotations(path)


def test_binary_file_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "photo.json"
    path.write_bytes(b"\xff\xd8\xff\xe0 not json")
    with pytest.raises(PipelineError, match=r"photo\.json: not UTF-8"):
        load_annotations(path)


def test_records_set_aside_while_loading(tmp_path):
    anns = [_ann(1), _ann(1), {**_ann(2), "image_id": 99}, {**_ann(3), "id": None}, _ann(4)]
    images = [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}, {"id": 2, "file_name": "b.jpg"}]
    annset = _load(tmp_path, _dataset(anns, images=images))
    kinds = [(r.issue.kind, r.ann_id, r.is_annotation) for r in annset.record_issues]
    assert kinds == [("duplicate_ann_id", 1, True), ("missing_image_id", 2, True), ("bad_annotation_record", None, True)]
    assert [a["id"] for a in annset.annotations_of(1)] == [1, 4] and annset.num_annotations == 5
    assert annset.images[2].problem.kind == "bad_image_record"  # no width/height


# --------------------------------------------------------------------------------------------------
# COCO / LVIS detection


def _lvis_categories(n: int) -> list[dict]:
    return [{"id": i + 1, "name": f"c{i}", "synset": f"c{i}.n.01", "frequency": "r"} for i in range(n)]


@pytest.mark.parametrize("n, version", [(1203, "v1"), (1230, "v0.5"), (5, "unknown")])
def test_lvis_version_from_category_count(n, version):
    fmt = detect_format({"categories": _lvis_categories(n), "annotations": [{"id": 1}]})
    assert (fmt.name, fmt.version, fmt.num_categories) == ("lvis", version, n)


def test_coco_detected_when_annotations_carry_iscrowd():
    fmt = detect_format({"categories": _lvis_categories(3), "annotations": [{"iscrowd": 0}]})
    assert (fmt.name, fmt.version) == ("coco", None)


def test_explicit_format_that_contradicts_the_file_stops(tmp_path):
    with pytest.raises(PipelineError, match="dataset_format is 'lvis' but the file looks like coco"):
        _load(tmp_path, _dataset([_ann()]), requested="lvis")


def test_lvis_v1_images_are_found_by_coco_url(tmp_path):
    images = [{"id": 5, "width": W, "height": H, "coco_url": "http://images.cocodataset.org/train2017/000000000005.jpg"}]
    ann = {k: v for k, v in _ann().items() if k != "iscrowd"} | {"image_id": 5}
    annset = _load(tmp_path, _dataset([ann], images=images, categories=_lvis_categories(1203)))
    record = annset.images[5]
    assert annset.format.describe() == "lvis v1" and record.file_name == "000000000005.jpg"
    # the split's folder is val2017, but LVIS v1 val also uses train2017 images: the sibling folder is tried
    (tmp_path / "val2017").mkdir()
    (tmp_path / "train2017").mkdir()
    assert record.resolve_path(tmp_path / "val2017") == tmp_path / "val2017" / "000000000005.jpg"
    (tmp_path / "train2017" / "000000000005.jpg").write_bytes(b"")
    assert record.resolve_path(tmp_path / "val2017") == tmp_path / "train2017" / "000000000005.jpg"


def test_real_lvis_v05_file_is_detected():
    path = shared_data_or_skip("lvis-sample", "lvis_v0.5_val_100.json")
    annset = load_annotations(path)
    assert (annset.format.name, annset.format.version, annset.format.num_categories) == ("lvis", "v0.5", 1230)
    assert annset.num_annotations == 977 and len(annset.images) == 100 and not annset.record_issues
    # v0.5 names files COCO_val2014_000000xxxxxx.jpg; COCO 2017 folders hold 000000xxxxxx.jpg
    assert annset.images[266409].file_name == "000000266409.jpg"
    image_id = next(iter(annset.coco.imgToAnns))
    checked = check_annotation(annset.annotations_of(image_id)[0], annset.images[image_id], annset.coco, annset.categories)
    assert checked.drop is None and checked.mask.shape == (annset.images[image_id].height, annset.images[image_id].width)
