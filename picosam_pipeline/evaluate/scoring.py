"""The PicoSAM papers' crop-space metrics, and scoring of crop-frame prediction files.

PicoSAM2 and PicoSAM3 measure everything in the ``S x S`` (96 x 96) crop frame the student sees. The
ground truth is the GT mask cut out with the same crop box and resized with NEAREST
(``../shared/docs/picosam-reference.md`` section 6). The metric names say "crop" so nobody reads them as COCO
figures:

* ``crop_miou``: per-sample IoU of ``pred > 0`` (logit > 0, i.e. sigmoid > 0.5) against ``gt > 0.5``,
  where an empty union counts 1.0, averaged over **all** samples.
* ``crop_success_map_50_95``: what the papers call "mAP@[0.5:0.95]". For each t in 0.50, 0.55, ..., 0.95 it
  is the share of samples with IoU >= t, and those shares are averaged over t. Only samples with a
  **non-empty GT crop** count here (the papers skip ``gt.sum() == 0``). There are no scores and no ranking,
  so this is a success rate, not COCO AP.

``full_image_iou`` is not a paper metric. It resizes a crop prediction back into its crop box, pastes it
into the image frame and compares it with the full GT mask. It shows how much of a large object a
96-px PicoSAM2 window can never cover.

A predictions file is a COCO results list of crop-frame RLE masks. Its alignment matches the PicoSAM2
reference outputs (``../shared/data/README.md``): the k-th prediction of an image belongs to the k-th
non-crowd annotation of that image, in JSON order. ``write_predictions`` writes that format and
``score_predictions`` scores it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
from PIL import Image

from picosam_pipeline.data.crops import CropBox, point_box, point_prompt, roi_box
from picosam_pipeline.data.images import header_sizes
from picosam_pipeline.errors import PipelineError
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


# --------------------------------------------------------------------------------------------------
# breakdowns


def size_buckets(areas: Any) -> np.ndarray:
    """COCO size bucket per annotation area ``(N,)`` (px^2): small < 32^2 <= medium < 96^2 <= large."""
    a = np.asarray(areas, dtype=np.float64)
    return np.where(a < 32**2, "small", np.where(a < 96**2, "medium", "large"))


def summarize(ious: np.ndarray, nonempty: np.ndarray) -> dict[str, Any]:
    """Counts and both crop metrics for one group of samples (JSON-ready: NaN becomes None)."""
    miou, smap = miou_of(ious), success_map_of(ious, nonempty)
    return {
        "samples": int(len(ious)),
        "gt_nonempty": int(np.count_nonzero(nonempty)),
        "crop_miou": None if math.isnan(miou) else miou,
        "crop_success_map_50_95": None if math.isnan(smap) else smap,
    }


def breakdown(ious: np.ndarray, nonempty: np.ndarray, keys: Any, order: Iterable[str] | None = None) -> dict[str, dict]:
    """:func:`summarize` per group; ``keys`` ``(N,)`` names each sample's group (size bucket, category name).

    Groups come in ``order`` when given (groups with no sample are left out), else sorted.
    """
    keys = np.asarray(keys)
    present = set(keys.tolist())
    names = [k for k in order if k in present] if order is not None else sorted(present)
    return {name: summarize(ious[keys == name], nonempty[keys == name]) for name in names}


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
    inside = resize_crop_to_box(crop, box)
    gt = np.asarray(gt_mask) > 0.5
    inter = np.count_nonzero(inside & gt[box.y1 : box.y2, box.x1 : box.x2])
    union = np.count_nonzero(gt) + np.count_nonzero(inside) - inter
    return inter / union if union else 1.0


# --------------------------------------------------------------------------------------------------
# ground-truth crops


def gt_crop(mask: np.ndarray, bbox_xywh: Any, protocol: Protocol, size: int = CROP_SIZE,
            roi_padding: float = 0.1, window: int = 96) -> tuple[np.ndarray, CropBox]:
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


# --------------------------------------------------------------------------------------------------
# prediction files (COCO results format, crop-frame RLE)


@dataclass(frozen=True)
class CropPrediction:
    """One crop-frame prediction, the unit of a predictions file.

    ``logits``: ``(S, S)`` or ``(1, S, S)`` numpy/torch; float logits (foreground = logit > 0) or a bool/int mask.
    ``category_id`` is 1 in the PicoSAM2 reference files; the scorer takes categories from the GT.
    ``annotation_id``, when set, is written too and checked by the scorer against the aligned annotation.
    """

    image_id: int
    logits: Any
    score: float
    category_id: int = 1
    annotation_id: int | None = None


def encode_crop_mask(pred: Any) -> dict[str, Any]:
    """COCO compressed RLE ``{"size": [S, S], "counts": str}`` of ``pred > 0`` (``(S, S)`` or ``(1, S, S)``)."""
    from pycocotools import mask as mask_utils

    arr = to_numpy(pred)
    binary = np.asfortranarray(arr.reshape(arr.shape[-2:]) > 0, dtype=np.uint8)
    rle = mask_utils.encode(binary)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_predictions(records: Iterable[CropPrediction], path: str | Path) -> int:
    """Write crop predictions as a COCO results JSON list (the PicoSAM2 reference format); returns the count.

    Each entry is ``{"image_id", "category_id", "segmentation": RLE, "score", "id"}``, plus ``"annotation_id"`` when
    the record has one. Records must come in scoring order: within an image, one per non-crowd annotation,
    in annotation JSON order. The file appears atomically, so an interrupted run leaves no half-written file.
    """
    entries = []
    for k, rec in enumerate(records):
        entry = {"image_id": int(rec.image_id), "category_id": int(rec.category_id),
                 "segmentation": encode_crop_mask(rec.logits), "score": float(rec.score), "id": k}
        if rec.annotation_id is not None:
            entry["annotation_id"] = int(rec.annotation_id)
        entries.append(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)
    return len(entries)


def read_predictions(path: str | Path) -> dict[int, list[dict]]:
    """Predictions grouped by image id; each image's entries stay in file order (= annotation order)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"predictions file {path} does not exist; pass a COCO results JSON of crop-frame RLE masks (see write_predictions)")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"predictions file {path} is not valid JSON ({err}); it must be a COCO results list") from err
    if not isinstance(entries, list):
        raise PipelineError(f"predictions file {path}: expected a JSON list of results, got {type(entries).__name__}")
    grouped: dict[int, list[dict]] = {}
    for i, entry in enumerate(entries):
        seg = entry.get("segmentation") if isinstance(entry, dict) else None
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg or "image_id" not in entry:
            raise PipelineError(f"predictions file {path}, entry {i}: expected image_id and an RLE segmentation {{size, counts}}, got {str(entry)[:120]}")
        grouped.setdefault(int(entry["image_id"]), []).append(entry)
    return grouped


