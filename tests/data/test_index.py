"""decode_mask_window: the window of a mask decoded from its COCO RLE equals pycocotools' full decode, sliced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from picosam_pipeline.data.index import decode_mask, decode_mask_window

COCO_VAL = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "coco-sample" / "annotations" / "instances_val2017.json"
)


def _rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def _masks(rng: np.random.Generator):
    """Masks whose RLEs have one- to four-group counts, negative differences, runs across columns, and the edges."""
    yield np.zeros((5, 7), np.uint8)
    yield np.ones((5, 7), np.uint8)
    yield np.ones((1, 1), np.uint8)
    corners = np.zeros((9, 4), np.uint8)
    corners[0, 0] = corners[-1, -1] = 1
    yield corners
    for h, w in [(13, 17), (480, 640), (427, 640), (640, 359)]:
        yield (rng.random((h, w)) < 0.5).astype(np.uint8)  # many short runs
        yy, xx = np.mgrid[:h, :w]
        for _ in range(3):  # blobs: long runs, counts of several groups
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, max(h, w))
            yield (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8)


def _windows(rng: np.random.Generator, h: int, w: int):
    yield 0, 0, w, h
    yield 0, 0, 0, 0
    yield w, h, w, h
    yield w - 1, h - 1, w, h
    for _ in range(6):
        x1, x2 = sorted(rng.integers(0, w + 1, 2))
        y1, y2 = sorted(rng.integers(0, h + 1, 2))
        yield int(x1), int(y1), int(x2), int(y2)


def test_window_equals_the_sliced_pycocotools_decode():
    rng = np.random.default_rng(0)
    checked = 0
    for mask in _masks(rng):
        h, w = mask.shape
        rle = _rle(mask)
        full = decode_mask(rle, h, w)
        np.testing.assert_array_equal(full, mask)
        for x1, y1, x2, y2 in _windows(rng, h, w):
            window = decode_mask_window(rle, h, w, (x1, y1, x2, y2))
            assert window.dtype == np.uint8 and window.flags.c_contiguous
            np.testing.assert_array_equal(window, full[y1:y2, x1:x2], err_msg=f"{h}x{w} window {(x1, y1, x2, y2)}")
            checked += 1
    assert checked > 100


@pytest.mark.skipif(not COCO_VAL.is_file(), reason=f"real COCO masks need ../shared ({COCO_VAL} absent)")
def test_window_of_every_real_coco_val_mask_inside_its_box():
    data = json.loads(COCO_VAL.read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    checked = 0
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        rle = (
            mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            if isinstance(seg, list)
            else mask_utils.frPyObjects(seg, h, w)
        )
        counts = rle["counts"].decode("ascii")
        x, y, bw, bh = ann["bbox"]
        box = (int(x), int(y), min(w, int(np.ceil(x + bw)) + 3), min(h, int(np.ceil(y + bh)) + 3))
        np.testing.assert_array_equal(
            decode_mask_window(counts, h, w, box), decode_mask(counts, h, w)[box[1] : box[3], box[0] : box[2]]
        )
        checked += 1
    assert checked > 100


def test_a_window_outside_the_image_or_an_rle_of_another_size_is_refused():
    rle = _rle(np.ones((4, 6)))
    with pytest.raises(ValueError, match="not inside the 6x4 image"):
        decode_mask_window(rle, 4, 6, (0, 0, 7, 4))
    with pytest.raises(ValueError, match="not inside"):
        decode_mask_window(rle, 4, 6, (-1, 0, 2, 2))
    with pytest.raises(ValueError, match="cover 24 pixels, not 5x6"):
        decode_mask_window(rle, 5, 6, (0, 0, 2, 2))
