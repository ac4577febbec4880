"""Score students (and the teacher's stored logits) in the PicoSAM papers' crop frame and in the image frame.

One pass over batches of crops fills a :class:`ScoreTable`: one row per sample, one column per quantity.
For every model ``m`` (``student``, ``student_int8``, ``teacher``, and on request ``baseline``: the whole crop as
the mask, ``crop_metrics.whole_crop_logits``) it holds

* ``m_iou``       crop-frame IoU of ``logits > 0`` against the ``S x S`` GT crop (empty union = 1), the
                  papers' per-sample IoU (``crop_metrics.crop_ious``);
* ``m_full_iou``  the crop mask (logit > 0) resized NEAREST back into its crop box and pasted into the image
                  frame, against the full GT mask (``crop_metrics.full_image_iou``): what the student's answer is worth
                  on the image, including the parts of a large object a 96-px window never sees. The same paste
                  makes the image-frame predictions file, so ``score-predictions`` on it gives the same figure;

plus ``gt_nonempty``, ``ann_id``, ``image_id``, ``category``, COCO ``area`` and the crop box
(``box_x1`` .. ``box_y2``, from which :meth:`InstanceGT.protocol_of` reads the crop convention).
:func:`evaluation_report` turns the table into the figures ``metrics/evaluate.json`` holds, under the names of
``crop_metrics.py``:
``crop_miou``, ``crop_success_map_50_95`` (the papers' "mAP@[.5:.95]", a success rate over IoU thresholds
on non-empty GT crops, NOT COCO AP) and ``full_image_miou``, overall and per COCO size bucket; per
category in :func:`category_report`.

Batches are what ``picosam_pipeline.train.loader.make_loader`` yields (``image`` float32 ``(B, 3, S, S)`` RGB in
[0, 1], ``gt_mask`` ``(B, 1, S, S)`` {0, 1}, ``teacher_logits`` ``(B, 1, S, S)``, ``ann_id``, ``image_id``,
``category_id``, ``area``, ``crop_box`` ``(B, 4)`` ``x1, y1, x2, y2`` image pixels); the LVIS path
(``lvis.py``) builds the same dict from annotations and images.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from picosam_pipeline.data.crops import CropBox
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.crop_metrics import (
    SIZE_BUCKETS,
    Protocol,
    breakdown,
    pasted_iou,
    score_group,
    size_buckets,
    whole_crop_logits,
)
from picosam_pipeline.evaluate.predict import CropModel
from picosam_pipeline.evaluate.predictions import CropPrediction
from picosam_pipeline.train.iou import crop_ious, gt_nonempty, to_numpy

TEACHER = "teacher"
BASELINE = "baseline"  # the whole crop as the mask: what a student must beat to have learned anything
MODEL_LABELS = {BASELINE: "baseline (whole crop)"}  # the printed table's name, where it is not the model's


def teacher_models(teachers: Sequence[str]) -> list[str]:
    """Score-table names of the shards' teachers: ``teacher`` for one, ``teacher_<NAME>`` for each of several."""
    return [TEACHER] if len(teachers) <= 1 else [f"{TEACHER}_{name}" for name in teachers]


def is_teacher(model: str) -> bool:
    return model == TEACHER or model.startswith(f"{TEACHER}_")


# --------------------------------------------------------------------------------------------------
# full-image ground truth


