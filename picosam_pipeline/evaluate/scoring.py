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

Prediction files (image-frame COCO results and crop-frame files, ``predictions.py``) are scored by
``score_predictions``. Their alignment matches the PicoSAM2 reference outputs (``../shared/data/README.md``): the
k-th prediction of an image belongs to the k-th non-crowd annotation of that image, in JSON order.
"""

from __future__ import annotations

import contextlib
import io
import math
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


def _mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two full-image masks (non-zero = foreground); empty union = 1."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0.5
    union = np.count_nonzero(pred | gt)
    return np.count_nonzero(pred & gt) / union if union else 1.0


def _align(coco, by_image: dict[int, list[dict]], problems) -> dict[int, tuple[list[dict], list[dict]]]:
    """``{image_id: (entries, annotations)}`` of images whose predictions line up with their non-crowd annotations."""
    aligned = {}
    for image_id, entries in by_image.items():
        anns = [a for a in coco.imgToAnns.get(image_id, []) if _scorable(a)]
        if len(entries) != len(anns):
            problems.add("count_mismatch", f"image {image_id} has {len(entries)} prediction(s) but {len(anns)} "
                                           "non-crowd annotation(s)", image_id)
            continue
        wrong = [(k, e["annotation_id"], a["id"]) for k, (e, a) in enumerate(zip(entries, anns))
                 if "annotation_id" in e and e["annotation_id"] != a["id"]]
        if wrong:
            k, named, actual = wrong[0]
            problems.add("annotation_mismatch", f"prediction {k} of image {image_id} names annotation {str(named)[:20]} "
                                                f"but the {k}-th non-crowd annotation is {actual}", image_id)
            continue
        aligned[image_id] = (entries, anns)
    return aligned


def _coco_segm_ap(coco, entries: list[dict], image_ids: list[int]) -> dict[str, float] | None:
    """COCOeval('segm') AP, AP50, AP75 of image-frame entries on their images; None when categories or scores lack."""
    from pycocotools.cocoeval import COCOeval

    if not all(e.get("category_id") in coco.cats and isinstance(e.get("score"), (int, float)) for e in entries):
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        results = coco.loadRes([{k: e[k] for k in ("image_id", "category_id", "segmentation", "score")} for e in entries])
        ev = COCOeval(coco, results, "segm")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"ap": float(ev.stats[0]), "ap50": float(ev.stats[1]), "ap75": float(ev.stats[2])}


def score_predictions(annotations: str | Path, predictions: str | Path, protocol: Protocol,
                      images_dir: str | Path | None = None, size: int = CROP_SIZE, *, frame: str = "auto",
                      allow_partial: bool = False) -> dict[str, Any]:
    """Score a predictions file (crop frame or image frame, see ``predictions.py``); returns a JSON-ready report.

    Every image in the file must carry exactly one prediction per non-crowd annotation (k-th prediction = k-th
    annotation in JSON order). Annotated images with no prediction at all are left out and counted. With
    ``images_dir`` the PicoSAM3/LVIS rule applies: images whose file is missing are not scored, and a prediction for
    one of them is a problem. Any problem in the file (see ``predictions.PROBLEM_TEXT``) stops with one message
    that counts each kind, unless ``allow_partial``: then the images with a problem are skipped and counted.

    Crop frame: the papers' crop metrics, and the full-image IoU of the crop mask resized NEAREST into its box (what
    ``evaluate`` reports). Image frame: the full-image IoU of the given masks, COCO ``segm`` AP (COCOeval), and no
    crop metrics (they need the crop-frame file).
    """
    from tqdm import tqdm

    from picosam_pipeline.evaluate.predictions import decode_masks, read_predictions

    if protocol not in PROTOCOLS:
        raise PipelineError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    coco = load_coco(annotations)
    images = {i: (int(info["height"]), int(info["width"])) for i, info in coco.imgs.items()}
    checked = read_predictions(predictions, images, frame=frame, crop_size=size)
    problems, by_image = checked.problems, checked.by_image
    annotated = {i for i, anns in coco.imgToAnns.items() if any(_scorable(a) for a in anns)}
    if images_dir is not None:
        on_disk = _images_on_disk(coco, annotated | set(by_image), Path(images_dir))
        for image_id in [i for i in by_image if i not in on_disk]:
            problems.add("missing_image_file", f"image {image_id}", image_id)
        annotated &= on_disk
    aligned = _align(coco, by_image, problems)
    if problems and not allow_partial:
        raise PipelineError(f"{predictions}: {sum(problems.counts.values())} problem(s) in its {checked.entries} entries: "
                            f"{problems.describe()}. The k-th prediction of an image must belong to its k-th non-crowd "
                            f"annotation in {annotations} (JSON order). Fix the file, or pass --allow-partial to score "
                            "only the images without a problem (the report counts what was skipped)")
    aligned = {i: v for i, v in aligned.items() if i not in problems.bad_images}
    if not aligned:
        raise PipelineError(f"{predictions}: no image left to score ({problems.describe() or 'no prediction'}); "
                            f"score predictions against the annotations they were made on ({annotations})")

    ious, nonempty, full_ious, areas, categories, scored_entries = [], [], [], [], [], []
    for image_id, (entries, anns) in tqdm(aligned.items(), desc="scoring", unit="img", disable=None):
        pred = decode_masks(entries)  # (n, S, S) crop frame or (n, H, W) image frame, bool
        gts = []
        for k, ann in enumerate(anns):
            mask = coco.annToMask(ann)
            if checked.frame == "crop":
                crop, box = gt_crop(mask, ann["bbox"], protocol, size)
                gts.append(crop)
                full_ious.append(full_image_iou(pred[k], box, mask))
            else:
                gts.append(mask)
                full_ious.append(_mask_iou(pred[k], mask))
            areas.append(float(ann.get("area", np.count_nonzero(mask))))
            categories.append(coco.cats[ann["category_id"]]["name"] if ann["category_id"] in coco.cats else str(ann["category_id"]))
        if checked.frame == "crop":
            gt_crops = np.stack(gts)  # (n, size, size) uint8
            ious.append(crop_ious(pred, gt_crops))
            nonempty.append(gt_nonempty(gt_crops))
        else:
            nonempty.append(np.array([np.any(g) for g in gts], dtype=bool))
        scored_entries += entries

    nonempty_all = np.concatenate(nonempty)
    full_all, buckets = np.asarray(full_ious, dtype=np.float64), size_buckets(areas)
    report = {"protocol": protocol, "frame": checked.frame, "annotations": str(annotations),
              "predictions": str(predictions), "images": len(aligned),
              "images_without_predictions": len(annotated - set(by_image))}
    if problems:
        report["skipped"] = {"entries": checked.entries - len(scored_entries), "images": len(problems.bad_images),
                             "problems": dict(problems.counts)}
    if checked.frame == "crop":
        ious_all = np.concatenate(ious)
        report.update(summarize(ious_all, nonempty_all))
        report["by_size"] = breakdown(ious_all, nonempty_all, buckets, order=SIZE_BUCKETS)
        report["by_category"] = breakdown(ious_all, nonempty_all, np.asarray(categories, dtype=str))
    else:
        report.update(samples=len(full_all), gt_nonempty=int(nonempty_all.sum()), crop_miou=None,
                      crop_success_map_50_95=None)
        report["by_size"] = {b: {"samples": int((buckets == b).sum())} for b in SIZE_BUCKETS if (buckets == b).any()}
        report["by_category"] = {}
        report["coco_segm"] = _coco_segm_ap(coco, scored_entries, list(aligned))
    report["full_image_miou"] = float(full_all.mean())
    for name, group in report["by_size"].items():
        group["full_image_miou"] = float(full_all[buckets == name].mean())
    return report


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of :func:`score_predictions` (3 decimals; categories are in the JSON only)."""
    lines = [
        f"protocol {report['protocol']}, {report['frame']}-frame predictions: {report['samples']} samples from "
        f"{report['images']} images ({report['gt_nonempty']} with a non-empty GT; {report['images_without_predictions']} "
        "annotated images without predictions not scored)",
    ]
    if "skipped" in report:
        s = report["skipped"]
        lines.append(f"partial scoring: skipped {s['entries']} entries of {s['images']} images with problems {s['problems']}")
    if report["frame"] == "crop":
        lines += [
            f"crop mIoU                  {_fmt(report['crop_miou'])}",
            f"crop mAP@[.5:.95]          {_fmt(report['crop_success_map_50_95'])}   (share with IoU >= t, mean over t = .50:.05:.95; not COCO AP)",
        ]
    else:
        ap = report.get("coco_segm") or {}
        lines += ["crop metrics               n/a (image-frame file; score its .crop.json for the papers' crop figures)",
                  f"COCO segm AP [.5:.95]      {_fmt(ap.get('ap'))}   AP50 {_fmt(ap.get('ap50'))}   AP75 {_fmt(ap.get('ap75'))}"
                  + ("" if ap else "   (needs real category ids and scores)")]
    lines.append(f"full-image mIoU            {_fmt(report['full_image_miou'])}")
    for name, group in report["by_size"].items():
        crop = (f"  crop mIoU {_fmt(group.get('crop_miou'))}  crop mAP {_fmt(group.get('crop_success_map_50_95'))}"
                if report["frame"] == "crop" else "")
        lines.append(f"  {name:<7} n={group['samples']:<6}{crop}  full-image mIoU {_fmt(group['full_image_miou'])}")
    return "\n".join(lines)
