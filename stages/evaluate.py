"""Stage ``evaluate``: score the float student (and the teacher's stored logits) on the val shards.

Reads the val shards (``evaluate.shards``, in file order: no shuffle, no augmentation), the student
checkpoint, and the instance index (full-image GT masks and category names). Optionally also scores an
int8 / fake-quant ONNX model (``evaluate.int8_model``; the stage ``evaluate-int8`` after export does that with the
exported INT8 model, ``stages/evaluate_int8.py``) and runs an extra evaluation straight from LVIS annotations +
images (``evaluate.lvis``, see ``picosam_pipeline/evaluate/lvis.py``). A model recording another crop convention
than the shards' is refused. The work is ``picosam_pipeline/evaluate/shard_evaluation.py``'s.

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

from typing import Any

from picosam_pipeline.config import Config
from picosam_pipeline.device import Runtime
from picosam_pipeline.evaluate.shard_evaluation import evaluate_shards, evaluation_output
from picosam_pipeline.outputs import StageOutput
from picosam_pipeline.reports import write_metrics

STAGE = "evaluate"


def output(cfg: Config) -> StageOutput:
    """``evaluate.out_dir``: replaced whole, only when it holds an earlier evaluation (outputs.py)."""
    return evaluation_output(cfg, stage=STAGE, key="evaluate.out_dir")


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Evaluate; returns the headline figures and the wall time (also printed as a table)."""
    with output(cfg) as work:
        evaluation = evaluate_shards(cfg.evaluate, runtime, work)
        write_metrics(cfg, STAGE, evaluation.headline(), {"timing": evaluation.timing})
        evaluation.print_report()
    return evaluation.summary()
