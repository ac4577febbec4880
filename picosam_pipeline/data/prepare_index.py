"""Preparing the instance index: COCO / LVIS instances JSON of every split -> index rows + bad-input records.

For every split (:func:`prepare_index`): load the annotations (:mod:`picosam_pipeline.data.coco`), check each
referenced image once (:mod:`picosam_pipeline.data.images`), check each annotation and decode its mask, apply the
selection (non-crowd, ``area >= min_area``, ROI side ``>= min_roi_side``), and compute both prompt conventions
(:mod:`picosam_pipeline.data.crops`). What it writes into the prepare stage's folder:

* ``index.parquet``     one row per kept instance (schema in :mod:`picosam_pipeline.data.index`);
* ``bad_inputs.jsonl``  one JSON record per dropped or converted bad input (split, kind, ids, file, reason, action).

:meth:`PreparedIndex.report` is the stage's ``report.json``: per split kept / dropped by reason / converted by kind,
the dataset's format.

``on_bad_input``: ``skip`` drops a bad input and reports it; ``strict`` stops at the first one with a message naming
the file and the fix. Conversions (bbox clipped, grayscale -> RGB, EXIF rotation, ...) and selection drops (crowd,
small) never stop it. Every annotation is counted exactly once, as kept or under one drop reason, so
``kept + sum(dropped) == annotations`` per split.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from picosam_pipeline.config import PrepareConfig, SplitSource
from picosam_pipeline.data.coco import (
    AnnotationSet,
    CheckedAnnotation,
    ImageRecord,
    Issue,
    check_annotation,
    load_annotations,
    sizes_coco,
)
from picosam_pipeline.data.crops import point_box, point_prompt, roi_box
from picosam_pipeline.data.images import BadImageError, load_rgb
from picosam_pipeline.data.index import INDEX_FILE, IndexBuilder
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.parallel import default_workers, ordered_map
from picosam_pipeline.untrusted import UntrustedInputError, require_regular_file

BAD_INPUTS_FILE = "bad_inputs.jsonl"

# What a killed run may leave in the unfinished folder besides the outputs: the index rows spilled so far, the index
# file being written.
WORK_FILES = (".index-rows.arrow", INDEX_FILE + ".tmp")

# The fix a strict-mode stop suggests, by issue kind. Image-file issues (image_*) carry their own fix from
# picosam_pipeline.data.images; any other annotation issue: correct or remove the annotation.
_FIXES = {
    "missing_image_id": "add the image record to 'images' or remove the annotation",
    "duplicate_ann_id": "give every annotation a unique id",
    "duplicate_image_id": "give every image record a unique id",
    "bad_image_record": "give the image record an integer id, a file_name and positive width/height",
    "image_path_outside_folder": "name the image by its path inside the split's images folder (and move it there)",
    "bad_iscrowd": "set iscrowd to the number 0 or 1",
    "no_segmentation": "give the annotation a polygon or an RLE mask, or remove it",
}


@dataclass
class SplitCounts:
    """Per-split bookkeeping; ``dropped`` and ``converted`` are keyed by issue kind."""

    annotations: int = 0
    kept: int = 0
    images: int = 0
    images_with_annotations: int = 0
    images_checked: int = 0
    dropped: Counter = field(default_factory=Counter)  # annotations, by reason
    converted: Counter = field(default_factory=Counter)  # annotations or images, by conversion kind

    def as_metrics(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("dropped", "converted")},
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "converted_by_kind": dict(sorted(self.converted.items())),
        }


class BadInputLog:
    """Writes bad inputs to ``bad_inputs.jsonl`` as they are reported (a line each, nothing held); in strict mode a
    dropping bad input raises instead."""

    def __init__(self, path: Path, strict: bool) -> None:
        self.strict, self.records = strict, 0
        self._file = open(path, "w")

    def __enter__(self) -> BadInputLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()

    def report(self, split: str, issue: Issue, file: str | Path, **ids: Any) -> None:
        if not issue.bad_input:
            return  # selection drops (crowd, small area or ROI) are counted in metrics only
        if self.strict and issue.action == "dropped":
            where = "" if str(file) in issue.reason else f"{file}: "
            default = None if issue.kind.startswith("image_") else "correct or remove the annotation"
            fix = _FIXES.get(issue.kind, default)
            raise PipelineError(
                f"{where}{issue.reason} [{issue.kind}, split {split!r}]. {f'Fix: {fix}; or set' if fix else 'Or set'} "
                f"prepare.on_bad_input=skip to drop such inputs and list them in {BAD_INPUTS_FILE}"
            )
        record = {
            "split": split,
            "kind": issue.kind,
            **ids,
            "file": str(file),
            "reason": issue.reason,
            "action": issue.action,
        }
        self._file.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self.records += 1


@dataclass
class PreparedIndex:
    """What :func:`prepare_index` wrote: per split its source and dataset facts (``splits``: format, version,
    categories, annotations, images, kept) and its counts, the rows kept in all, the bad-input records written."""

    splits: dict[str, dict[str, Any]]
    counts: dict[str, SplitCounts]
    kept: int
    bad_input_records: int

    @property
    def dropped(self) -> Counter:
        """Annotations dropped over all splits, by reason."""
        return sum((c.dropped for c in self.counts.values()), Counter())

    def report(self) -> dict[str, Any]:
        """The prepare stage's ``report.json``: dataset format per split, per split counts, totals."""
        return {
            "dataset": {
                name: {k: m[k] for k in ("format", "version", "categories")} for name, m in self.splits.items()
            },
            "splits": {name: c.as_metrics() for name, c in self.counts.items()},
            "total": {
                "annotations": sum(c.annotations for c in self.counts.values()),
                "kept": self.kept,
                "dropped": sum(self.dropped.values()),
                "bad_input_records": self.bad_input_records,
            },
        }


