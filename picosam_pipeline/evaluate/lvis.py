"""Evaluate a student straight from an LVIS (or COCO) instances JSON and an image folder: no shards, no teacher.

The papers' LVIS protocol (``docs/papers.md`` section 3): ``lvis_v1_val.json`` with images
read from the COCO **val2017** folder, so annotations of the LVIS val images that COCO files under train2017
have no image there. The papers drop those silently; here they are counted (``annotations_without_image``) and
reported beside the scores. Only ``images_dir/file_name`` is looked at (not the sibling train2017 folder that
``coco.ImageRecord.resolve_path`` would also try), to keep that protocol.

Each usable annotation becomes one sample exactly as in the papers' benchmark: GT crop with
``crop_metrics.gt_crop`` (PicoSAM3 ROI or PicoSAM2 point window from ``crops.py``, NEAREST), image crop with
``predict.crop_rgb`` (PIL bilinear), student forward; the batches then go through
``score_table.evaluate_batches`` like loader batches, so the figures mean the same thing.

The file's format and LVIS version are detected (``coco.detect_format``: v1 has 1203 categories, v0.5 1230
with different ids) and reported; v0.5 scores are not comparable with the papers' v1 figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from picosam_pipeline.data.coco import AnnotationSet, ImageRecord, check_annotation, load_annotations
from picosam_pipeline.data.crop_convention import index_crop_params
from picosam_pipeline.data.images import BadImageError, load_image
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.crop_metrics import Protocol, gt_crop
from picosam_pipeline.evaluate.predict import CropModel, crop_rgb, to_model_input
from picosam_pipeline.evaluate.score_table import (
    InstanceGT,
    ScoreTable,
    category_report,
    evaluate_batches,
    evaluation_report,
)

if TYPE_CHECKING:
    from picosam_pipeline.config import EvaluateConfig


@dataclass
class AnnotationCounts:
    """Where every considered annotation went: ``annotations == scored + annotations_without_image + sum(dropped)``."""

    annotations: int = 0  # considered (all, or the first max_annotations plus any set aside while loading)
    scored: int = 0
    annotations_without_image: int = 0  # image file not in images_dir: the papers' silent drop, counted
    images_missing: int = 0
    images_scored: int = 0
    dropped: Counter = field(default_factory=Counter)  # other reasons: crowd, bad polygon, unreadable image, ...

    def as_dict(self) -> dict[str, Any]:
        return {
            "annotations": self.annotations,
            "scored": self.scored,
            "annotations_without_image": self.annotations_without_image,
            "images_missing": self.images_missing,
            "images_scored": self.images_scored,
            "dropped_by_reason": dict(sorted(self.dropped.items())),
        }


def _pixels_or_count(image: ImageRecord, path: Path, n_anns: int, counts: AnnotationCounts) -> np.ndarray | None:
    """The image's ``(H, W, 3)`` uint8 pixels, or None with its ``n_anns`` annotations counted where they went."""
    if image.problem is not None:  # no usable file_name / size in the JSON record
        counts.dropped[image.problem.kind] += n_anns
        return None
    if not path.exists():  # anything else that is not a regular file (a FIFO, a folder) is refused by load_image
        counts.images_missing += 1
        counts.annotations_without_image += n_anns
        return None
    try:
        pixels = load_image(path, expected_size=(image.width, image.height)).pixels
    except BadImageError as err:
        counts.dropped[f"image_{err.kind}"] += n_anns
        return None
    counts.images_scored += 1
    return pixels


def _batches(
    annset: AnnotationSet,
    images_dir: Path,
    model: CropModel,
    protocol: Protocol,
    gt: InstanceGT,
    counts: AnnotationCounts,
    *,
    max_annotations: int,
    batch_size: int,
    roi_padding: float,
    window: int,
) -> Iterator[dict[str, Any]]:
    """Loader-style batches built from annotations + images, filling ``gt`` and ``counts`` on the way."""
    size = model.input_size
    pending: list[tuple[np.ndarray, np.ndarray, dict, tuple[int, int, int, int], float]] = []

    def flush() -> dict[str, Any]:
        crops, gts, anns, boxes, areas = zip(*pending)
        pending.clear()
        return {
            "image": to_model_input(np.stack(crops)),
            "gt_mask": np.stack(gts)[:, None].astype(np.float32),
            "ann_id": np.array([a["id"] for a in anns]),
            "image_id": np.array([a["image_id"] for a in anns]),
            "category_id": np.array([a["category_id"] for a in anns]),
            "area": np.array(areas),
            "crop_box": np.array(boxes),
        }

    for rec in annset.record_issues:  # set aside while loading (duplicate id, unknown image id, ...)
        if rec.is_annotation:
            counts.annotations += 1
            counts.dropped[rec.issue.kind] += 1
    budget = max_annotations or None
    for image in annset.images.values():
        if budget == 0:
            break
        anns = annset.annotations_of(image.image_id)[:budget]
        if not anns:
            continue
        if budget is not None:
            budget -= len(anns)
        counts.annotations += len(anns)
        pixels = _pixels_or_count(image, images_dir / image.file_name, len(anns), counts)
        if pixels is None:
            continue
        for ann in anns:
            checked = check_annotation(ann, image, annset.coco, annset.categories)
            if checked.drop is not None:
                counts.dropped[checked.drop.kind] += 1
                continue
            crop, box = gt_crop(checked.mask, checked.bbox, protocol, size, roi_padding, window)
            if box.width <= 0 or box.height <= 0:
                counts.dropped["empty_crop_box"] += 1
                continue
            gt.add(ann["id"], checked.rle_counts, image.height, image.width, annset.categories[ann["category_id"]])
            pending.append((crop_rgb(pixels, box, size), crop, ann, tuple(box), checked.area))
            counts.scored += 1
            if len(pending) == batch_size:
                yield flush()
    if pending:
        yield flush()


