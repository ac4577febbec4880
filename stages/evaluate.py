"""Stage ``evaluate``: score the float student (and the teacher's stored logits) on the val shards.

Reads the val shards (``evaluate.shards``, in file order: no shuffle, no augmentation), the student
checkpoint, and the instance index (full-image GT masks and category names). Optionally also scores an
int8 / fake-quant ONNX model (``evaluate.int8_model``; the stage ``evaluate-int8`` after export does that with the
exported INT8 model, ``stages/evaluate_int8.py``) and runs an extra evaluation straight from LVIS annotations +
images (``evaluate.lvis``, see ``picosam_pipeline/evaluate/lvis.py``). A model recording another crop convention
than the shards' is refused.

Writes, in ``evaluate.out_dir``:

* ``report.json``       everything below plus per-category figures for each model (and LVIS);
* ``per_sample.csv``    one row per sample: ids, category, area, crop box, each model's crop and full-image IoU;
* ``plots/*.csv``        the DVC plots' data (``evaluate/plots.py``): IoU histogram, crop mIoU by size and by
                        category, IoU against object area, student against teacher IoU, teacher confidence;
* ``grid.png``          qualitative grid (crop, GT, teacher, student float, student int8; true positives, false
                        positives and false negatives in three colours, the prompt marked), a DVC image plot;
* ``config.resolved.json``; with ``evaluate.write_predictions`` (a path) the image-frame COCO results JSON there
  (COCOeval scores it) and the crop-frame file beside it (``NAME.crop.json``, see ``evaluate/predictions.py``).

``metrics/evaluate.json`` holds the headline: the student's overall ``crop_miou``, ``crop_map`` (the papers' crop
"mAP@[.5:.95]", a success rate, ``crop_success_map_50_95`` in report.json) and ``full_miou`` (the full-image mIoU),
the same under ``teacher`` (or ``teacher_NAME``) and ``student_int8``, and the LVIS student's crop mIoU; the
per-size and per-category tables stay in ``report.json`` (1203 LVIS categories would drown ``dvc metrics show``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config, require_inputs
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.plots import write_plots
from picosam_pipeline.evaluate.predict import load_crop_model
from picosam_pipeline.evaluate.predictions import crop_predictions_path, write_predictions
from picosam_pipeline.evaluate.report import GridPool, draw_grid
from picosam_pipeline.evaluate.score_table import (
    InstanceGT,
    category_report,
    evaluate_batches,
    evaluation_report,
    format_report,
)
from picosam_pipeline.outputs import StageOutput, output_folder, save_resolved, writes_output
from picosam_pipeline.reports import write_metrics

NAMES = ("report.json", "per_sample.csv", "plots/", "grid.png")  # besides its marker and evaluate.write_predictions


def output(cfg: Config, stage: str = "evaluate", key: str = "evaluate.out_dir") -> StageOutput:
    """``evaluate.out_dir``: replaced whole, only when it holds an earlier evaluation (outputs.py)."""
    e = cfg.evaluate
    names = list(NAMES)
    if e.write_predictions and _inside(e.write_predictions, e.out_dir):  # the image-frame file and the crop-frame one
        names += [
            Path(p).relative_to(e.out_dir).parts[0]
            for p in (e.write_predictions, crop_predictions_path(e.write_predictions))
        ]
    inputs = {
        "evaluate.shards": e.shards,
        "evaluate.checkpoint": e.checkpoint,
        "evaluate.index": e.index,
        "evaluate.int8_model": e.int8_model,
    }
    if e.lvis is not None:
        inputs.update({"evaluate.lvis.annotations": e.lvis.annotations, "evaluate.lvis.images": e.lvis.images})
    return StageOutput(
        cfg,
        stage,
        key,
        e.out_dir,
        sections=["evaluate"],
        names=names,
        what="evaluation report",
        inputs=inputs,
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


def _inside(path: str, folder: str) -> bool:
    return Path(folder) in Path(path).parents


@writes_output(output)
def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Evaluate; returns the headline figures and the wall time (also printed as a table)."""
    return evaluate(cfg, runtime)