def decode_crop_masks(entries: list[dict], size: int, source: str | Path) -> np.ndarray:
    """``(N, size, size)`` bool masks of prediction entries (RLE decoded with pycocotools, foreground = 1)."""
    from pycocotools import mask as mask_utils

    rles = []
    for entry in entries:
        seg = entry["segmentation"]
        if list(seg["size"]) != [size, size]:
            raise PipelineError(f"{source}: prediction for image {entry['image_id']} has mask size {seg['size']}, expected [{size}, {size}] crop-frame masks")
        # Uncompressed RLE (a list of counts) must be converted first; compressed strings decode directly.
        rles.append(mask_utils.frPyObjects(seg, size, size) if isinstance(seg["counts"], list) else seg)
    return np.moveaxis(mask_utils.decode(rles), -1, 0) > 0


# --------------------------------------------------------------------------------------------------
# scoring a predictions file against COCO / LVIS annotations


def load_coco(path: str | Path):
    """pycocotools ``COCO`` index of an instances JSON (COCO or LVIS), with pycocotools' progress prints muted."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"annotations file {path} does not exist; pass the COCO/LVIS instances JSON the predictions were made on")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise PipelineError(f"annotations file {path} is not a COCO/LVIS instances JSON ({type(err).__name__}: {err})") from err


def _scorable(ann: dict) -> bool:
    """The papers' sample filter: has a segmentation and is not a crowd region (LVIS has no iscrowd)."""
    return "segmentation" in ann and ann.get("iscrowd", 0) == 0


def _images_on_disk(coco, image_ids: Iterable[int], images_dir: Path) -> set[int]:
    """Ids whose file exists in ``images_dir``; a file whose size disagrees with the JSON is an error."""
    found = set()
    for image_id in image_ids:
        info = coco.imgs[image_id]
        file = images_dir / info.get("file_name", f"{image_id:012d}.jpg")
        if not file.is_file():
            continue
        try:
            sizes = header_sizes(file)  # stored and EXIF-rotated: load_image accepts either orientation
        except OSError as err:
            raise PipelineError(f"{file}: cannot read the image ({err}); replace the file or remove the image from the annotations") from err
        found_size = sizes[0]
        if (info["width"], info["height"]) not in sizes:
            raise PipelineError(f"{file}: image is {found_size[0]}x{found_size[1]} but the annotations say {info['width']}x{info['height']}; crop boxes would be wrong. Use the images the annotations describe")
        found.add(image_id)
    return found