class InstanceGT:
    """Full-image GT masks and category names of indexed instances, looked up by annotation id.

    Holds the compressed RLE strings only (a few hundred bytes per instance) and decodes a mask when asked.
    """

    def __init__(
        self,
        ann_ids: Iterable[int],
        rle_counts: Iterable[str],
        heights: Iterable[int],
        widths: Iterable[int],
        categories: Iterable[str],
        source: str,
        crop_boxes: Mapping[Protocol, np.ndarray] | None = None,
        prompts: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self._rows = {
            int(a): (r, int(h), int(w), str(c))
            for a, r, h, w, c in zip(ann_ids, rle_counts, heights, widths, categories)
        }
        self._order = {a: i for i, a in enumerate(self._rows)}
        self.crop_boxes = dict(crop_boxes or {})  # protocol -> (N, 4) crop boxes in row order (index only)
        self.prompts = dict(prompts or {})  # "bbox" (N, 4) x, y, w, h and "point" (N, 2) x, y in row order (index only)
        self.source = source

    @classmethod
    def from_index(cls, path: str | Path, split: str) -> InstanceGT:
        """The instances of ``split`` in the prepare stage's index (``index.read_index``)."""
        from picosam_pipeline.data.index import column_array, read_index

        columns = ["ann_id", "rle_counts", "height", "width", "category_name", "roi_box", "point_box", "bbox", "point"]
        table = read_index(path, split=split, columns=columns)
        t = table.select(columns[:5]).to_pydict()
        boxes = {"picosam3-roi": column_array(table, "roi_box"), "picosam2-point": column_array(table, "point_box")}
        return cls(
            t["ann_id"],
            t["rle_counts"],
            t["height"],
            t["width"],
            t["category_name"],
            f"{path} (split {split!r})",
            boxes,
            {"bbox": column_array(table, "bbox"), "point": column_array(table, "point")},
        )

    def protocol_of(self, ann_ids: np.ndarray, crop_boxes: np.ndarray) -> Protocol | None:
        """The crop convention whose index boxes equal most of the given crop boxes ``(N, 4)``; None if neither.

        The shards do not name their convention (the teacher stage chose it); their crop boxes show it.
        """
        if not self.crop_boxes or len(ann_ids) == 0:
            return None
        rows = np.array([self._order[int(a)] for a in ann_ids])
        hits = {p: int((boxes[rows] == crop_boxes).all(axis=1).sum()) for p, boxes in self.crop_boxes.items()}
        best = max(hits, key=hits.get)
        return best if hits[best] * 2 > len(ann_ids) else None

    def add(self, ann_id: int, rle_counts: str, height: int, width: int, category: str) -> None:
        """Register one instance (the LVIS path adds them as it crops)."""
        self._order.setdefault(int(ann_id), len(self._order))
        self._rows[int(ann_id)] = (rle_counts, int(height), int(width), str(category))

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, ann_id: int) -> tuple[str, int, int, str]:
        try:
            return self._rows[int(ann_id)]
        except KeyError:
            raise PipelineError(
                f"annotation {ann_id} is in the shards but not in the instance index {self.source}; the "
                "shards were cut from another index: rerun the stages after prepare (dvc repro)"
            ) from None

    def in_box(self, ann_id: int, box: CropBox) -> tuple[np.ndarray, int]:
        """The GT mask inside ``box`` (clipped to the image; uint8 {0, 1}) and the mask's pixel count in the whole
        image: what :func:`crop_metrics.pasted_iou` needs, without decoding the rest of the image."""
        from pycocotools import mask as mask_utils

        from picosam_pipeline.data.index import decode_mask_window

        rle, h, w, _ = self._row(ann_id)
        window = (min(max(box.x1, 0), w), min(max(box.y1, 0), h), min(max(box.x2, 0), w), min(max(box.y2, 0), h))
        pixels = int(mask_utils.area({"size": [h, w], "counts": rle.encode("ascii")}))
        return decode_mask_window(rle, h, w, window), pixels

    def category(self, ann_id: int) -> str:
        return self._row(ann_id)[3]

    def prompt(self, ann_id: int, protocol: Protocol | None) -> tuple[str, tuple[float, ...]] | None:
        """The prompt the crop was made from, in image pixels: ``("point", (x, y))`` for ``picosam2-point``,
        ``("box", (x, y, w, h))`` (the COCO box) for ``picosam3-roi``; None when the index is not loaded or unknown."""
        key = {"picosam2-point": "point", "picosam3-roi": "bbox"}.get(protocol or "")
        if key is None or key not in self.prompts or int(ann_id) not in self._order:
            return None
        return ("point" if key == "point" else "box"), tuple(
            float(v) for v in self.prompts[key][self._order[int(ann_id)]]
        )

    def image_size(self, ann_id: int) -> tuple[int, int]:
        """``(H, W)`` of the instance's image."""
        _, h, w, _ = self._row(ann_id)
        return h, w


