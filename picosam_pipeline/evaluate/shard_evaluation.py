"""The evaluation of a student on the val shards: the models scored, the files of the evaluate folder and the
headline figures.

Two stages run it: ``evaluate`` (the float student and the teacher's stored logits; optionally an INT8 model,
``evaluate.int8_model``, and LVIS straight from annotations + images, ``evaluate.lvis``) and ``evaluate-int8`` (the
same with the exported INT8 model in the INT8 column). Both write their folder through :func:`evaluation_output`
and fill it with :func:`evaluate_shards`::

    with evaluation_output(cfg, stage="evaluate", key="evaluate.out_dir") as work:
        evaluation = evaluate_shards(cfg.evaluate, runtime, work)   # report.json, per_sample.csv, plots/, grid.png
        write_metrics(cfg, "evaluate", evaluation.headline(), {"timing": evaluation.timing})

The shards are read in file order (no shuffle, no augmentation). A model recording another crop convention than
the shards' is refused (``crop_convention.check_crops``); a model without a record is scored as it is. Beside the
models, the trivial ``baseline`` (the whole crop as the mask) is scored, so learning is told from nothing; and the
student's provenance (teachers and their weights, dataset, recipe: ``picosam_pipeline/provenance.py``; the shards'
when the student does not record it) heads the report, the grid and the printed table.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from picosam_pipeline.config import require_inputs
from picosam_pipeline.data.crop_convention import check_crops
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.lvis import lvis_report
from picosam_pipeline.evaluate.plots import write_plots
from picosam_pipeline.evaluate.predict import CropModel, load_crop_model
from picosam_pipeline.evaluate.predictions import CropPrediction, crop_predictions_path, write_predictions
from picosam_pipeline.evaluate.report import GridPool, draw_grid
from picosam_pipeline.evaluate.score_table import (
    BASELINE,
    MODEL_LABELS,
    InstanceGT,
    ScoreTable,
    category_report,
    evaluate_batches,
    evaluation_report,
    format_score_table,
)
from picosam_pipeline.outputs import StageOutput
from picosam_pipeline.provenance import Provenance
from picosam_pipeline.reports import write_report
from picosam_pipeline.train.loader import make_loader
from picosam_pipeline.train.shards import ShardIndex, read_shard_index
from picosam_pipeline.written_paths import check_predictions_file

if TYPE_CHECKING:
    from picosam_pipeline.config import Config, EvaluateConfig
    from picosam_pipeline.device import Runtime

NAMES = ("report.json", "per_sample.csv", "plots/", "grid.png")  # besides its marker and evaluate.write_predictions
MODEL_KEYS = {"student": "evaluate.checkpoint", "student_int8": "evaluate.int8_model"}  # the param naming each model
# Headline name -> report.json name: short, as they head `dvc exp show` columns ("crop_map", "teacher.crop_map").
HEADLINE = {"crop_miou": "crop_miou", "crop_map": "crop_success_map_50_95", "full_miou": "full_image_miou"}


def evaluation_inputs(e: EvaluateConfig) -> dict[str, str]:
    """``{param: path}`` of what the evaluation reads: shards, checkpoint, index, and the INT8 model and the LVIS
    files when set."""
    inputs = {"evaluate.shards": e.shards, "evaluate.checkpoint": e.checkpoint, "evaluate.index": e.index}
    if e.int8_model:
        inputs["evaluate.int8_model"] = e.int8_model
    if e.lvis is not None:
        inputs.update({"evaluate.lvis.annotations": e.lvis.annotations, "evaluate.lvis.images": e.lvis.images})
    return inputs


def evaluation_output(cfg: Config, *, stage: str, key: str, resolved: Config | None = None) -> StageOutput:
    """The folder of the evaluate stage ``stage`` named by the param ``key`` (``evaluate.out_dir``, or
    ``evaluate.int8_out_dir`` for evaluate-int8, whose marker records ``resolved``: the evaluate section pointed
    at the INT8 model): replaced whole, only when it holds an earlier evaluation of that stage (outputs.py)."""
    e = (resolved or cfg).evaluate
    names = list(NAMES)
    if e.write_predictions:
        check_predictions_file(e.write_predictions, e.out_dir)
        names += [  # the image-frame file and the crop-frame one
            Path(p).relative_to(e.out_dir).parts[0]
            for p in (e.write_predictions, crop_predictions_path(e.write_predictions))
        ]
    return StageOutput(
        cfg,
        stage,
        key,
        e.out_dir,
        sections=["evaluate"],
        names=names,
        what="evaluation report",
        inputs=evaluation_inputs(e),
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
        resolved=resolved,
    )


def evaluate_loader_workers() -> int:
    """Loader worker processes of the evaluate stages: two on every machine (fewer only when the split has fewer
    shards). Workers take whole shards and the loader alternates their batches, so the order depends on this number
    alone; two decode fast enough for the stage's own scoring on a 2-core machine (one left it waiting)."""
    return 2


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_shards` scored (its files are written by then)."""

    table: ScoreTable  # one row per val sample, a column per model
    report: dict[str, Any]  # score_table.evaluation_report + split, checkpoint, int8_model, protocol, crop
    lvis: dict[str, Any] | None  # lvis.lvis_report, with evaluate.lvis
    timing: dict[str, Any]  # {"seconds", "model_seconds": {model: s}}, rounded to ms: the run log's, not the output's
    seconds: float  # the whole evaluation's wall time

    def headline(self) -> dict[str, Any]:
        """``metrics/<stage>.json``: :func:`headline_metrics` of this evaluation."""
        return headline_metrics(self.report, self.table.models, self.lvis)

    def summary(self) -> dict[str, Any]:
        """What the stage returns: samples, each model's crop mIoU (4 decimals) and the wall time (0.1 s)."""
        report = self.report
        crop_miou = {
            m: round(report[m]["crop_miou"], 4) for m in self.table.models if report[m]["crop_miou"] is not None
        }
        return {"samples": len(self.table), "crop_miou": crop_miou, "seconds": round(self.seconds, 1)}

    def print_report(self) -> None:
        """The provenance line and the report as a table on stdout; the LVIS line and its warnings (stderr) when LVIS
        was scored."""
        print(Provenance.from_dict(self.report.get("provenance")).line())
        print(format_score_table(self.report, self.table.models))
        lvis = self.lvis
        if lvis is not None:
            miou = lvis["student"]["crop_miou"]
            print(
                f"LVIS ({lvis['dataset']['format']} {lvis['dataset']['version']}): {lvis['scored']} of "
                f"{lvis['annotations']} annotations scored, {lvis['annotations_without_image']} without image; "
                f"student crop mIoU {'n/a' if miou is None else f'{miou:.3f}'}"
            )
            for warning in lvis["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)


def evaluate_shards(e: EvaluateConfig, runtime: Runtime, work: Path) -> Evaluation:
    """Score ``e``'s models on its val shards and write the evaluate folder's files into ``work``.

    Writes ``per_sample.csv``, ``plots/*.csv``, ``grid.png`` (``e.grid_samples`` > 0), ``report.json`` (the report
    with per-category figures per model, and LVIS) and, with ``e.write_predictions``, the predictions files (inside
    ``e.out_dir``: into ``work``). No timing goes into the files: it changes every run, and the output must not.
    """
    require_inputs(evaluation_inputs(e))
    start = time.perf_counter()
    models, shard_index = load_scored_models(e, runtime)
    gt = InstanceGT.from_index(e.index, e.split)
    # Loader workers decode the next batches while this process runs the models and scores; their number is fixed
    # (not the core count) because it sets the batch order, and with it the per-sample CSV, grid and predictions.
    batches = make_loader(
        e.shards,
        batch_size=e.batch_size,
        shuffle_buffer=0,
        num_workers=evaluate_loader_workers(),
        seed=runtime.seed,
        input_size=models["student"].input_size,
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
        baseline=True,
    )
    if len(table) == 0:
        raise PipelineError(f"evaluate.shards: {e.shards} yielded no sample; repack the {e.split!r} split")
    protocol = gt.protocol_of(table["ann_id"], table.crop_boxes)
    report = evaluation_report(table)
    report[BASELINE]["description"] = f"{MODEL_LABELS[BASELINE]}: every pixel of every crop foreground"
    provenance = evaluation_provenance(models["student"], e.shards)
    report.update(
        split=e.split,
        checkpoint=e.checkpoint,
        int8_model=e.int8_model,
        protocol=protocol,
        crop=shard_index.crop,
        provenance=provenance.as_dict(),
    )
    by_category = {m: category_report(table, m) for m in table.models}
    lvis = lvis_report(e, models["student"], protocol) if e.lvis else None

    table.write_csv(work / "per_sample.csv")
    write_plots(work / "plots", table, report, by_category)
    if pool is not None:
        _write_grid(e, work / "grid.png", pool, gt, protocol=protocol, samples=len(table), provenance=provenance)
    if predictions is not None:
        _write_predictions(e, work, predictions)
    write_report(work, {**report, "by_category": by_category, **({"lvis": lvis} if lvis is not None else {})})
    return Evaluation(table, report, lvis, _rounded(timing), time.perf_counter() - start)


def load_scored_models(e: EvaluateConfig, runtime: Runtime) -> tuple[dict[str, CropModel], ShardIndex]:
    """The models to score (``student``, and ``student_int8`` with ``e.int8_model``) and the shards' index, checked
    against each other: the student's input size must be the shards' crop size, and each model's crops theirs."""
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
    check_models_crops(models, shard_index)
    return models, shard_index


def check_models_crops(
    models: dict[str, CropModel], shard_index: ShardIndex, keys: dict[str, str] = MODEL_KEYS
) -> None:
    """Every model that records its crop convention must have been trained on the shards' crops (a PicoSAM2 model
    scored on PicoSAM3 crops would give a meaningless figure); a model without a record is scored as it is.

    Raises:
        CropMismatch: ``SHARDS holds C1 crops, but KEY (MODEL) needs C2 crops (...); FIX`` (``keys`` names the
            param of each model).
    """
    for name, model in models.items():
        recorded = getattr(model, "crop", None)
        if recorded:
            key = keys.get(name, name)
            check_crops(
                shard_index.crop,
                str(shard_index.path),
                recorded,
                f"{key} ({model.name})",
                f"score it on shards packed with its recipe (recipe.name), or point {key} at the model trained on "
                "these shards",
            )


def evaluation_provenance(student: CropModel, shards: str) -> Provenance:
    """Where the scored student comes from: its own record, else the evaluated shards' (teachers and dataset)."""
    recorded = Provenance.from_dict(getattr(student, "provenance", None))
    return recorded if recorded.teachers else Provenance.from_shards(shards)


def _write_grid(
    e: EvaluateConfig,
    path: Path,
    pool: GridPool,
    gt: InstanceGT,
    *,
    protocol: str | None,
    samples: int,
    provenance: Provenance,
) -> None:
    """``grid.png``: the pool's picks, the prompt marked on every cell, the provenance in the title."""
    picked = [{**s, "prompt": gt.prompt(s["ann_id"], protocol)} for s in pool.pick()]
    title = (
        f"{provenance.line()}\n{len(picked)} of {samples} {e.split} samples, spread over student crop IoU "
        f"({protocol or 'unknown'} crops; teacher = stored logits)"
    )
    draw_grid(
        picked,
        path,
        title=title,
        int8_missing_reason=None if e.int8_model else f"INT8: stage evaluate-int8 ({e.int8_out_dir}/grid.png)",
    )


def _write_predictions(e: EvaluateConfig, work: Path, predictions: list[CropPrediction]) -> None:
    """``e.write_predictions`` and its crop-frame file, inside ``e.out_dir``: written into ``work`` with the rest."""
    predictions.sort(key=lambda p: (p.image_id, p.annotation_id))  # scoring order: per image, annotation order
    write_predictions(predictions, work / Path(e.write_predictions).relative_to(e.out_dir))


def headline_metrics(report: dict[str, Any], models: list[str], lvis: dict[str, Any] | None = None) -> dict[str, Any]:
    """``metrics/evaluate.json``: per model the three overall figures (sizes and categories are in report.json).

    The student's are top-level (``crop_miou``: the column experiments are compared by), every other model's under
    its name (``teacher.crop_miou``, ``student_int8.crop_miou``): short column names keep `dvc exp show` narrow.
    The baseline gets one figure, ``baseline.crop_miou``.
    """
    metrics: dict[str, Any] = {}
    for model in models:
        if model == BASELINE:  # the one figure it is there for: keeps the metrics file (and exp show) narrow
            metrics[BASELINE] = {"crop_miou": report[BASELINE]["crop_miou"]}
            continue
        figures = {short: report[model][name] for short, name in HEADLINE.items()}
        metrics.update(figures) if model == "student" else metrics.setdefault(model, figures)
    if lvis is not None:
        metrics["lvis"] = {"crop_miou": lvis["student"]["crop_miou"]}
    return metrics


def _rounded(timing: dict[str, Any]) -> dict[str, Any]:
    return {
        "seconds": round(timing["seconds"], 3),
        "model_seconds": {m: round(s, 3) for m, s in timing["model_seconds"].items()},
    }