def score_predictions(annotations: str | Path, predictions: str | Path, protocol: Protocol,
                      images_dir: str | Path | None = None, size: int = CROP_SIZE) -> dict[str, Any]:
    """Score a crop-frame predictions file with the papers' metrics; returns a JSON-ready report.

    Every image in the file must carry exactly one prediction per non-crowd annotation (k-th prediction =
    k-th annotation in JSON order). Annotated images with no prediction at all are left out and counted.
    With ``images_dir`` the PicoSAM3/LVIS rule applies: images whose file is missing are not scored, and
    a prediction for one of them is an error.
    """
    from tqdm import tqdm

    if protocol not in PROTOCOLS:
        raise PipelineError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    coco = load_coco(annotations)
    by_image = read_predictions(predictions)
    unknown = [i for i in by_image if i not in coco.imgs]
    if unknown:
        raise PipelineError(f"{predictions}: {len(unknown)} image id(s) are not in {annotations} (e.g. {unknown[:5]}); score predictions against the annotations they were made on")
    annotated = {i for i, anns in coco.imgToAnns.items() if any(_scorable(a) for a in anns)}
    if images_dir is not None:
        on_disk = _images_on_disk(coco, annotated | set(by_image), Path(images_dir))
        missing = [i for i in by_image if i not in on_disk]
        if missing:
            raise PipelineError(f"{predictions}: predictions for {len(missing)} image(s) whose file is missing from {images_dir} (e.g. {missing[:5]}); pass the image folder the predictions were made on")
        annotated &= on_disk

    ious, nonempty, full_ious, areas, categories = [], [], [], [], []
    for image_id, entries in tqdm(by_image.items(), desc="scoring", unit="img", disable=None):
        anns = [a for a in coco.imgToAnns.get(image_id, []) if _scorable(a)]
        if len(entries) != len(anns):
            raise PipelineError(f"{predictions}: image {image_id} has {len(entries)} prediction(s) but {len(anns)} non-crowd annotation(s) in {annotations}; the k-th prediction of an image must belong to its k-th non-crowd annotation (JSON order)")
        pred = decode_crop_masks(entries, size, predictions)
        gts = []
        for k, (entry, ann) in enumerate(zip(entries, anns)):
            if "annotation_id" in entry and int(entry["annotation_id"]) != ann["id"]:
                raise PipelineError(f"{predictions}: prediction {k} of image {image_id} names annotation {entry['annotation_id']} but the {k}-th non-crowd annotation is {ann['id']}; keep annotation JSON order")
            mask = coco.annToMask(ann)
            crop, box = gt_crop(mask, ann["bbox"], protocol, size)
            gts.append(crop)
            full_ious.append(full_image_iou(pred[k], box, mask))
            areas.append(float(ann.get("area", np.count_nonzero(mask))))
            categories.append(coco.cats[ann["category_id"]]["name"] if ann["category_id"] in coco.cats else str(ann["category_id"]))
        gt_crops = np.stack(gts)  # (n, size, size) uint8
        ious.append(crop_ious(pred, gt_crops))
        nonempty.append(gt_nonempty(gt_crops))

    ious_all = np.concatenate(ious) if ious else np.zeros(0)
    nonempty_all = np.concatenate(nonempty) if nonempty else np.zeros(0, dtype=bool)
    report = {"protocol": protocol, "annotations": str(annotations), "predictions": str(predictions),
              "images": len(by_image), "images_without_predictions": len(annotated - set(by_image))}
    report.update(summarize(ious_all, nonempty_all))
    report["full_image_miou"] = float(np.mean(full_ious)) if full_ious else None
    report["by_size"] = breakdown(ious_all, nonempty_all, size_buckets(areas), order=SIZE_BUCKETS)
    report["by_category"] = breakdown(ious_all, nonempty_all, np.asarray(categories, dtype=str))
    return report


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of :func:`score_predictions` (3 decimals; categories are in the JSON only)."""
    lines = [
        f"protocol {report['protocol']}: {report['samples']} samples from {report['images']} images "
        f"({report['gt_nonempty']} with a non-empty GT crop; {report['images_without_predictions']} annotated images without predictions not scored)",
        f"crop mIoU                  {_fmt(report['crop_miou'])}",
        f"crop mAP@[.5:.95]          {_fmt(report['crop_success_map_50_95'])}   (share with IoU >= t, mean over t = .50:.05:.95; not COCO AP)",
        f"full-image mIoU (pasted)   {_fmt(report['full_image_miou'])}",
    ]
    for name, group in report["by_size"].items():
        lines.append(f"  {name:<7} n={group['samples']:<6} crop mIoU {_fmt(group['crop_miou'])}  crop mAP {_fmt(group['crop_success_map_50_95'])}")
    return "\n".join(lines)
