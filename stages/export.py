"""Stage ``export``: the deliverable ONNX files, checked in onnxruntime, with their input/output contract.

Reads the quantize stage's folder (``export.quantized_dir``): MCT's two ONNX serialisations of the INT8 model
and ``probe.npz`` (val crops with the quantised torch model's logits). Writes, in ``export.out_dir``:

* ``picosam_int8.onnx``: the MCTQ file ``imxconv-pt`` converts (network name on the camera: ``picosam_int8``);
* ``picosam_int8_fakequant.onnx``: the same INT8 arithmetic in QuantizeLinear/DequantizeLinear, for evaluation;
* ``picosam_int8.json``: input and output names, shapes, dtypes and value ranges, where the ImageNet
  normalisation happens (inside the graph) and what the camera feeds, the output quantisation step, the crop
  convention the student was trained on (``crop``: PicoSAM3 box ROI or PicoSAM2 point window, with its parameters;
  the Raspberry Pi demo builds its inference ROI from it), and the onnxruntime checks;
* ``report.json``: the checks and the file sizes; ``config.resolved.json``; and ``metrics/export.json``: the
  headline (each ONNX file's mask agreement with the quantised torch model on the probe crops; ``untrained_student:
  true`` when quantize's files say the student is untrained, which is said on stderr too).

Both files carry the contract in their ONNX ``metadata_props`` too (``picosam.*`` keys, beside MCT's). Each is run
in onnxruntime on the probe crops (the MCTQ file, ~300x slower, on ``mctq_check_samples`` of them) and
compared with the quantised torch model; the stage fails when the largest difference exceeds
``max_diff_steps`` output quantisation steps or masks agree on fewer than ``min_mask_agreement`` of the pixels.
For scale the contract also gives how far quantisation itself moved the logits (torch INT8 against float). The
work is ``picosam_pipeline/deploy/onnx_contract.py``'s.
"""

from __future__ import annotations

from typing import Any

from picosam_pipeline.config import Config
from picosam_pipeline.deploy.onnx_contract import EXPORT_FILES, check_agreement, export_network
from picosam_pipeline.deploy.onnx_export import EXPORT_MCTQ_FILE, METADATA_PREFIX, read_onnx_metadata
from picosam_pipeline.device import Runtime
from picosam_pipeline.outputs import StageOutput
from picosam_pipeline.reports import write_metrics
from picosam_pipeline.untrained import metadata_training_warnings, untrained_flag, warn_untrained


def output(cfg: Config) -> StageOutput:
    """``export.out_dir``: replaced whole, only when it holds an earlier export (outputs.py)."""
    e = cfg.export
    return StageOutput(
        cfg,
        "export",
        "export.out_dir",
        e.out_dir,
        sections=["export"],
        names=EXPORT_FILES,
        what="ONNX files",
        inputs={"export.quantized_dir": e.quantized_dir},
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Copy, stamp and check the two ONNX files; returns the largest differences found."""
    e = cfg.export
    with output(cfg) as work:
        exported = export_network(e.quantized_dir, work, mctq_check_samples=e.mctq_check_samples)
        # quantize's flag of an untrained student, kept in the ONNX metadata
        untrained = metadata_training_warnings(read_onnx_metadata(work / EXPORT_MCTQ_FILE), METADATA_PREFIX)
        write_metrics(cfg, "export", {**exported.headline(), **untrained_flag(untrained)}, exported.run_facts())
        check_agreement(
            exported, max_diff_steps=e.max_diff_steps, min_mask_agreement=e.min_mask_agreement, out_dir=e.out_dir
        )
    warn_untrained("export", e.quantized_dir, untrained)
    return {**exported.summary(), **untrained_flag(untrained)}
