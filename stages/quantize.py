"""Stage ``quantize``: MCT INT8 quantisation of the trained student for the IMX500, scored against float.

Reads the student checkpoint (``quantize.checkpoint``), draws ``representative_batches`` x ``batch_size`` crops
at random from the train shards, wraps the student with its input normalisation (the camera feeds RGB; see
``picosam_pipeline/deploy/quantize.py``) and quantises it with MCT for the IMX500 target platform
``tpc_version`` (PTQ, or GPTQ when ``gptq_epochs > 0``). Float and INT8 are then scored on the same val
shards by the evaluate stage's code (``score_table.evaluate_batches``): crop-space mIoU, the papers'
"mAP@[.5:.95]" and full-image mIoU.

MCT's quantised PyTorch model lives only in this process and its exporter is its only serialisation, so
this stage writes it, in ``quantize.out_dir``:

* ``quantized_mctq.onnx`` / ``quantized_fakequant.onnx``: MCT's two ONNX formats (``onnx_export.py``);
* ``probe.npz``: ``probe_samples`` val crops (``rgb`` float32 (N, 3, S, S) in [0, 1]) with the INT8 torch model's
  and the float model's logits (``int8_logits`` / ``float_logits``, (N, 1, S, S)): the export stage checks the
  ONNX files against them;
* ``report.json``: the student's meta (its crop convention included), the quantisation settings, both models' full
  evaluation report; the ONNX files carry the crop convention too (metadata ``picosam.crop``, JSON);
* ``plots/by_size.csv``: float and INT8 crop mIoU per COCO size (a DVC plot);
* ``config.resolved.json``; and ``metrics/quantize.json``: the headline (float and INT8 crop mIoU, the drop, whether
  it is within quantize.max_miou_drop, and ``untrained_student: true`` for a student the trainer flagged untrained,
  which is also said on stderr and carried by the ONNX files to export and package); ``report.json`` holds the full
  figures: float and INT8 side by side, their difference, mask pixel agreement, INT8 weight bytes beside the papers'
  INT8 sizes, and the time of each step.

The work is ``picosam_pipeline/deploy/quantized_student.py``'s.
"""

from __future__ import annotations

from typing import Any

from picosam_pipeline.config import Config
from picosam_pipeline.deploy.onnx_export import (
    QUANTIZE_FAKEQUANT_FILE,
    QUANTIZE_MCTQ_FILE,
    QUANTIZE_PROBE_FILE,
    QUANTIZE_REPORT_FILE,
)
from picosam_pipeline.deploy.quantized_student import quantize_inputs, quantize_student
from picosam_pipeline.device import Runtime
from picosam_pipeline.outputs import StageOutput
from picosam_pipeline.reports import write_metrics

NAMES = (QUANTIZE_MCTQ_FILE, QUANTIZE_FAKEQUANT_FILE, QUANTIZE_PROBE_FILE, QUANTIZE_REPORT_FILE, "plots/")


def output(cfg: Config) -> StageOutput:
    """``quantize.out_dir``: replaced whole, only when it holds an earlier quantize output (outputs.py)."""
    q = cfg.quantize
    return StageOutput(
        cfg,
        "quantize",
        "quantize.out_dir",
        q.out_dir,
        sections=["quantize"],
        what="quantised model",
        names=NAMES,
        inputs=quantize_inputs(q),
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Quantise, score, serialise; returns float and INT8 crop mIoU and the wall time."""
    with output(cfg) as work:
        result = quantize_student(cfg.quantize, runtime, work)
        # Headline: float vs INT8 side by side and the drop; the full evaluation and weight counts are in report.json.
        write_metrics(cfg, "quantize", result.headline(), result.run)
        result.warn()
    return result.summary()
