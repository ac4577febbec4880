"""Annotation loading, COCO / LVIS detection, per-annotation checks and mask decoding (pycocotools)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from picosam_pipeline.data.coco import check_annotation, detect_format, load_annotations
from picosam_pipeline.data.index import decode_mask
from picosam_pipeline.errors import PipelineError
from tests.helpers.paths import shared_data_or_skip

W, H = 8, 6  # the test image: 8 wide, 6 high


def _dataset(annotations, images=None, categories=None) -> dict:
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }


def _ann(ann_id=1, segmentation=None, bbox=(1, 1, 4, 4), **extra) -> dict:
    seg = [[1, 1, 5, 1, 5, 5, 1, 5]] if segmentation is None else segmentation
    return {
        "id": ann_id,
        "image_id": 1,
        "category_id": 1,
        "iscrowd": 0,
        "area": 16.0,
        "bbox": list(bbox),
        "segmentation": seg,
        **extra,
    }


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
        (_ann(segmentation=[]), "no_segmentation", True),  # a bad input: strict mode stops on it
        (_ann(segmentation={}), "no_segmentation", True),
        (_ann(iscrowd="0"), "bad_iscrowd", True),  # a string is truthy: it must not be dropped as a crowd
        (_ann(iscrowd=2), "bad_iscrowd", True),
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
        (_ann(segmentation=[[-7, 1, -3, 1, -3, 5, -7, 5]]), "empty_mask", True),
        # a vertex at 5e8 made pycocotools' C rasteriser crash the process (exit 139): refused before it runs
        (_ann(segmentation=[[1, 1, 5e8, 1, 5, 5]]), "polygon_outside_image", True),
        (_ann(segmentation=[[1, 1, 5, 1, 5, -3 * H]]), "polygon_outside_image", True),
        # runs 1 + 2 of the 48 pixels: pycocotools decoded it into uninitialised memory, which was kept as the mask
        (_ann(segmentation={"size": [H, W], "counts": "12"}), "bad_rle", True),
        (_ann(segmentation={"size": [H, W], "counts": "0000"}), "bad_rle", True),  # zero-length runs
    ],
)
def test_dropped_annotations(tmp_path, ann, kind, bad_input):
    checked = _check(tmp_path, ann)
    assert checked.mask is None and checked.drop is not None
    assert (checked.drop.kind, checked.drop.bad_input, checked.drop.action) == (kind, bad_input, "dropped")
    assert "annotation 1" in checked.drop.reason


def test_polygon_straying_past_the_border_is_kept(tmp_path):
    # vertices a few pixels outside (as in real COCO polygons) are within the bound of one image size
    checked = _check(tmp_path, _ann(segmentation=[[-3, -2, W + 4, 1, 5, H + 5]], bbox=(0, 0, W, H)))
    assert checked.drop is None and checked.mask.sum() > 0


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


@pytest.mark.parametrize("text", ["[1, 2]", '{"images": [], "annotations": []}'])
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


def test_folder_given_as_annotations_is_named(tmp_path):
    with pytest.raises(PipelineError, match=r"a folder, not a file; point prepare.splits at the instances"):
        load_annotations(tmp_path)


def test_json_nested_too_deep_is_a_clear_error_not_a_recursion_traceback(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"images": [], "annotations": [' + "[" * 200_000 + "]" * 200_000 + '], "categories": []}')
    with pytest.raises(PipelineError, match=r"deep\.json: the JSON is nested deeper than the parser allows"):
        load_annotations(path)


def test_ids_beyond_int64_are_set_aside_not_an_overflow(tmp_path):
    big = 2**63
    images = [
        {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
        {"id": big, "file_name": "b.jpg", "width": W, "height": H},
    ]
    anns = [_ann(1), _ann(big), {**_ann(2), "image_id": big}, _ann(3, category_id=big)]
    categories = [{"id": 1, "name": "thing"}, {"id": big, "name": "huge"}]
    annset = _load(tmp_path, _dataset(anns, images=images, categories=categories))
    kinds = [(r.issue.kind, r.ann_id, r.image_id) for r in annset.record_issues]
    assert kinds == [
        ("bad_image_record", None, None),
        ("bad_annotation_record", big, 1),
        ("bad_annotation_record", 2, big),
    ]
    assert "64-bit" in annset.record_issues[0].issue.reason and set(annset.images) == {1}
    assert set(annset.categories) == {1}
    ann3 = annset.annotations_of(1)[1]
    checked = check_annotation(ann3, annset.images[1], annset.coco, annset.categories)
    assert checked.drop.kind == "unknown_category"


def test_duplicate_image_id_with_another_size_drops_its_annotations(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
        {"id": 1, "file_name": "b.jpg", "width": 2 * W, "height": H},
    ]
    annset = _load(tmp_path, _dataset([_ann()], images=images))
    problem = annset.images[1].problem
    assert problem.kind == "duplicate_image_id" and "a.jpg 8x6 and b.jpg 16x6" in problem.reason
    assert annset.record_issues == []  # reported once, with the image and its annotations
    # the same record twice is harmless: the first is kept and the repeat reported
    annset = _load(tmp_path, _dataset([_ann()], images=[images[0], dict(images[0])]))
    assert annset.images[1].problem is None
    assert [r.issue.kind for r in annset.record_issues] == ["duplicate_image_id"]


@pytest.mark.parametrize(
    "name, outside",
    [
        ("a.jpg", False),
        ("sub/./a.jpg", False),
        ("sub/../a.jpg", False),
        ("../a.jpg", True),
        ("sub/../../a.jpg", True),
        ("/etc/passwd", True),
        ("C:\\x.jpg", True),
    ],
)
def test_file_name_must_stay_inside_the_images_folder(tmp_path, name, outside):
    images = [{"id": 1, "file_name": name, "width": W, "height": H}]
    problem = _load(tmp_path, _dataset([_ann()], images=images)).images[1].problem
    assert (problem.kind if problem else None) == ("image_path_outside_folder" if outside else None)
    allowed = load_annotations(tmp_path / "instances.json", allow_outside_images=True).images[1]
    assert allowed.problem is None and allowed.file_name == name


def test_lvis_coco_url_cannot_climb_out_and_huge_images_are_refused(tmp_path):
    images = [
        {"id": 1, "width": W, "height": H, "coco_url": "http://images.cocodataset.org/../x.jpg"},
        {"id": 2, "file_name": "b.jpg", "width": 10**6, "height": 10**6},
        {"id": 3, "file_name": "c\x00.jpg", "width": W, "height": H},
    ]
    ann = {k: v for k, v in _ann().items() if k != "iscrowd"}
    annset = _load(tmp_path, _dataset([ann], images=images, categories=_lvis_categories(3)))
    assert annset.format.name == "lvis"
    assert [annset.images[i].problem.kind for i in (1, 2, 3)] == ["bad_image_record"] * 3
    assert "decompression-bomb" in annset.images[2].problem.reason


def test_records_set_aside_while_loading(tmp_path):
    anns = [_ann(1), _ann(1), {**_ann(2), "image_id": 99}, {**_ann(3), "id": None}, _ann(4)]
    images = [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}, {"id": 2, "file_name": "b.jpg"}]
    annset = _load(tmp_path, _dataset(anns, images=images))
    kinds = [(r.issue.kind, r.ann_id, r.is_annotation) for r in annset.record_issues]
    assert kinds == [
        ("duplicate_ann_id", 1, True),
        ("missing_image_id", 2, True),
        ("bad_annotation_record", None, True),
    ]
    assert [a["id"] for a in annset.annotations_of(1)] == [1, 4] and annset.num_annotations == 5
    assert annset.images[2].problem.kind == "bad_image_record"  # no width/height


def test_an_id_first_seen_on_a_missing_image_is_kept_where_its_image_exists(tmp_path):
    """Only kept annotations claim their id: a missing image's annotation does not make a later one a duplicate,
    and a kept one makes every later entry with its id a duplicate, whatever that entry's image."""
    anns = [{**_ann(7), "image_id": 99}, _ann(7), {**_ann(7), "image_id": 98}, _ann(7), _ann(8)]
    annset = _load(tmp_path, _dataset(anns))
    kinds = [(r.issue.kind, r.ann_id, r.image_id) for r in annset.record_issues]
    assert kinds == [("missing_image_id", 7, 99), ("duplicate_ann_id", 7, 98), ("duplicate_ann_id", 7, 1)]
    assert [a["id"] for a in annset.annotations_of(1)] == [7, 8] and annset.annotations_of(99) == []
    assert annset.has_annotations(1) and not annset.has_annotations(99) and annset.num_annotations == 5


