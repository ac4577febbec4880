"""Data of the DVC plots of ``evaluate`` and ``quantize`` (``plots:`` in ``dvc.yaml``), as long-format CSV rows.

One row per (group, model): DVC's templates colour by one field, so every plot file names its model in a ``model``
column and the custom templates of ``.dvc/plots/`` draw grouped bars starting at 0 (DVC's own ``bar_horizontal``
does not start at 0) and scatter plots on fixed ``[0, 1]`` IoU axes. Models come students first, then teachers, then
the trivial ``baseline`` (the whole crop as the mask), so bars read "ours, then the references". Every figure is
computed from the score table the stage already has (``score_table.ScoreTable``): nothing is re-run for a plot.

Files (``write_plots``, in the stage's ``plots/`` folder):

* ``iou_histogram.csv``      ``bin, iou, model, share``: share of samples per 0.05-wide crop-IoU bin (bars);
* ``by_size.csv``            ``size, model, crop_miou, samples``: crop mIoU per COCO size bucket;
* ``by_category.csv``        ``category, model, crop_miou, samples``: crop mIoU per category (the
  ``max_categories`` most frequent);
* ``iou_vs_area.csv``        ``ann_id, area, model, crop_iou``: each sample's crop IoU against its object's area
  (the baseline left out: one constant answer, a cloud that hides the models');
* ``student_vs_teacher.csv`` ``ann_id, teacher, teacher_iou, student_iou``: per sample, each teacher's crop IoU
  against the student's (points above the diagonal: the student beats its teacher);
* ``teacher_confidence.csv`` ``bin, confidence, model, share``: the teachers' confidence histogram (what sets
  lambda in the loss), when the shards carry it.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from picosam_pipeline.evaluate.score_table import BASELINE, ScoreTable, is_teacher

HIST_BINS = 20  # IoU histogram bins of width 0.05, the papers' threshold step
CONFIDENCE_SUFFIX = "_confidence"  # score-table column of a teacher's confidence (score_table.evaluate_batches)


def ordered(models: Iterable[str]) -> list[str]:
    """Students first, then teachers, then the baseline, each in the given order."""
    models = list(models)
    students = [m for m in models if not is_teacher(m) and m != BASELINE]
    return students + [m for m in models if is_teacher(m)] + [m for m in models if m == BASELINE]


def _histogram(values_by_model: Mapping[str, np.ndarray], value_name: str, bins: int) -> list[dict[str, Any]]:
    """Share of values per bin of ``[0, 1]`` (the last bin closed), one row per (bin, model)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for b in range(bins):
        for model, values in values_by_model.items():
            counts, _ = np.histogram(values, bins=edges)
            rows.append(
                {
                    "bin": f"{edges[b]:.2f}-{edges[b + 1]:.2f}",
                    value_name: round(float(edges[b] + edges[b + 1]) / 2, 4),
                    "model": model,
                    "share": round(float(counts[b]) / max(len(values), 1), 6),
                }
            )
    return rows


def iou_histogram(table: ScoreTable, bins: int = HIST_BINS) -> list[dict[str, Any]]:
    """Share of samples per crop-IoU bin for each model; shares sum to 1 per model (IoU 1.0 is in the last bin)."""
    return _histogram({m: table[f"{m}_iou"] for m in ordered(table.models)}, "iou", bins)


def confidence_histogram(table: ScoreTable, bins: int = HIST_BINS) -> list[dict[str, Any]]:
    """Share of samples per confidence bin for each teacher whose confidence the table holds."""
    return _histogram(
        {m: table[f"{m}{CONFIDENCE_SUFFIX}"] for m in ordered(table.models) if f"{m}{CONFIDENCE_SUFFIX}" in table},
        "confidence",
        bins,
    )


def size_bars(report: Mapping[str, Any], models: Iterable[str]) -> list[dict[str, Any]]:
    """Rows ``{"size", "model", "crop_miou", "samples"}`` per COCO size bucket and model, NaN-free."""
    rows = []
    for model in models:
        for size, group in report[model]["by_size"].items():
            if group["crop_miou"] is not None and not math.isnan(group["crop_miou"]):
                rows.append(
                    {
                        "size": size,
                        "model": model,
                        "crop_miou": round(group["crop_miou"], 6),
                        "samples": group["samples"],
                    }
                )
    return rows


def category_bars(
    table: ScoreTable, by_category: Mapping[str, Mapping[str, dict]], max_categories: int = 20
) -> list[dict[str, Any]]:
    """Rows ``{"category", "model", "crop_miou", "samples"}`` for the ``max_categories`` most frequent categories."""
    frequent = [
        c
        for c, _ in sorted(Counter(table["category"].astype(str).tolist()).items(), key=lambda kv: (-kv[1], kv[0]))[
            :max_categories
        ]
    ]
    return [
        {
            "category": c,
            "model": m,
            "crop_miou": round(by_category[m][c]["crop_miou"], 6),
            "samples": by_category[m][c]["samples"],
        }
        for c in frequent
        for m in ordered(by_category)
        if by_category[m].get(c, {}).get("crop_miou") is not None
    ]


def iou_vs_area(table: ScoreTable) -> list[dict[str, Any]]:
    """One row per sample and model: ``ann_id``, COCO ``area`` (px^2), ``model``, ``crop_iou``."""
    return [
        {"ann_id": int(a), "area": round(float(area), 1), "model": m, "crop_iou": round(float(iou), 6)}
        for m in ordered(table.models)
        if m != BASELINE
        for a, area, iou in zip(table["ann_id"], table["area"], table[f"{m}_iou"])
    ]


def student_vs_teacher(table: ScoreTable, student: str = "student") -> list[dict[str, Any]]:
    """One row per sample and teacher: ``ann_id``, ``teacher``, ``teacher_iou``, ``student_iou``."""
    if student not in table.models:
        return []
    return [
        {"ann_id": int(a), "teacher": t, "teacher_iou": round(float(ti), 6), "student_iou": round(float(si), 6)}
        for t in table.models
        if is_teacher(t)
        for a, ti, si in zip(table["ann_id"], table[f"{t}_iou"], table[f"{student}_iou"])
    ]


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    """A DVC plot file: a header of ``columns`` (also when there is no row), then the rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_plots(
    folder: str | Path, table: ScoreTable, report: Mapping[str, Any], by_category: Mapping[str, Mapping[str, dict]]
) -> list[Path]:
    """Every plot file of the module docstring into ``folder``; returns their paths."""
    folder = Path(folder)
    files = [
        write_csv(folder / "iou_histogram.csv", iou_histogram(table), ["bin", "iou", "model", "share"]),
        write_csv(
            folder / "by_size.csv", size_bars(report, ordered(table.models)), ["size", "model", "crop_miou", "samples"]
        ),
        write_csv(
            folder / "by_category.csv", category_bars(table, by_category), ["category", "model", "crop_miou", "samples"]
        ),
        write_csv(folder / "iou_vs_area.csv", iou_vs_area(table), ["ann_id", "area", "model", "crop_iou"]),
        write_csv(
            folder / "student_vs_teacher.csv",
            student_vs_teacher(table),
            ["ann_id", "teacher", "teacher_iou", "student_iou"],
        ),
        write_csv(
            folder / "teacher_confidence.csv", confidence_histogram(table), ["bin", "confidence", "model", "share"]
        ),
    ]
    return files
