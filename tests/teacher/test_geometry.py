"""Whole-image logits -> crop frame: checked against an analytic logit field and against F.interpolate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from picosam_pipeline.data.crops import point_box, roi_box
from picosam_pipeline.teacher.base import Teacher, TeacherOutput
from picosam_pipeline.teacher.geometry import central_slice, context_pixels, crop_logits, stored_size

GRID = 256  # SAM2's low-resolution logit grid
A, B, C = 0.05, -0.03, 1.5  # logit(x, y) = A x + B y + C (+ instance index, to catch mixed-up instances)


class LinearFieldTeacher:
    """Stand-in teacher: a linear logit field sampled at the cell centres of a 256x256 grid stretched over the image.

    Instance ``n`` gets ``A x + B y + C + n``, so boxes and logit maps that get out of step are caught too.
    """

    metadata = {"model": "linear-field stand-in"}

    def set_image(self, rgb: np.ndarray) -> None:
        self.height, self.width = rgb.shape[:2]

    def _field(self, n: int) -> TeacherOutput:
        cx = (np.arange(GRID) + 0.5) * self.width / GRID
        cy = (np.arange(GRID) + 0.5) * self.height / GRID
        field = A * cx[None, :] + B * cy[:, None] + C
        maps = field[None] + np.arange(n, dtype=np.float64)[:, None, None]
        return TeacherOutput(torch.from_numpy(maps).float(), torch.ones(n))

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> TeacherOutput:
        return self._field(len(boxes_xyxy))

    def predict_points(self, points_xy: np.ndarray) -> TeacherOutput:
        return self._field(len(points_xy))


def expected_stored(box, width: int, height: int, size: int, margin: float, index: int) -> np.ndarray:
    """The analytic field at the stored frame's pixel centres, written out independently of the module.

    Stored pixel j is crop pixel u = j - k, centred at x1 + (u + 0.5) (x2 - x1) / S. Bilinear interpolation of a
    linear field is exact between cell centres; beyond the outermost centres (last half cell, or outside the
    image) the border value is replicated, i.e. the field is evaluated at the position clamped to the centres.
    """
    x1, y1, x2, y2 = box
    k = int(np.floor(margin * size + 0.5))
    j = np.arange(size + 2 * k)
    xs = x1 + (j - k + 0.5) * (x2 - x1) / size
    ys = y1 + (j - k + 0.5) * (y2 - y1) / size
    half_x, half_y = width / (2 * GRID), height / (2 * GRID)
    xs = np.clip(xs, half_x, width - half_x)
    ys = np.clip(ys, half_y, height - half_y)
    return A * xs[None, :] + B * ys[:, None] + C + index


def roi_cases(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """PicoSAM3 ROI crop boxes for objects inside the image and touching every border and corner."""
    w, h = 0.3 * width, 0.25 * height
    bboxes = [
        (0.4 * width, 0.4 * height, w, h),  # interior
        (0.0, 0.4 * height, w, h),  # left
        (0.4 * width, 0.0, w, h),  # top
        (width - w, 0.4 * height, w, h),  # right
        (0.4 * width, height - h, w, h),  # bottom
        (0.0, 0.0, w, h),  # top-left
        (width - w, height - h, w, h),  # bottom-right
        (width - w, 0.0, w, h),  # top-right
        (0.0, height - h, w, h),  # bottom-left
        (0.0, 0.0, float(width), float(height)),  # whole image
        (0.5 * width, 0.5 * height, 4.0, 5.0),  # tiny object
    ]
    return [tuple(roi_box(b, width, height, 0.1)[0]) for b in bboxes]


def point_cases(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """PicoSAM2 96-px windows around points in the middle and at every border and corner."""
    points = [
        (width // 2, height // 2),
        (2, height // 2),
        (width // 2, 1),
        (width - 1, height // 2),
        (width // 2, height - 2),
        (0, 0),
        (width - 1, height - 1),
        (width - 3, 2),
        (3, height - 1),
    ]
    return [tuple(point_box(cx, cy, width, height, 96)) for cx, cy in points]


@pytest.mark.parametrize("width,height", [(640, 480), (150, 100), (300, 701)])
@pytest.mark.parametrize("convention", ["roi", "point"])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.25])
def test_stored_crop_matches_analytic_field(width, height, convention, margin):
    boxes = np.array(roi_cases(width, height) if convention == "roi" else point_cases(width, height))
    # every image border is touched by some crop
    assert (boxes[:, 0] == 0).any() and (boxes[:, 1] == 0).any()
    assert (boxes[:, 2] == width).any() and (boxes[:, 3] == height).any()
    teacher: Teacher = LinearFieldTeacher()
    teacher.set_image(np.zeros((height, width, 3), np.uint8))
    out = teacher.predict_boxes(boxes.astype(np.float32))

    stored = crop_logits(out.image_logits, (width, height), boxes, out_size=96, context_margin=margin)

    assert stored.shape == (len(boxes), stored_size(96, margin), stored_size(96, margin))
    assert stored.dtype == torch.float32
    for n, box in enumerate(boxes):
        want = expected_stored(box, width, height, 96, margin, n)
        # 1e-3 px of the field's steepest slope (float32 rounding is far below; a half-pixel slip is 25x above).
        np.testing.assert_allclose(
            stored[n].numpy(),
            want,
            rtol=0,
            atol=1e-3 * max(abs(A), abs(B)) + 2e-5,
            err_msg=f"{convention} box {box.tolist()} in {width}x{height}",
        )


def test_whole_image_box_equals_torch_resize():
    """A crop box covering the whole image is a plain resize: must equal F.interpolate (align_corners=False)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, GRID, GRID, generator=gen) * 8
    boxes = torch.tensor([[0, 0, 320, 200], [0, 0, 320, 200]])  # tensors are accepted as well as arrays
    got = crop_logits(logits, (320, 200), boxes, out_size=96)
    want = F.interpolate(logits[:, None], size=(96, 96), mode="bilinear", align_corners=False)[:, 0]
    # Neighbouring cells differ by ~11 here, so 2e-3 is ~2e-4 of a cell: float32 coordinate rounding, while any
    # sampling-position slip of a tenth of a pixel or more fails.
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("margin", [0.05, 0.1, 0.25, 0.5])
def test_central_block_is_the_crop_frame(margin):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, GRID, GRID, generator=gen) * 8
    boxes = np.array([[10, 20, 110, 90], [0, 0, 64, 64], [250, 300, 320, 400]])  # interior, corner, bottom-right
    plain = crop_logits(logits, (320, 400), boxes, out_size=96, context_margin=0.0)
    wide = crop_logits(logits, (320, 400), boxes, out_size=96, context_margin=margin)
    sl = central_slice(96, margin)
    torch.testing.assert_close(wide[:, sl, sl], plain, rtol=0, atol=2e-3)  # float32 coordinate rounding only