# --------------------------------------------------------------------------------------------------
# per-sample scores


def score_batch(
    logits: Mapping[str, np.ndarray], gt_crops: np.ndarray, crop_boxes: np.ndarray, gt: InstanceGT, ann_ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-sample scores of one batch, for every model in ``logits``.

    Args:
        logits: ``{model: (B, 1, S, S) float32 logits}``.
        gt_crops: ``(B, 1, S, S)`` or ``(B, S, S)`` GT crops, {0, 1}.
        crop_boxes: ``(B, 4)`` integer ``x1, y1, x2, y2`` the crops were cut from.
        gt, ann_ids: the full-image GT of the B samples (``(B,)`` annotation ids).

    Returns:
        ``gt_nonempty`` ``(B,)`` bool, and per model ``{m}_iou`` and ``{m}_full_iou`` ``(B,)`` float64.
    """
    boxes = [CropBox(*(int(v) for v in b)) for b in np.asarray(crop_boxes)]
    in_boxes = [gt.in_box(a, box) for a, box in zip(ann_ids, boxes)]
    out = {"gt_nonempty": gt_nonempty(gt_crops)}
    for name, lg in logits.items():
        out[f"{name}_iou"] = crop_ious(lg, gt_crops)
        # The mask, not the logits, is resized (NEAREST): what a predictions file holds, so both score alike.
        out[f"{name}_full_iou"] = np.array(
            [pasted_iou(lg[i] > 0, box, *in_box) for i, (box, in_box) in enumerate(zip(boxes, in_boxes))]
        )
    return out


class ScoreTable:
    """Per-sample columns, filled batch by batch; ``table["student_iou"]`` is the ``(N,)`` column."""

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {}
        self._rows = 0

    def add(self, **columns: Any) -> None:
        """Append one batch: every column of the table, each of the same length B."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1 or (self._parts and set(columns) != set(self._parts)):
            raise ValueError(
                f"a batch needs the columns {sorted(self._parts) or '(any)'} of one length, got "
                f"{ {k: len(v) for k, v in columns.items()} }"
            )
        for name, values in columns.items():
            self._parts.setdefault(name, []).append(np.asarray(values))
        self._rows += lengths.pop()

    def __len__(self) -> int:
        return self._rows

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def __getitem__(self, name: str) -> np.ndarray:
        parts = self._parts[name]
        if len(parts) > 1:
            self._parts[name] = parts = [np.concatenate(parts)]
        return parts[0]

    @property
    def crop_boxes(self) -> np.ndarray:
        """``(N, 4)`` int64 crop boxes ``x1, y1, x2, y2`` of the samples."""
        return np.stack([self[f"box_{c}"] for c in ("x1", "y1", "x2", "y2")], axis=1)

    @property
    def models(self) -> list[str]:
        """Models scored, in insertion order (columns ``{m}_iou``)."""
        return [
            name[: -len("_iou")] for name in self._parts if name.endswith("_iou") and not name.endswith("_full_iou")
        ]

    def write_csv(self, path: str | Path) -> Path:
        """All columns, one row per sample (IoUs with 4 decimals)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(self._parts)
        cols = [self[n] for n in names]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            for row in zip(*cols):
                writer.writerow([f"{v:.4f}" if isinstance(v, (float, np.floating)) else v for v in row])
        return path


# --------------------------------------------------------------------------------------------------
# the evaluation pass


def evaluate_batches(
    batches: Iterable[Mapping[str, Any]],
    models: Mapping[str, CropModel],
    gt: InstanceGT,
    *,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
    predictions: list[CropPrediction] | None = None,
    total: int | None = None,
    teachers: Sequence[str] = (TEACHER,),
    baseline: bool = False,
) -> tuple[ScoreTable, dict[str, float]]:
    """Run ``models`` on every batch and score them, and every teacher in the batch's ``teacher_logits`` when present.

    Args:
        batches: loader batches (see the module docstring); the teacher is scored only when they carry logits.
        models: ``{name: CropModel}``, e.g. ``{"student": ..., "student_int8": ...}``.
        gt: full-image GT by annotation id.
        on_sample: called once per sample with its crop ``image`` ``(S, S, 3)`` uint8, ``gt`` ``(S, S)`` bool,
            ``logits`` ``{model: (S, S) float32}``, ``iou`` ``{model: float}``, ``ann_id`` and ``category``
            (the qualitative grid's pool keeps a few).
        predictions: when given, one :class:`CropPrediction` per sample is appended (student mask, bool).
        total: number of samples, for the progress bar only.
        teachers: the names of the ``teacher_logits`` channels (``ShardLoader.teachers``); scored as
            :func:`teacher_models` names them.
        baseline: also score :data:`BASELINE`, the whole crop (not passed to ``on_sample`` nor to the grid).

    Returns:
        the score table and timings ``{"seconds": wall time, "model_seconds": {model: forward time}}``.
    """
    from tqdm import tqdm

    table = ScoreTable()
    model_seconds = {name: 0.0 for name in models}
    start = time.perf_counter()
    bar = tqdm(total=total, desc="evaluate", unit="sample", disable=None)
    for batch in batches:
        rgb = to_numpy(batch["image"]).astype(np.float32, copy=False)
        logits, extra = {}, {}
        for name, model in models.items():
            t0 = time.perf_counter()
            logits[name] = model(rgb)
            model_seconds[name] += time.perf_counter() - t0
        if "teacher_logits" in batch:
            stored = to_numpy(batch["teacher_logits"]).astype(np.float32, copy=False)  # (B, K, S, S)
            confidence = to_numpy(batch["confidence"]).reshape(len(rgb), -1) if "confidence" in batch else None
            for k, name in enumerate(teacher_models(teachers)):
                logits[name] = stored[:, k : k + 1]
                if confidence is not None:  # the teacher's confidence (lambda's source): a histogram plot
                    extra[f"{name}_confidence"] = confidence[:, k].astype(np.float64)
        shown = dict(logits)  # what on_sample sees: the baseline's constant answer is not worth a grid column
        if baseline:
            logits[BASELINE] = whole_crop_logits(len(rgb), rgb.shape[-1])
        gt_crops = to_numpy(batch["gt_mask"]).reshape(len(rgb), *rgb.shape[-2:])
        ann_ids = to_numpy(batch["ann_id"]).astype(np.int64)
        boxes = to_numpy(batch["crop_box"]).astype(np.int64).reshape(len(rgb), 4)
        scores = score_batch(logits, gt_crops, boxes, gt, ann_ids)
        categories = np.array([gt.category(a) for a in ann_ids], dtype=object)
        table.add(
            ann_id=ann_ids,
            image_id=to_numpy(batch["image_id"]).astype(np.int64),
            category=categories,
            area=to_numpy(batch["area"]).astype(np.float64),
            box_x1=boxes[:, 0],
            box_y1=boxes[:, 1],
            box_x2=boxes[:, 2],
            box_y2=boxes[:, 3],
            **scores,
            **extra,
        )
        if on_sample is not None:
            crops = np.clip(np.moveaxis(rgb, 1, -1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            for i in range(len(rgb)):
                on_sample(
                    {
                        "image": crops[i],
                        "gt": gt_crops[i] > 0.5,
                        "ann_id": int(ann_ids[i]),
                        "category": categories[i],
                        "crop_box": tuple(int(v) for v in boxes[i]),
                        "logits": {m: lg[i, 0] for m, lg in shown.items()},
                        "iou": {m: float(scores[f"{m}_iou"][i]) for m in shown},
                    }
                )
        if predictions is not None and "student" in logits:
            predictions.extend(_predictions(logits["student"], batch, ann_ids, boxes, gt))
        bar.update(len(rgb))
    bar.close()
    return table, {"seconds": time.perf_counter() - start, "model_seconds": model_seconds}


def _predictions(
    logits: np.ndarray, batch: Mapping[str, Any], ann_ids: np.ndarray, boxes: np.ndarray, gt: InstanceGT
) -> list[CropPrediction]:
    """Predictions for the results files; score = mean sigmoid probability over the predicted mask (0 if empty)."""
    image_ids = to_numpy(batch["image_id"])
    category_ids = to_numpy(batch["category_id"])
    out = []
    for i in range(len(logits)):
        lg = logits[i, 0]
        mask = lg > 0
        score = float((1.0 / (1.0 + np.exp(-lg[mask]))).mean()) if mask.any() else 0.0
        out.append(
            CropPrediction(
                int(image_ids[i]),
                mask,
                score,
                int(category_ids[i]),
                int(ann_ids[i]),
                crop_box=tuple(int(v) for v in boxes[i]),
                image_size=gt.image_size(ann_ids[i]),
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# reports


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def model_report(table: ScoreTable, model: str) -> dict[str, Any]:
    """One model's figures: counts, ``crop_miou``, ``crop_success_map_50_95``, ``full_image_miou``, ``by_size``."""
    if len(table) == 0:  # nothing scored (e.g. no LVIS image present): counts 0, figures None
        return {**score_group(np.zeros(0), np.zeros(0, dtype=bool)), "full_image_miou": None, "by_size": {}}
    ious, nonempty = table[f"{model}_iou"], table["gt_nonempty"]
    out = score_group(ious, nonempty)
    out["full_image_miou"] = _mean_or_none(table[f"{model}_full_iou"])
    buckets = size_buckets(table["area"])
    by_size = breakdown(ious, nonempty, buckets, order=SIZE_BUCKETS)
    for name, group in by_size.items():
        group["full_image_miou"] = _mean_or_none(table[f"{model}_full_iou"][buckets == name])
    out["by_size"] = by_size
    return out


def category_report(table: ScoreTable, model: str) -> dict[str, dict]:
    """Counts and crop metrics per category name (sorted by name)."""
    if len(table) == 0:
        return {}
    return breakdown(table[f"{model}_iou"], table["gt_nonempty"], table["category"].astype(str))


def evaluation_report(table: ScoreTable, models: Iterable[str] | None = None) -> dict[str, Any]:
    """``{"samples": N, model: model_report, ...}`` for ``models`` (default: every model in the table), JSON-ready."""
    return {"samples": len(table), **{m: model_report(table, m) for m in (table.models if models is None else models)}}


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def format_score_table(report: Mapping[str, Any], models: Iterable[str]) -> str:
    """A small table: per model, crop mIoU, crop mAP@[.5:.95] (not COCO AP), full-image mIoU, and by size."""
    labels = {m: MODEL_LABELS.get(m, m) for m in models}
    width = max([14, *map(len, labels.values())])
    lines = [
        f"{'model':<{width}} {'crop mIoU':>9} {'crop mAP@[.5:.95]*':>18} {'full-image mIoU':>15}   by size (crop mIoU)"
    ]
    for m, label in labels.items():
        r = report[m]
        sizes = "  ".join(f"{k} {_fmt(v['crop_miou'])} (n={v['samples']})" for k, v in r["by_size"].items())
        lines.append(
            f"{label:<{width}} {_fmt(r['crop_miou']):>9} {_fmt(r['crop_success_map_50_95']):>18} "
            f"{_fmt(r['full_image_miou']):>15}   {sizes}"
        )
    lines.append(
        "* the papers' 'mAP': share of non-empty-GT samples with IoU >= t, mean over t = .50:.05:.95; not COCO AP"
    )
    return "\n".join(lines)