def prepare_index(p: PrepareConfig, out_dir: Path) -> PreparedIndex:
    """Write ``out_dir/index.parquet`` (every split of ``p.splits``, the rows sorted by split, image_id, ann_id) and
    ``out_dir/bad_inputs.jsonl``; returns the counts. ``p.on_bad_input == "strict"`` raises :class:`PipelineError`
    at the first dropping bad input."""
    builder = IndexBuilder(out_dir / WORK_FILES[0])  # rows spilled as they come: memory holds one batch
    splits_meta, split_counts = {}, {}
    with BadInputLog(out_dir / BAD_INPUTS_FILE, strict=p.on_bad_input == "strict") as log:
        for split in p.splits:
            annset = load_annotations(split.annotations, p.dataset_format, p.allow_outside_images)
            split_counts[split.name] = counts = _prepare_split(_Split(split, annset, p, builder, log))
            annset.close()
            splits_meta[split.name] = {
                "format": annset.format.name,
                "version": annset.format.version,
                "categories": annset.format.num_categories,
                "annotations": split.annotations,
                "images": split.images,
                "kept": counts.kept,
            }

    # Both crop conventions are in every row (roi_box, point + point_box); the metadata says with which parameters,
    # for the teacher stores and the shards that pick one (crops.crop_convention adds the input size).
    conventions = {
        "roi": {"column": "roi_box", "roi_padding": p.roi_padding, "min_roi_side": p.min_roi_side},
        "point": {"column": "point_box", "point_column": "point", "window": p.point_crop_size},
    }
    builder.write(out_dir / INDEX_FILE, {"splits": splits_meta, "prepare": asdict(p), "crop_conventions": conventions})
    return PreparedIndex(splits_meta, split_counts, len(builder), log.records)


@dataclass
class _Split:
    """One split being prepared: its source, annotations and params, and where its rows, reports and counts go."""

    source: SplitSource
    annset: AnnotationSet
    params: PrepareConfig
    builder: IndexBuilder
    log: BadInputLog
    counts: SplitCounts = field(init=False)

    def __post_init__(self) -> None:
        self.counts = SplitCounts(annotations=self.annset.num_annotations, images=len(self.annset.images))

    def report(self, issue: Issue, file: str | Path, **ids: Any) -> None:
        self.log.report(self.source.name, issue, file, **ids)


def _prepare_split(s: _Split) -> SplitCounts:
    annset, counts = s.annset, s.counts
    for rec in annset.record_issues:  # duplicates, orphans: set aside while loading
        if rec.is_annotation:
            counts.dropped[rec.issue.kind] += 1
        s.report(rec.issue, annset.path, ann_id=rec.ann_id, image_id=rec.image_id)

    # In image id order, the index's order within a split: the builder then sorts rows that are nearly in place.
    images = [annset.images[image_id] for image_id in annset.image_ids.tolist()]
    counts.images_with_annotations = len(images)
    # An unusable record (e.g. a file_name outside the images folder) is not even looked up on disk.
    folder = s.source.images
    paths = [img.resolve_path(folder) if img.problem is None else Path(folder) / img.file_name for img in images]
    # Worker processes decode each image and check its annotations (pycocotools rasterisation, mask decode, point
    # prompt); this one keeps the bookkeeping, in image order, so the index and the report do not depend on them.
    # A job carries the annotations' JSON text, read from the file as the job is made (lighter to send than parsed
    # polygons, and only the jobs in flight hold it).
    jobs = ((image, path, annset.texts_of(image.image_id)) for image, path in zip(images, paths))
    checks = ordered_map(
        partial(_check_image_and_annotations, decode=s.params.check_images, category_ids=frozenset(annset.categories)),
        jobs,
        workers=default_workers(len(images)),
        in_flight=256,
    )
    try:
        for image, path, check in tqdm(
            zip(images, paths, checks), total=len(images), desc=f"prepare {s.source.name}", unit="img"
        ):
            _add_image(s, image, path, check)
    finally:  # a strict-mode stop must not wait for the decodes still queued
        checks.close()
    return counts


