"""Crop geometry of both prompt conventions, on cases computed by hand (comments show the arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from picosam_pipeline.data.crops import CropBox, crop_pixel_centres, point_box, point_prompt, roi_box

# --------------------------------------------------------------------------------------------------
# PicoSAM3 ROI: pad 10 % of w/h per side, square on the centre, clip to the image, int()


@pytest.mark.parametrize(
    "bbox, size, expect_box, expect_float",
    [
        # interior: x=10-3=7, y=20-1=19, w=36, h=12 -> side 36 around (25, 25)
        ([10, 20, 30, 10], (100, 100), (7, 7, 43, 43), (7.0, 7.0, 43.0, 43.0)),
        # top-left corner: x=-1, y=-2, w=12, h=24 -> side 24 around (5, 10) -> (-7, -2, 17, 22), clipped at 0
        ([0, 0, 10, 20], (100, 100), (0, 0, 17, 22), (-7.0, -2.0, 17.0, 22.0)),
        # bottom-right corner of a 50x40 image: x=39, y=29, w=h=12 around (45, 35) -> (39, 29, 51, 41)
        ([40, 30, 10, 10], (50, 40), (39, 29, 50, 40), (39.0, 29.0, 51.0, 41.0)),
        # wide box at the left border only: x=-2, y=47.5, w=24, h=6 -> side 24 around (10, 50.5)
        ([0, 48, 20, 5], (100, 100), (0, 38, 22, 62), (-2.0, 38.5, 22.0, 62.5)),
        # tall box at the top and bottom: x=45, y=-10, w=12, h=120 -> side 120 around (51, 50)
        ([46, 0, 10, 100], (100, 100), (0, 0, 100, 100), (-9.0, -10.0, 111.0, 110.0)),
        # fractional: x=0.25, y=2.25, w=12, h=6 -> side 12 around (6.25, 5.25) -> truncation, not rounding
        ([1.25, 2.75, 10, 5], (100, 100), (0, 0, 12, 11), (0.25, -0.75, 12.25, 11.25)),
        # tiny 1x1 box: x=y=4.9, w=h=1.2 -> (4.9, 4.9, 6.1, 6.1) -> a 2x2 crop (PicoSAM3 drops sides < 4)
        ([5, 5, 1, 1], (100, 100), (4, 4, 6, 6), (4.9, 4.9, 6.1, 6.1)),
    ],
)
def test_roi_box(bbox, size, expect_box, expect_float):
    box, fbox = roi_box(bbox, *size, padding=0.1)
    assert box == CropBox(*expect_box)
    np.testing.assert_allclose(fbox, expect_float, atol=1e-9)


def test_roi_box_without_padding_is_the_squared_bbox():
    box, fbox = roi_box([10, 10, 20, 6], 100, 100, padding=0.0)  # side 20 around (20, 13)
    assert box == (10, 3, 30, 23) and fbox == (10.0, 3.0, 30.0, 23.0)


# --------------------------------------------------------------------------------------------------
# PicoSAM2 point prompt: centre of the tight bbox, else the nearest mask pixel (row-major on ties)


def _mask(h: int, w: int, pixels) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    for x, y in pixels:
        m[y, x] = 1
    return m


def test_point_prompt_centre_inside_uses_integer_division():
    m = np.zeros((10, 12), np.uint8)
    m[2:6, 3:7] = 1  # x 3..6, y 2..5 -> ((3+6)//2, (2+5)//2) = (4, 3)
    assert point_prompt(m) == (4, 3)


def test_point_prompt_centre_outside_ring_takes_first_nearest_in_row_major_order():
    # square ring x, y in 2..6: centre (4, 4) is background; (4,2), (2,4), (6,4), (4,6) all at d^2 = 4
    ring = np.zeros((9, 9), np.uint8)
    ring[2:7, 2:7] = 1
    ring[3:6, 3:6] = 0
    assert point_prompt(ring) == (4, 2)


def test_point_prompt_centre_outside_l_shape():
    # L: top row y=0 (x 0..9) and left column x=0; centre (4, 4); (4, 0) and (0, 4) both at d^2 = 16,
    # (4, 0) comes first in row-major order
    m = _mask(10, 10, [(x, 0) for x in range(10)] + [(0, y) for y in range(10)])
    assert point_prompt(m) == (4, 0)


def test_point_prompt_two_blobs_picks_the_strictly_nearest():
    # blobs at (1, 1) and (7, 2): tight bbox x 1..7, y 1..2 -> centre (4, 1); d^2 = 9 to (1,1), 10 to (7,2)
    assert point_prompt(_mask(5, 10, [(1, 1), (7, 2)])) == (1, 1)


def test_point_prompt_single_pixel_and_empty():
    assert point_prompt(_mask(5, 8, [(7, 4)])) == (7, 4)  # bottom-right corner pixel
    assert point_prompt(np.zeros((5, 8), np.uint8)) == (4, 2)  # empty: image centre (W//2, H//2)


# --------------------------------------------------------------------------------------------------
# PicoSAM2 window: left = max(0, cx - size//2), right = min(W, left + size); same for y


@pytest.mark.parametrize(
    "point, size_wh, crop, expect",
    [
        ((100, 80), (200, 160), 96, (52, 32, 148, 128)),  # interior
        ((10, 20), (200, 160), 96, (0, 0, 96, 96)),  # left and top: shifted to 0, full size
        ((190, 150), (200, 160), 96, (142, 102, 200, 160)),  # right and bottom: 58x58, stretched later
        ((30, 25), (60, 50), 96, (0, 0, 60, 50)),  # image smaller than the window
        ((48, 48), (96, 96), 96, (0, 0, 96, 96)),  # exactly one window
        ((50, 50), (200, 200), 95, (3, 3, 98, 98)),  # odd size: 95 // 2 = 47
    ],
)
def test_point_box(point, size_wh, crop, expect):
    assert point_box(*point, *size_wh, size=crop) == CropBox(*expect)


def test_crop_pixel_centres_align_corners_false():
    xs, ys = crop_pixel_centres((10, 0, 20, 5), 5)
    # x: 10 + (u + 0.5) * 10/5 = 11, 13, 15, 17, 19; y: (u + 0.5) * 5/5 = 0.5 .. 4.5
    np.testing.assert_allclose(xs, [11, 13, 15, 17, 19])
    np.testing.assert_allclose(ys, [0.5, 1.5, 2.5, 3.5, 4.5])
