"""Scoring a predictions file against COCO / LVIS annotations (``picosam-pipeline score-predictions``).

Prediction files (image-frame COCO results and crop-frame files, ``predictions.py``) are scored by
:func:`score_predictions` with the papers' crop metrics (``crop_metrics.py``) and, for image-frame files, COCO
``segm`` AP. Their alignment matches the PicoSAM2 reference outputs: the k-th prediction of an image belongs to the
k-th non-crowd annotation of that image, in JSON order.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from picosam_pipeline.data.images import header_sizes
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.crop_metrics import (
    CROP_SIZE,
    PROTOCOLS,
    SIZE_BUCKETS,
    Protocol,
    breakdown,
    full_image_iou,
    gt_crop,
    score_group,
    size_buckets,
)
from picosam_pipeline.evaluate.predictions import decode_masks, read_predictions
from picosam_pipeline.train.iou import crop_ious, gt_nonempty

# --------------------------------------------------------------------------------------------------
# scoring a predictions file against COCO / LVIS annotations


def load_coco(path: str | Path):
    """pycocotools ``COCO`` index of an instances JSON (COCO or LVIS), with pycocotools' progress prints muted."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"annotations file {path} does not exist; pass the COCO/LVIS instances JSON the predictions were made on"
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise PipelineError(
            f"annotations file {path} is not a COCO/LVIS instances JSON ({type(err).__name__}: {err})"
        ) from err


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
            raise PipelineError(
                f"{file}: cannot read the image ({err}); replace the file or remove the image from the annotations"
            ) from err
        found_size = sizes[0]
        if (info["width"], info["height"]) not in sizes:
            raise PipelineError(
                f"{file}: image is {found_size[0]}x{found_size[1]} but the annotations say "
                f"{info['width']}x{info['height']}; crop boxes would be wrong. Use the images the annotations describe"
            )
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
            problems.add(
                "count_mismatch",
                f"image {image_id} has {len(entries)} prediction(s) but {len(anns)} non-crowd annotation(s)",
                image_id,
            )
            continue
        wrong = [
            (k, e["annotation_id"], a["id"])
            for k, (e, a) in enumerate(zip(entries, anns))
            if "annotation_id" in e and e["annotation_id"] != a["id"]
        ]
        if wrong:
            k, named, actual = wrong[0]
            problems.add(
                "annotation_mismatch",
                f"prediction {k} of image {image_id} names annotation {str(named)[:20]} "
                f"but the {k}-th non-crowd annotation is {actual}",
                image_id,
            )
            continue
        aligned[image_id] = (entries, anns)
    return aligned


def _coco_segm_ap(coco, entries: list[dict], image_ids: list[int]) -> dict[str, float] | None:
    """COCOeval('segm') AP, AP50, AP75 of image-frame entries on their images; None when categories lack (the
    scores are finite numbers: ``read_predictions`` refuses any other)."""
    from pycocotools.cocoeval import COCOeval

    if not all(e.get("category_id") in coco.cats for e in entries):
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        results = coco.loadRes(
            [{k: e[k] for k in ("image_id", "category_id", "segmentation", "score")} for e in entries]
        )
        ev = COCOeval(coco, results, "segm")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"ap": float(ev.stats[0]), "ap50": float(ev.stats[1]), "ap75": float(ev.stats[2])}