def _add_image(s: _Split, image: ImageRecord, path: Path, check: tuple) -> None:
    """Count and report one image's check (:func:`_check_image_and_annotations`), then add its annotations."""
    problem, conversions, heads, instances = check
    if s.params.check_images and image.problem is None:
        s.counts.images_checked += 1
    if problem is not None:
        s.counts.dropped[problem.kind] += len(heads)
        s.report(
            problem,
            path if image.problem is None else s.annset.path,
            image_id=image.image_id,
            ann_ids=[ann_id for ann_id, _ in heads],
        )
        return
    for kind in conversions:
        s.counts.converted[f"image_{kind}"] += 1
        s.report(
            Issue(f"image_{kind}", f"image {image.image_id}: {kind}", action="converted"), path, image_id=image.image_id
        )
    for (ann_id, category_id), (checked, point) in zip(heads, instances):
        _add_instance(s, image, path, ann_id=ann_id, category_id=category_id, checked=checked, point=point)


def _check_image_and_annotations(
    job: tuple[ImageRecord, Path, list[bytes]], decode: bool, category_ids: frozenset[int]
) -> tuple[
    Issue | None, tuple[str, ...], list[tuple[Any, Any]], list[tuple[CheckedAnnotation, tuple[int, int] | None]]
]:
    """One image's checks (runs in a worker): the image's drop issue or conversions, every annotation's
    ``(id, category_id)`` (the bookkeeping needs no more, so the main process parses none of them), and per annotation
    its :class:`CheckedAnnotation` (without the mask) and PicoSAM2 prompt point ``(x, y)`` in image pixels (None when
    dropped). ``job``: the image record, its path and its annotations' JSON texts. A dropped image's annotations are
    not checked."""
    image, path, texts = job
    anns = [json.loads(text) for text in texts]
    heads = [(ann["id"], ann.get("category_id")) for ann in anns]  # load_annotations kept only dicts with an id
    problem, conversions = _check_image(image, path, decode)
    if problem is not None:
        return problem, conversions, heads, []
    coco = sizes_coco([image])  # this image alone: a worker need not know the others
    instances = []
    for ann in anns:
        checked = check_annotation(ann, image, coco, category_ids)
        point = None
        if checked.drop is None:
            # The prompt from the mask's tight-box window equals the full-mask one shifted by (x0, y0): translation
            # keeps both the integer centre ((a + b) // 2) and the row-major tie-break, and skips a whole-image scan.
            window, x0, y0 = checked.mask_window()
            cx, cy = point_prompt(window)
            point = (cx + x0, cy + y0)
        instances.append((replace(checked, mask=None), point))  # the (H, W) mask stays here
    return None, conversions, heads, instances


def _check_image(image: ImageRecord, path: Path, decode: bool) -> tuple[Issue | None, tuple[str, ...]]:
    """Decode the image once (or only check that it exists); returns a drop issue or the conversions applied."""
    if image.problem is not None:
        return image.problem, ()
    if not decode:
        try:
            require_regular_file(path, f"image {str(path)!r}")
        except UntrustedInputError as err:  # a FIFO or device is refused by name, not opened
            if err.kind != "missing":
                return Issue("image_unreadable", str(err)), ()
            return Issue(
                "image_missing",
                f"image {str(path)!r} does not exist; download it again or fix the split's images folder / file_name",
            ), ()
        return None, ()
    try:
        return None, load_rgb(path, expected_size=(image.width, image.height))[1]
    except BadImageError as err:
        return Issue(f"image_{err.kind}", str(err)), ()


def _add_instance(
    s: _Split,
    image: ImageRecord,
    path: Path,
    *,
    ann_id: int,
    category_id: Any,
    checked: CheckedAnnotation,
    point: tuple[int, int] | None,
) -> None:
    """Report one checked annotation, apply the selection, and add its row with both prompt conventions."""
    p, counts = s.params, s.counts
    for conv in checked.conversions:
        counts.converted[conv.kind] += 1
        s.report(conv, s.annset.path, ann_id=ann_id, image_id=image.image_id)
    drop = checked.drop
    if drop is None and checked.area < p.min_area:
        drop = Issue("small_area", f"annotation {ann_id}: area {checked.area:.1f} < prepare.min_area", bad_input=False)
    if drop is None:
        roi, roi_float = roi_box(checked.bbox, image.width, image.height, p.roi_padding)
        if min(roi.width, roi.height) < p.min_roi_side:
            drop = Issue(
                "small_roi", f"annotation {ann_id}: ROI {tuple(roi)} has a side < prepare.min_roi_side", bad_input=False
            )
    if drop is not None:
        counts.dropped[drop.kind] += 1
        s.report(drop, s.annset.path, ann_id=ann_id, image_id=image.image_id)
        return

    cx, cy = point
    counts.kept += 1
    s.builder.add(
        ann_id=ann_id,
        image_id=image.image_id,
        split=s.source.name,
        file_name=image.file_name,
        image_path=str(path),
        width=image.width,
        height=image.height,
        category_id=category_id,
        category_name=s.annset.categories[category_id],
        iscrowd=False,
        bbox=list(checked.bbox),
        area=checked.area,
        roi_box=list(roi),
        roi_float_box=list(roi_float),
        point=[cx, cy],
        point_box=list(point_box(cx, cy, image.width, image.height, p.point_crop_size)),
        rle_counts=checked.rle_counts,
    )