def test_sizes_round_half_up():
    assert stored_size(96, 0.0) == 96
    assert stored_size(96, 0.25) == 144
    assert stored_size(96, 0.1) == 96 + 2 * 10  # 9.6 -> 10
    assert context_pixels(10, 0.25) == 3  # 2.5 rounds up (Python's round() would give 2)
    assert central_slice(96, 0.25) == slice(24, 120)


def test_full_resolution_grid_and_empty_batch():
    # SAM3-style output: the grid is the image's own pixel grid.
    h, w = 60, 80
    field = torch.arange(w, dtype=torch.float32)[None, None, :].expand(1, h, w) + 0.5  # value = pixel centre x
    stored = crop_logits(field, (w, h), np.array([[8, 4, 40, 36]]), out_size=16)
    np.testing.assert_allclose(stored[0, 0].numpy(), 8 + (np.arange(16) + 0.5) * 2, atol=1e-4)
    assert crop_logits(torch.zeros(0, 256, 256), (w, h), np.zeros((0, 4)), 96, 0.25).shape == (0, 144, 144)


def test_rejects_mismatched_or_degenerate_boxes():
    with pytest.raises(ValueError, match="2 logit maps but 1 crop boxes"):
        crop_logits(torch.zeros(2, 8, 8), (8, 8), np.array([[0, 0, 4, 4]]), 4)
    with pytest.raises(ValueError, match="x2 > x1"):
        crop_logits(torch.zeros(1, 8, 8), (8, 8), np.array([[4, 0, 4, 4]]), 4)