def test_annotations_are_read_back_from_the_open_file_grouped_by_image(tmp_path):
    """Images interleaved in the file: each image's annotations come back in file order, read from the file
    opened at load (a file replaced afterwards is not the one read)."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in (3, 1, 2)]
    anns = [{**_ann(10 + k), "image_id": image_id} for k, image_id in enumerate([2, 1, 2, 3, 1, 2])]
    annset = _load(tmp_path, _dataset(anns, images=images))
    (tmp_path / "new.json").write_text("{}")
    (tmp_path / "new.json").replace(tmp_path / "instances.json")  # a new file: the set keeps reading the old one
    assert annset.image_ids.tolist() == [1, 2, 3]
    assert {i: [a["id"] for a in annset.annotations_of(i)] for i in (1, 2, 3)} == {
        1: [11, 14],
        2: [10, 12, 15],
        3: [13],
    }
    annset.close()
    annset.close()  # idempotent


def test_real_coco_annotations_come_back_per_image_as_in_the_file():
    """On the real COCO val file: each image's annotations, read back from the file, are json.loads' records."""
    path = shared_data_or_skip("coco-sample", "annotations", "instances_val2017.json")
    reference = json.loads(path.read_text())
    by_image = {}
    for record in reference["annotations"]:
        by_image.setdefault(record["image_id"], []).append(record)
    annset = load_annotations(path)
    assert annset.image_ids.tolist() == sorted(by_image) and not annset.record_issues
    assert all(annset.annotations_of(i) == anns for i, anns in by_image.items())


def test_an_annotation_file_cut_short_while_read_is_named(tmp_path):
    annset = _load(tmp_path, _dataset([_ann(1), _ann(2)]))
    with open(tmp_path / "instances.json", "r+") as f:  # rewritten in place: the open file is this one
        f.truncate(40)
    with pytest.raises(PipelineError, match=r"instances\.json was cut short while being read"):
        annset.annotations_of(1)


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
    images = [
        {"id": 5, "width": W, "height": H, "coco_url": "http://images.cocodataset.org/train2017/000000000005.jpg"}
    ]
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
    image_id = next(i for i in annset.images if annset.has_annotations(i))
    checked = check_annotation(
        annset.annotations_of(image_id)[0], annset.images[image_id], annset.coco, annset.categories
    )
    assert checked.drop is None and checked.mask.shape == (
        annset.images[image_id].height,
        annset.images[image_id].width,
    )
