"""The PicoSAM papers' crop-space metrics (numpy, no files): crop mIoU, the success "mAP", full-image IoU.

PicoSAM2 and PicoSAM3 measure everything in the ``S x S`` (96 x 96) crop frame the student sees. The
ground truth is the GT mask cut out with the same crop box and resized with NEAREST
(the papers' evaluation code). The metric names say "crop" so nobody reads them as COCO
figures:

* ``crop_miou``: per-sample IoU of ``pred > 0`` (logit > 0, i.e. sigmoid > 0.5) against ``gt > 0.5``,
  where an empty union counts 1.0, averaged over **all** samples.
* ``crop_success_map_50_95``: what the papers call "mAP@[0.5:0.95]". For each t in 0.50, 0.55, ..., 0.95 it
  is the share of samples with IoU >= t, and those shares are averaged over t. Only samples with a
  **non-empty GT crop** count here (the papers skip ``gt.sum() == 0``). There are no scores and no ranking,
  so this is a success rate, not COCO AP.

The trivial baseline (:func:`whole_crop_logits`) answers "the whole crop" for every prompt; scored like a model, it
tells a student that learned something from one that learned nothing (a box ROI crop is mostly object already).

``full_image_iou`` is not a paper metric. It resizes a crop prediction back into its crop box, pastes it
into the image frame and compares it with the full GT mask. It shows how much of a large object a
96-px PicoSAM2 window can never cover.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from PIL import Image

from picosam_pipeline.data.crops import CropBox, point_box, point_prompt, roi_box
from picosam_pipeline.train.iou import crop_ious, gt_nonempty, to_numpy

Protocol = Literal["picosam2-point", "picosam3-roi"]
PROTOCOLS: tuple[str, ...] = ("picosam2-point", "picosam3-roi")
CROP_SIZE = 96
# The thresholds are exact decimals. The papers' np.arange(0.5, 1.0, 0.05) gives 0.6000000000000001 etc., so
# there an IoU of exactly 3/5 fails ">= 0.60". The two versions differ only for an IoU that sits exactly on a
# threshold.
IOU_THRESHOLDS = np.arange(50, 100, 5) / 100.0
SIZE_BUCKETS = ("small", "medium", "large")  # COCO: area < 32^2, < 96^2, the rest (annotation "area")


# --------------------------------------------------------------------------------------------------
# crop-space metrics


def miou_of(ious: np.ndarray) -> float:
    """Mean of per-sample IoUs ``(N,)`` over all samples; NaN for N = 0."""
    return float(np.mean(ious)) if len(ious) else math.nan


def success_map_of(ious: np.ndarray, nonempty: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> float:
    """Papers' "mAP@[.5:.95]" from per-sample IoUs ``(N,)`` and the non-empty-GT flags ``(N,)`` bool.

    Returns the mean over thresholds of the share of non-empty-GT samples with IoU >= t. Every threshold
    sees the same samples, so this equals the mean of the ``(K, T)`` hit matrix. NaN when no GT crop is
    non-empty (the papers' code prints 0.0 there, which looks like a real score).
    """
    kept = np.asarray(ious)[np.asarray(nonempty, dtype=bool)]
    if kept.size == 0:
        return math.nan
    return float(np.mean(kept[:, None] >= thresholds[None, :]))


def crop_miou(pred: Any, gt: Any) -> float:
    """Papers' mIoU in the crop frame: ``pred``/``gt`` as in :func:`crop_ious`, empty union = 1, all samples."""
    return miou_of(crop_ious(pred, gt))


def crop_success_map_50_95(pred: Any, gt: Any) -> float:
    """Papers' "mAP@[.5:.95]" (success rate over IoU thresholds, non-empty GT crops only; not COCO AP)."""
    return success_map_of(crop_ious(pred, gt), gt_nonempty(gt))


def whole_crop_logits(batch: int, size: int) -> np.ndarray:
    """The trivial baseline's answer: every pixel of every crop foreground, float32 ``(batch, 1, size, size)``
    logits of +1."""
    return np.ones((batch, 1, size, size), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# breakdowns


def size_buckets(areas: Any) -> np.ndarray:
    """COCO size bucket per annotation area ``(N,)`` (px^2): small < 32^2 <= medium < 96^2 <= large."""
    a = np.asarray(areas, dtype=np.float64)
    return np.where(a < 32**2, "small", np.where(a < 96**2, "medium", "large"))


def score_group(ious: np.ndarray, nonempty: np.ndarray) -> dict[str, Any]:
    """Counts and both crop metrics for one group of samples (JSON-ready: NaN becomes None)."""
    miou, smap = miou_of(ious), success_map_of(ious, nonempty)
    return {
        "samples": int(len(ious)),
        "gt_nonempty": int(np.count_nonzero(nonempty)),
        "crop_miou": None if math.isnan(miou) else miou,
        "crop_success_map_50_95": None if math.isnan(smap) else smap,
    }


def breakdown(ious: np.ndarray, nonempty: np.ndarray, keys: Any, order: Iterable[str] | None = None) -> dict[str, dict]:
    """:func:`score_group` per group; ``keys`` ``(N,)`` names each sample's group (size bucket, category name).

    Groups come in ``order`` when given (groups with no sample are left out), else sorted.
    """
    keys = np.asarray(keys)
    present = set(keys.tolist())
    names = [k for k in order if k in present] if order is not None else sorted(present)
    return {name: score_group(ious[keys == name], nonempty[keys == name]) for name in names}


# --------------------------------------------------------------------------------------------------
# back to the image frame


def resize_crop_to_box(crop: Any, box: CropBox) -> np.ndarray:
    """Resize an ``(S, S)`` (or ``(1, S, S)``) crop prediction to its box: ``(box.height, box.width)`` bool.

    Float input is taken as **logits**: bilinear (``F.interpolate``, ``align_corners=False``) on the logits,
    then ``> 0``. PicoSAM3's demo interpolates sigmoid probabilities and thresholds at 0.5, which differs
    only at soft edges. Bool/integer input is taken as a **mask**: PIL NEAREST, the same resize that made
    the GT crop, then ``> 0``. A float {0, 1} mask would be read as logits, so pass masks as bool or uint8.
    """
    arr = to_numpy(crop)
    arr = arr.reshape(arr.shape[-2:])
    h, w = box.height, box.width
    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    if arr.dtype.kind == "f":
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
        return (F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0).numpy()
    mask = Image.fromarray(np.ascontiguousarray(arr > 0, dtype=np.uint8))
    return np.asarray(mask.resize((w, h), Image.NEAREST)) > 0


def paste_crop(crop: Any, box: CropBox, image_hw: tuple[int, int]) -> np.ndarray:
    """Full-image ``(H, W)`` bool mask: the crop prediction resized into ``box`` (see
    :func:`resize_crop_to_box`), background elsewhere."""
    out = np.zeros(image_hw, dtype=bool)
    out[box.y1 : box.y2, box.x1 : box.x2] = resize_crop_to_box(crop, box)
    return out


def full_image_iou(crop: Any, box: CropBox, gt_mask: np.ndarray) -> float:
    """IoU of the pasted crop prediction against the full ``(H, W)`` GT mask (``> 0.5``); empty union = 1.

    Counts inside the box only. Outside it the prediction is background, so the union is
    ``|GT| + |pred| - |pred & GT|`` and no full-size mask is built.
    """
    gt_mask = np.asarray(gt_mask)
    # An integer or bool mask is > 0.5 exactly where it is non-zero: counted in place, without a full-image copy
    # (thresholding the whole image for every sample and model was a fifth of evaluate's time at COCO scale).
    gt_pixels = np.count_nonzero(gt_mask if gt_mask.dtype.kind in "bu" else gt_mask > 0.5)
    return pasted_iou(crop, box, gt_mask[box.y1 : box.y2, box.x1 : box.x2] > 0.5, gt_pixels)


def pasted_iou(crop: Any, box: CropBox, gt_in_box: np.ndarray, gt_pixels: int) -> float:
    """:func:`full_image_iou` from the GT inside ``box`` (``(box.height, box.width)``, non-zero = object) and the
    GT's pixel count in the whole image: all it depends on (evaluate decodes only the box of each GT mask)."""
    inside = resize_crop_to_box(crop, box)
    inter = np.count_nonzero(inside & (gt_in_box != 0))
    union = gt_pixels + np.count_nonzero(inside) - inter
    return inter / union if union else 1.0


# --------------------------------------------------------------------------------------------------
# ground-truth crops


def gt_crop(
    mask: np.ndarray,
    bbox_xywh: Any,
    protocol: Protocol,
    size: int = CROP_SIZE,
    roi_padding: float = 0.1,
    window: int = 96,
) -> tuple[np.ndarray, CropBox]:
    """GT crop of the papers: ``(size, size)`` uint8 {0, 1}, and the crop box it was cut from.

    ``mask`` is the full ``(H, W)`` uint8 GT mask (pycocotools ``annToMask``). For ``picosam2-point`` the box
    is the ``window``-px window around the point prompt. For ``picosam3-roi`` it is the padded square ROI of the
    COCO ``bbox_xywh``. Both come from ``crops.py``. The window is resized with PIL NEAREST, as in the papers.
    A degenerate box (a sub-pixel bbox truncated to zero width) gives an empty crop.
    """
    h, w = mask.shape
    if protocol == "picosam2-point":
        cx, cy = point_prompt(mask)
        box = point_box(cx, cy, w, h, window)
    elif protocol == "picosam3-roi":
        box, _ = roi_box(bbox_xywh, w, h, roi_padding)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if box.width <= 0 or box.height <= 0:
        return np.zeros((size, size), dtype=np.uint8), box
    window_mask = Image.fromarray(np.ascontiguousarray(mask[box.y1 : box.y2, box.x1 : box.x2], dtype=np.uint8))
    return np.asarray(window_mask.resize((size, size), Image.NEAREST)), box