def evaluate_annotations(
    annotations: str | Path,
    images_dir: str | Path,
    model: CropModel,
    protocol: Protocol,
    *,
    max_annotations: int = 0,
    batch_size: int = 64,
    roi_padding: float = 0.1,
    window: int = 96,
    require_lvis: bool = True,
) -> tuple[ScoreTable, dict[str, Any]]:
    """Score ``model`` on every usable annotation of an instances JSON whose image is in ``images_dir``.

    Returns:
        the per-sample score table (model ``student``) and a JSON-ready summary: ``dataset`` (format and
        LVIS version), the :class:`AnnotationCounts`, ``warnings`` and timings.

    Raises:
        PipelineError: unreadable JSON, a COCO file where LVIS was asked for (``require_lvis``), missing image folder.
    """
    annset = load_annotations(annotations)
    fmt = annset.format
    if require_lvis and fmt.name != "lvis":
        raise PipelineError(
            f"evaluate.lvis.annotations: {annotations} is a COCO instances file, not LVIS (its "
            "categories carry no synset/frequency); point it at lvis_v1_val.json, or evaluate COCO "
            "through the prepare -> shards stages"
        )
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise PipelineError(f"evaluate.lvis.images: {images_dir} is not a folder; point it at the COCO val2017 images")
    warnings = []
    if fmt.name == "lvis" and fmt.version != "v1":
        warnings.append(
            f"{annotations} is LVIS {fmt.version} ({fmt.num_categories} categories), not v1 (1203): "
            "category ids differ and the scores are not comparable with the papers' LVIS v1 figures"
        )
    gt = InstanceGT([], [], [], [], [], source=str(annotations))
    counts = AnnotationCounts()
    batches = _batches(
        annset,
        images_dir,
        model,
        protocol,
        gt,
        counts,
        max_annotations=max_annotations,
        batch_size=batch_size,
        roi_padding=roi_padding,
        window=window,
    )
    table, timing = evaluate_batches(batches, {"student": model}, gt)
    if counts.annotations and counts.scored == 0:
        warnings.append(
            f"no annotation was scored: {counts.annotations_without_image} of {counts.annotations} have no "
            f"image in {images_dir}"
        )
    summary = {
        "dataset": {
            "format": fmt.name,
            "version": fmt.version,
            "categories": fmt.num_categories,
            "annotations_file": str(annotations),
            "images": str(images_dir),
        },
        **counts.as_dict(),
        "warnings": warnings,
        "seconds": round(timing["seconds"], 3),
    }
    return table, summary


def lvis_report(e: EvaluateConfig, model: CropModel, protocol: Protocol | None) -> dict[str, Any]:
    """The evaluate stage's ``evaluate.lvis`` block: :func:`evaluate_annotations` of ``e.lvis`` with the val shards'
    crop convention ``protocol`` and the crop params the index ``e.index`` was prepared with (``index_crop_params``).

    Returns:
        the summary of :func:`evaluate_annotations` with ``protocol``, the student's overall figures (``student``:
        ``score_table.model_report``) and per category (``by_category``).

    Raises:
        PipelineError: ``protocol`` is None (the shards' crop boxes match neither convention of the index), or the
            index does not record its crop params.
    """
    crop = index_crop_params(e.index)
    lv = e.lvis
    if protocol is None:
        raise PipelineError(
            "evaluate.lvis: the val shards' crop boxes match neither the index's roi_box nor its point_box, "
            "so the crop convention for LVIS is unknown; rerun the stages after prepare (dvc repro)"
        )
    table, summary = evaluate_annotations(
        lv.annotations,
        lv.images,
        model,
        protocol,
        max_annotations=lv.max_annotations,
        batch_size=e.batch_size,
        roi_padding=crop.roi_padding,
        window=crop.point_crop_size,
    )
    report = evaluation_report(table, models=["student"])
    return {
        **summary,
        "protocol": protocol,
        "student": report["student"],
        "by_category": category_report(table, "student"),
    }
