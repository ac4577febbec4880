"""Stage ``evaluate-int8``: the float student, the teacher and the INT8 model side by side on the same val crops.

Runs the evaluate stage's code (``picosam_pipeline/evaluate/shard_evaluation.py``) with ``evaluate.int8_model``
set to the export stage's fake-quant ONNX (``evaluate.int8_onnx``, the same INT8 arithmetic as the file the IMX500
converter takes; it normalises inside its graph) and writes into ``evaluate.int8_out_dir``: ``report.json``,
``per_sample.csv``, ``plots/`` and ``grid.png`` with the INT8 column, plus ``metrics/evaluate-int8.json``. It comes
after ``export`` in ``dvc.yaml``, so ``dvc repro`` gives the INT8 figures and grid with no hand edit; the
``evaluate`` stage itself stays independent of the IMX500 tool chain. The INT8 model's recorded crop convention
must match the shards'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from picosam_pipeline.config import Config
from picosam_pipeline.device import Runtime
from picosam_pipeline.evaluate.shard_evaluation import evaluate_shards, evaluation_output
from picosam_pipeline.outputs import StageOutput
from picosam_pipeline.reports import write_metrics

STAGE = "evaluate-int8"


def int8_config(cfg: Config) -> Config:
    """``cfg`` with the evaluate section pointed at the INT8 model and the INT8 output folder."""
    e = cfg.evaluate
    section = dataclasses.replace(e, int8_model=e.int8_onnx, out_dir=e.int8_out_dir, lvis=None, write_predictions=None)
    return dataclasses.replace(cfg, evaluate=section)


def output(cfg: Config) -> StageOutput:
    """``evaluate.int8_out_dir``, written like the evaluate stage's folder (outputs.py)."""
    return evaluation_output(cfg, stage=STAGE, key="evaluate.int8_out_dir", resolved=int8_config(cfg))


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Evaluate float, teacher and INT8; returns the headline figures (as the evaluate stage)."""
    int8 = int8_config(cfg)
    with output(cfg) as work:
        evaluation = evaluate_shards(int8.evaluate, runtime, work)
        # Only the INT8 model's figures: the float student's and the teacher's are evaluate's, once in the metrics.
        headline = {"student_int8": evaluation.headline()["student_int8"]}
        write_metrics(int8, STAGE, headline, {"timing": evaluation.timing})
        evaluation.print_report()
    return evaluation.summary()
