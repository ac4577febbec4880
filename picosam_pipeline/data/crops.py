"""Crop-frame geometry for the two PicoSAM prompt conventions.

A *crop box* is ``(x1, y1, x2, y2)`` in image pixels, integer, half-open (``x1 <= x < x2``), always inside
the image. The student sees that window resized to ``S x S`` (bilinear for the image, nearest for masks);
with PyTorch/PIL's ``align_corners=False`` convention, crop pixel ``u`` (0..S-1) has its centre at image
coordinate ``x1 + (u + 0.5) * (x2 - x1) / S`` (pixel centres at ``x + 0.5``).

Conventions (``../shared/docs/picosam-reference.md`` section 2):

* **PicoSAM3 ROI** (``roi_box``): COCO bbox ``[x, y, w, h]`` grown by ``padding * w`` / ``padding * h`` per side,
  made square (side = the larger grown side) around the box centre, clipped to the image and truncated
  with ``int()``. Near a border the clipped box is not square and the crop is stretched.
* **PicoSAM2 point crop** (``point_prompt`` + ``point_box``): the prompt is the centre of the mask's tight
  pixel bbox, or the mask pixel nearest to it when that centre is not in the mask; the crop is the
  ``size``-px native-resolution window with ``left = max(0, cx - size // 2)``, ``right = min(W, left + size)``
  (same for y). Clipping happens only at the right/bottom border (then the window is smaller and stretched).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class FloatBox(NamedTuple):
    """Unclipped float box ``(x1, y1, x2, y2)`` in image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float


class CropBox(NamedTuple):
    """Integer crop box ``(x1, y1, x2, y2)``, half-open, inside the image."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1


def roi_float_box(bbox_xywh: tuple[float, float, float, float] | list[float], padding: float = 0.1) -> FloatBox:
    """The PicoSAM3 square ROI before clipping: bbox padded by ``padding`` of w/h per side, squared on its centre."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    x -= padding * w
    y -= padding * h
    w *= 1.0 + 2.0 * padding
    h *= 1.0 + 2.0 * padding
    side = max(w, h)
    cx, cy = x + w / 2.0, y + h / 2.0
    return FloatBox(cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)


def clip_box(box: FloatBox, width: int, height: int) -> CropBox:
    """Clip a float box to ``[0, width] x [0, height]`` and truncate with ``int()`` as PicoSAM3 does."""
    return CropBox(
        int(max(0.0, box.x1)),
        int(max(0.0, box.y1)),
        int(min(float(width), box.x2)),
        int(min(float(height), box.y2)),
    )


def roi_box(bbox_xywh, width: int, height: int, padding: float = 0.1) -> tuple[CropBox, FloatBox]:
    """PicoSAM3 ROI crop box (clipped, integer) and the unclipped float square it came from."""
    float_box = roi_float_box(bbox_xywh, padding)
    return clip_box(float_box, width, height), float_box


def point_prompt(mask: np.ndarray) -> tuple[int, int]:
    """PicoSAM2 prompt point ``(cx, cy)`` for a binary mask of shape ``(H, W)``.

    Centre of the mask's tight pixel bbox (integer division); if that pixel is background, the
    foreground pixel nearest to it (squared distance; the first in row-major order on ties). An empty
    mask gives the image centre ``(W // 2, H // 2)``.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask.shape[1] // 2, mask.shape[0] // 2
    cx = (int(xs.min()) + int(xs.max())) // 2
    cy = (int(ys.min()) + int(ys.max())) // 2
    if mask[cy, cx]:
        return cx, cy
    # np.nonzero is row-major, so argmin's first-minimum rule gives the row-major tie-break.
    d2 = (xs.astype(np.int64) - cx) ** 2 + (ys.astype(np.int64) - cy) ** 2
    i = int(np.argmin(d2))
    return int(xs[i]), int(ys[i])


def point_box(cx: int, cy: int, width: int, height: int, size: int = 96) -> CropBox:
    """PicoSAM2 ``size``-px window around ``(cx, cy)``: left/top clamped to >= 0, right/bottom to the image."""
    left = max(0, cx - size // 2)
    top = max(0, cy - size // 2)
    return CropBox(left, top, min(width, left + size), min(height, top + size))


def crop_pixel_centres(
    box: CropBox | FloatBox | tuple[float, float, float, float], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates ``(xs, ys)``, each of shape ``(size,)``, of the crop pixels' centres.

    Uses the ``align_corners=False`` convention of PIL and ``F.interpolate``: crop pixel ``u`` samples image
    coordinate ``x1 + (u + 0.5) * (x2 - x1) / size`` where image pixel ``i`` covers ``[i, i + 1)``.
    """
    x1, y1, x2, y2 = box
    u = (np.arange(size, dtype=np.float64) + 0.5) / size
    return x1 + u * (x2 - x1), y1 + u * (y2 - y1)


# --------------------------------------------------------------------------------------------------
# the crop convention record every artifact carries (shards.json, student.pt, the ONNX files, the deploy folder)

CONVENTIONS = {"roi": ("box", "PicoSAM3"), "point": ("point", "PicoSAM2")}  # convention -> (prompt kind, paper)
CONVENTION_KEYS = ("convention", "roi_padding", "window", "input_size")  # what must agree between two records


def crop_convention(convention: str, *, roi_padding: float, window: int, input_size: int) -> dict:
    """The record of the crop a student is trained on:
    ``{convention, prompt, paper, roi_padding | window, input_size}``.

    ``roi``: the box padded by ``roi_padding`` per side, squared, clipped (:func:`roi_box`); ``point``: the
    ``window``-px native-resolution window around the point (:func:`point_box`). Either is resized to ``input_size``
    px.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"crop convention {convention!r}: expected one of {list(CONVENTIONS)}")
    prompt, paper = CONVENTIONS[convention]
    params = {"roi_padding": float(roi_padding)} if convention == "roi" else {"window": int(window)}
    return {"convention": convention, "prompt": prompt, "paper": paper, **params, "input_size": int(input_size)}


def convention_differences(found: dict | None, expected: dict | None) -> list[str]:
    """``key: found != expected`` for the keys of :data:`CONVENTION_KEYS` that differ (``[]``: the same crop)."""
    found, expected = found or {}, expected or {}
    return [f"{k} {found.get(k)!r} != {expected.get(k)!r}" for k in CONVENTION_KEYS if found.get(k) != expected.get(k)]