def score_predictions(
    annotations: str | Path,
    predictions: str | Path,
    protocol: Protocol,
    images_dir: str | Path | None = None,
    size: int = CROP_SIZE,
    *,
    frame: str = "auto",
    allow_partial: bool = False,
) -> dict[str, Any]:
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
        raise PipelineError(
            f"{predictions}: {sum(problems.counts.values())} problem(s) in its {checked.entries} entries: "
            f"{problems.describe()}. The k-th prediction of an image must belong to its k-th non-crowd "
            f"annotation in {annotations} (JSON order). Fix the file, or pass --allow-partial to score "
            "only the images without a problem (the report counts what was skipped)"
        )
    aligned = {i: v for i, v in aligned.items() if i not in problems.bad_images}
    if not aligned:
        raise PipelineError(
            f"{predictions}: no image left to score ({problems.describe() or 'no prediction'}); "
            f"score predictions against the annotations they were made on ({annotations})"
        )

    ious, nonempty, full_ious, areas, categories, scored_entries = [], [], [], [], [], []
    for _image_id, (entries, anns) in tqdm(aligned.items(), desc="scoring", unit="img", disable=None):
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
            categories.append(
                coco.cats[ann["category_id"]]["name"] if ann["category_id"] in coco.cats else str(ann["category_id"])
            )
        if checked.frame == "crop":
            gt_crops = np.stack(gts)  # (n, size, size) uint8
            ious.append(crop_ious(pred, gt_crops))
            nonempty.append(gt_nonempty(gt_crops))
        else:
            nonempty.append(np.array([np.any(g) for g in gts], dtype=bool))
        scored_entries += entries

    nonempty_all = np.concatenate(nonempty)
    full_all, buckets = np.asarray(full_ious, dtype=np.float64), size_buckets(areas)
    report = {
        "protocol": protocol,
        "frame": checked.frame,
        "annotations": str(annotations),
        "predictions": str(predictions),
        "images": len(aligned),
        "images_without_predictions": len(annotated - set(by_image)),
    }
    if problems:
        report["skipped"] = {
            "entries": checked.entries - len(scored_entries),
            "images": len(problems.bad_images),
            "problems": dict(problems.counts),
        }
    if checked.frame == "crop":
        ious_all = np.concatenate(ious)
        report.update(score_group(ious_all, nonempty_all))
        report["by_size"] = breakdown(ious_all, nonempty_all, buckets, order=SIZE_BUCKETS)
        report["by_category"] = breakdown(ious_all, nonempty_all, np.asarray(categories, dtype=str))
    else:
        report.update(
            samples=len(full_all), gt_nonempty=int(nonempty_all.sum()), crop_miou=None, crop_success_map_50_95=None
        )
        report["by_size"] = {b: {"samples": int((buckets == b).sum())} for b in SIZE_BUCKETS if (buckets == b).any()}
        report["by_category"] = {}
        report["coco_segm"] = _coco_segm_ap(coco, scored_entries, list(aligned))
    report["full_image_miou"] = float(full_all.mean())
    for name, group in report["by_size"].items():
        group["full_image_miou"] = float(full_all[buckets == name].mean())
    return report


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_prediction_scores(report: dict[str, Any]) -> str:
    """Human-readable summary of :func:`score_predictions` (3 decimals; categories are in the JSON only)."""
    lines = [
        f"protocol {report['protocol']}, {report['frame']}-frame predictions: {report['samples']} samples from "
        f"{report['images']} images ({report['gt_nonempty']} with a non-empty GT; "
        f"{report['images_without_predictions']} annotated images without predictions not scored)",
    ]
    if "skipped" in report:
        s = report["skipped"]
        lines.append(
            f"partial scoring: skipped {s['entries']} entries of {s['images']} images with problems {s['problems']}"
        )
    if report["frame"] == "crop":
        lines += [
            f"crop mIoU                  {_fmt(report['crop_miou'])}",
            f"crop mAP@[.5:.95]          {_fmt(report['crop_success_map_50_95'])}   "
            "(share with IoU >= t, mean over t = .50:.05:.95; not COCO AP)",
        ]
    else:
        ap = report.get("coco_segm") or {}
        lines += [
            "crop metrics               n/a (image-frame file; score its .crop.json for the papers' crop figures)",
            f"COCO segm AP [.5:.95]      {_fmt(ap.get('ap'))}   AP50 {_fmt(ap.get('ap50'))}   "
            f"AP75 {_fmt(ap.get('ap75'))}" + ("" if ap else "   (needs real category ids)"),
        ]
    lines.append(f"full-image mIoU            {_fmt(report['full_image_miou'])}")
    for name, group in report["by_size"].items():
        crop = (
            f"  crop mIoU {_fmt(group.get('crop_miou'))}  crop mAP {_fmt(group.get('crop_success_map_50_95'))}"
            if report["frame"] == "crop"
            else ""
        )
        lines.append(f"  {name:<7} n={group['samples']:<6}{crop}  full-image mIoU {_fmt(group['full_image_miou'])}")
    return "\n".join(lines)