def evaluate(cfg: Config, runtime: Runtime, *, stage: str = "evaluate") -> dict[str, Any]:
    """The stage's work, inside its output (:func:`run`, or ``evaluate-int8``'s with the INT8 model).

    ``stage`` names the metrics file (``metrics/<stage>.json``).
    """
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
    out = output_folder(e.out_dir)  # <out_dir>.partial, renamed to out_dir when this returns

    models = {"student": load_crop_model(e.checkpoint, runtime)}
    if e.int8_model:
        models["student_int8"] = load_crop_model(e.int8_model, runtime)
    size = models["student"].input_size
    shard_index = read_shard_index(e.shards)
    if shard_index.frame.crop_size != size:
        raise PipelineError(
            f"evaluate.shards: {e.shards} holds {shard_index.frame.crop_size}-px crops but the student "
            f"{e.checkpoint} takes {size}-px input; evaluate the shards packed for this student"
        )
    check_model_crops(models, shard_index, {"student": "evaluate.checkpoint", "student_int8": "evaluate.int8_model"})
    gt = InstanceGT.from_index(e.index, e.split)
    # Loader workers decode the next batches while this process runs the models and scores; their number is fixed
    # (not the core count) because it sets the batch order, and with it the per-sample CSV, grid and predictions.
    batches = make_loader(
        e.shards,
        batch_size=e.batch_size,
        shuffle_buffer=0,
        num_workers=evaluate_loader_workers(),
        seed=runtime.seed,
        input_size=size,
    )
    pool = GridPool(e.grid_samples) if e.grid_samples else None
    predictions = [] if e.write_predictions else None
    table, timing = evaluate_batches(
        batches,
        models,
        gt,
        on_sample=pool.offer if pool else None,
        predictions=predictions,
        total=shard_index.samples,
        teachers=batches.teachers,
    )
    if len(table) == 0:
        raise PipelineError(f"evaluate.shards: {e.shards} yielded no sample; repack the {e.split!r} split")
    protocol = gt.protocol_of(table["ann_id"], table.crop_boxes)

    report = evaluation_report(table)
    report.update(
        split=e.split, checkpoint=e.checkpoint, int8_model=e.int8_model, protocol=protocol, crop=shard_index.crop
    )
    by_category = {m: category_report(table, m) for m in table.models}
    lvis = _lvis(cfg, models["student"], protocol, read_metadata(e.index).get("prepare", {})) if e.lvis else None

    table.write_csv(out / "per_sample.csv")
    write_plots(out / "plots", table, report, by_category)
    if pool is not None:
        picked = [{**s, "prompt": gt.prompt(s["ann_id"], protocol)} for s in pool.pick()]  # marked on every cell
        title = (
            f"{len(picked)} of {len(table)} {e.split} samples, spread over student crop IoU "
            f"({protocol or 'unknown'} crops; teacher = stored logits)"
        )
        draw_grid(
            picked,
            out / "grid.png",
            title=title,
            int8_missing_reason=None if e.int8_model else f"INT8: stage evaluate-int8 ({e.int8_out_dir}/grid.png)",
        )
    if predictions is not None:
        predictions.sort(key=lambda p: (p.image_id, p.annotation_id))  # scoring order: per image, annotation order
        # inside out_dir: written into the unfinished folder with the rest; elsewhere: its own write-then-rename
        inside = _inside(e.write_predictions, e.out_dir)
        write_predictions(
            predictions, out / Path(e.write_predictions).relative_to(e.out_dir) if inside else e.write_predictions
        )

    # No timing here: it changes every run, and the output must not (it goes to metrics/runs/<stage>.jsonl).
    full = {**report, "by_category": by_category}
    if lvis is not None:
        full["lvis"] = lvis
    (out / "report.json").write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    save_resolved(cfg, out, ["evaluate"])
    write_metrics(cfg, stage, headline_metrics(report, table.models, lvis), {"timing": _rounded(timing)})

    print(format_report(report, table.models))
    if lvis is not None:
        print(
            f"LVIS ({lvis['dataset']['format']} {lvis['dataset']['version']}): {lvis['scored']} of "
            f"{lvis['annotations']} annotations scored, {lvis['annotations_without_image']} without image; student "
            f"crop mIoU {_fmt(lvis['student']['crop_miou'])}"
        )
        for warning in lvis["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    headline = {m: round(report[m]["crop_miou"], 4) for m in table.models if report[m]["crop_miou"] is not None}
    return {"samples": len(table), "crop_miou": headline, "seconds": round(time.perf_counter() - start, 1)}


def evaluate_loader_workers() -> int:
    """Loader worker processes of the evaluate stages: two on every machine (fewer only when the split has fewer
    shards). Workers take whole shards and the loader alternates their batches, so the order depends on this number
    alone; two decode fast enough for the stage's own scoring on a 2-core machine (one left it waiting)."""
    return 2


def check_model_crops(models: dict[str, Any], shard_index, keys: dict[str, str]) -> None:
    """Every model that records its crop convention must have been trained on the shards' crops (a PicoSAM2 model
    scored on PicoSAM3 crops would give a meaningless figure); a model without a record is scored as it is."""
    from picosam_pipeline.data.crops import convention_differences

    for name, model in models.items():
        recorded = getattr(model, "crop", None)
        differences = convention_differences(recorded, shard_index.crop) if recorded else []
        if differences:
            raise PipelineError(
                f"{keys.get(name, name)}: {model.name} was trained on {recorded['convention']} crops, but "
                f"{shard_index.path} holds {shard_index.crop['convention']} crops ({'; '.join(differences)}); score it "
                "on shards packed with its recipe (recipe.name), or point the key at the model trained on these shards"
            )


# Headline name -> report.json name: short, as they head `dvc exp show` columns ("crop_map", "teacher.crop_map").
HEADLINE = {"crop_miou": "crop_miou", "crop_map": "crop_success_map_50_95", "full_miou": "full_image_miou"}


def headline_metrics(report: dict[str, Any], models: list[str], lvis: dict[str, Any] | None = None) -> dict[str, Any]:
    """``metrics/evaluate.json``: per model the three overall figures (sizes and categories are in report.json).

    The student's are top-level (``crop_miou``: the column experiments are compared by), every other model's under
    its name (``teacher.crop_miou``, ``student_int8.crop_miou``): short column names keep `dvc exp show` narrow.
    """
    metrics: dict[str, Any] = {}
    for model in models:
        figures = {short: report[model][name] for short, name in HEADLINE.items()}
        metrics.update(figures) if model == "student" else metrics.setdefault(model, figures)
    if lvis is not None:
        metrics["lvis"] = {"crop_miou": lvis["student"]["crop_miou"]}
    return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _lvis(cfg: Config, model, protocol: str | None, prepare: dict[str, Any]) -> dict[str, Any]:
    """The ``evaluate.lvis`` extra evaluation, with the shards' crop convention and prepare's crop parameters."""
    from picosam_pipeline.evaluate.lvis import evaluate_annotations

    lv = cfg.evaluate.lvis
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
        batch_size=cfg.evaluate.batch_size,
        roi_padding=prepare.get("roi_padding", 0.1),
        window=prepare.get("point_crop_size", 96),
    )
    report = evaluation_report(table, models=["student"])
    return {
        **summary,
        "protocol": protocol,
        "student": report["student"],
        "by_category": category_report(table, "student"),
    }


def _rounded(timing: dict[str, Any]) -> dict[str, Any]:
    return {
        "seconds": round(timing["seconds"], 3),
        "model_seconds": {m: round(s, 3) for m, s in timing["model_seconds"].items()},
    }
