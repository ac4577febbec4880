"""Stage ``evaluate``: score the float student (and the teacher's stored logits) on the val shards.

Reads the val shards (``evaluate.shards``, in file order: no shuffle, no augmentation), the student
checkpoint, and the instance index (full-image GT masks and category names). Optionally also scores an
int8 / fake-quant ONNX model (``evaluate.int8_model``) and runs an extra evaluation straight from LVIS
annotations + images (``evaluate.lvis``, see ``picosam_pipeline/evaluate/lvis.py``).

Writes, in ``evaluate.out_dir``:

* ``report.json``       everything below plus per-category figures for each model (and LVIS);
* ``per_sample.csv``    one row per sample: ids, category, area, crop box, each model's crop and full-image IoU;
* ``plots/iou_histogram.csv``  share of samples per crop-IoU bin per model (DVC ``linear`` plot);
* ``plots/by_size.csv``        crop mIoU per COCO size bucket and model (DVC ``bar_horizontal`` plot);
* ``grid.png``          qualitative grid (crop, GT, teacher, student float, student int8), a DVC image plot;
* ``config.resolved.json``; with ``evaluate.write_predictions`` also the crop-frame RLE results JSON.

``metrics/evaluate.json`` holds the overall and per-size figures per model (crop mIoU, crop "mAP@[.5:.95]"
as ``crop_success_map_50_95``, full-image mIoU; names from ``scoring.py``) and the LVIS summary; the
per-category tables stay in ``report.json`` (1203 LVIS categories would drown ``dvc metrics show``).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config, require_inputs, save_resolved, write_metrics
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.metrics import (
    InstanceGT,
    ScoreTable,
    category_report,
    evaluate_batches,
    evaluation_report,
    format_report,
    is_teacher,
    iou_histogram,
    size_bars,
)
from picosam_pipeline.evaluate.predict import load_crop_model
from picosam_pipeline.evaluate.report import GridPool, draw_grid
from picosam_pipeline.evaluate.scoring import write_predictions


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Evaluate; returns the headline figures and the wall time (also printed as a table)."""
    from picosam_pipeline.data.index import read_metadata
    from picosam_pipeline.train.loader import make_loader
    from picosam_pipeline.train.shards import read_shard_index

    e = cfg.evaluate
    inputs = {"evaluate.shards": e.shards, "evaluate.checkpoint": e.checkpoint, "evaluate.index": e.index}
    if e.int8_model:
        inputs["evaluate.int8_model"] = e.int8_model
    if e.lvis is not None:
        inputs.update({"evaluate.lvis.annotations": e.lvis.annotations, "evaluate.lvis.images": e.lvis.images})
    require_inputs(inputs)
    start = time.perf_counter()
    out = Path(e.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    models = {"student": load_crop_model(e.checkpoint, runtime)}
    if e.int8_model:
        models["student_int8"] = load_crop_model(e.int8_model, runtime)
    size = models["student"].input_size
    shard_index = read_shard_index(e.shards)
    if shard_index.frame.crop_size != size:
        raise PipelineError(f"evaluate.shards: {e.shards} holds {shard_index.frame.crop_size}-px crops but the student "
                            f"{e.checkpoint} takes {size}-px input; evaluate the shards packed for this student")
    gt = InstanceGT.from_index(e.index, e.split)
    batches = make_loader(e.shards, batch_size=e.batch_size, shuffle_buffer=0, num_workers=0, seed=runtime.seed,
                          input_size=size)
    pool = GridPool(e.grid_samples) if e.grid_samples else None
    predictions = [] if e.write_predictions else None
    table, timing = evaluate_batches(batches, models, gt, on_sample=pool.offer if pool else None,
                                     predictions=predictions, total=shard_index.samples, teachers=batches.teachers)
    if len(table) == 0:
        raise PipelineError(f"evaluate.shards: {e.shards} yielded no sample; repack the {e.split!r} split")
    protocol = gt.protocol_of(table["ann_id"], table.crop_boxes)

    report = evaluation_report(table)
    report.update(split=e.split, checkpoint=e.checkpoint, int8_model=e.int8_model, protocol=protocol)
    by_category = {m: category_report(table, m) for m in table.models}
    lvis = _lvis(cfg, models["student"], protocol, read_metadata(e.index).get("prepare", {})) if e.lvis else None

    table.write_csv(out / "per_sample.csv")
    _write_plots(out / "plots", table, report)
    if pool is not None:
        title = (f"{len(pool.pick())} of {len(table)} {e.split} samples, spread over student crop IoU "
                 f"({protocol or 'unknown'} crops; teacher = stored logits)")
        draw_grid(pool.pick(), out / "grid.png", title=title,
                  int8_missing_reason=None if e.int8_model else "no int8 model given; set evaluate.int8_model")
    if predictions is not None:
        predictions.sort(key=lambda p: (p.image_id, p.annotation_id))  # scoring order: per image, annotation order
        write_predictions(predictions, e.write_predictions)

    full = {**report, "by_category": by_category, "timing": _rounded(timing)}
    if lvis is not None:
        full["lvis"] = lvis
    (out / "report.json").write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    save_resolved(cfg, out, ["evaluate"])
    metrics = {**report}
    if lvis is not None:
        metrics["lvis"] = {k: v for k, v in lvis.items() if k not in ("by_category", "seconds")}
    write_metrics(cfg, "evaluate", metrics, {"timing": _rounded(timing)})

    print(format_report(report, table.models))
    if lvis is not None:
        print(f"LVIS ({lvis['dataset']['format']} {lvis['dataset']['version']}): {lvis['scored']} of {lvis['annotations']} "
              f"annotations scored, {lvis['annotations_without_image']} without image; student crop mIoU "
              f"{_fmt(lvis['student']['crop_miou'])}")
        for warning in lvis["warnings"]:
            print(f"warning: {warning}")
    headline = {m: round(report[m]["crop_miou"], 4) for m in table.models if report[m]["crop_miou"] is not None}
    return {"samples": len(table), "crop_miou": headline, "seconds": round(time.perf_counter() - start, 1)}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _lvis(cfg: Config, model, protocol: str | None, prepare: dict[str, Any]) -> dict[str, Any]:
    """The ``evaluate.lvis`` extra evaluation, with the shards' crop convention and prepare's crop parameters."""
    from picosam_pipeline.evaluate.lvis import evaluate_annotations

    lv = cfg.evaluate.lvis
    if protocol is None:
        raise PipelineError("evaluate.lvis: the val shards' crop boxes match neither the index's roi_box nor its point_box, "
                            "so the crop convention for LVIS is unknown; rerun the stages after prepare (dvc repro)")
    table, summary = evaluate_annotations(lv.annotations, lv.images, model, protocol, max_annotations=lv.max_annotations,
                                          batch_size=cfg.evaluate.batch_size,
                                          roi_padding=prepare.get("roi_padding", 0.1),
                                          window=prepare.get("point_crop_size", 96))
    report = evaluation_report(table, models=["student"])
    return {**summary, "protocol": protocol, "student": report["student"],
            "by_category": category_report(table, "student")}


def _write_plots(folder: Path, table: ScoreTable, report: dict[str, Any]) -> None:
    """The two DVC plot data files (see ``plots:`` in dvc.yaml)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_csv(folder / "iou_histogram.csv", iou_histogram(table))
    # Student first, teachers last, so the bars read top-down as "ours, then the reference".
    models = [m for m in table.models if not is_teacher(m)] + [m for m in table.models if is_teacher(m)]
    _write_csv(folder / "by_size.csv", size_bars(report, models))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)


def _rounded(timing: dict[str, Any]) -> dict[str, Any]:
    return {"seconds": round(timing["seconds"], 3),
            "model_seconds": {m: round(s, 3) for m, s in timing["model_seconds"].items()}}
