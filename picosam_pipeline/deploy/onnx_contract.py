"""The deliverable ONNX files of the export stage, checked in onnxruntime, and their input/output contract.

From the quantize stage's folder (MCT's two ONNX serialisations of the INT8 model, ``probe.npz`` and its
``report.json``), :func:`export_network` writes into the export folder::

    picosam_int8.onnx             the MCTQ file imxconv-pt converts (network name on the camera: picosam_int8)
    picosam_int8_fakequant.onnx   the same INT8 arithmetic in QuantizeLinear/DequantizeLinear, for evaluation
    picosam_int8.json             the contract (:func:`network_contract`) with the onnxruntime checks
    report.json                   the checks, the output step and the file sizes

The contract records the student's provenance (``provenance``: teachers and their weights, dataset, recipe, and
``smoke_test`` when a teacher had random weights; ``picosam_pipeline/provenance.py``), from the checkpoint meta the
quantize report keeps. Both ONNX files carry the contract in their ``metadata_props`` too (``picosam.*`` keys,
beside MCT's). Each is run
in onnxruntime on the probe crops (the MCTQ file, ~300x slower, on a few of them) and compared with the quantised
torch model (``onnx_export.compare_onnx``); :func:`check_agreement` refuses an export beyond the bounds.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from picosam_pipeline.config import require_inputs
from picosam_pipeline.deploy.onnx_export import (
    CONTRACT_FILE,
    EXPORT_FAKEQUANT_FILE,
    EXPORT_MCTQ_FILE,
    NETWORK,
    QUANTIZE_FAKEQUANT_FILE,
    QUANTIZE_MCTQ_FILE,
    QUANTIZE_PROBE_FILE,
    QUANTIZE_REPORT_FILE,
    OnnxCheck,
    compare_onnx,
    graph_io,
    output_grid,
    stamp_metadata,
)
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.provenance import Provenance
from picosam_pipeline.reports import write_report

EXPORT_FILES = (EXPORT_MCTQ_FILE, EXPORT_FAKEQUANT_FILE, CONTRACT_FILE)  # what export writes besides report.json


@dataclass(frozen=True)
class Export:
    """What :func:`export_network` wrote and found."""

    files: dict[str, Path]  # {"mctq", "fakequant"}: the two ONNX files written
    contract: dict[str, Any]  # picosam_int8.json, the checks included
    checks: dict[str, OnnxCheck]  # {"fakequant", "mctq"}: onnxruntime against the quantised torch model
    seconds: float  # the whole export's wall time

    def headline(self) -> dict[str, float]:
        """``metrics/export.json``: how well each ONNX file agrees with the quantised model it was exported from."""
        return {
            f"{name}_mask_agreement": self.contract["checks"][name]["mask_agreement"] for name in ("mctq", "fakequant")
        }

    def run_facts(self) -> dict[str, Any]:
        """This run's facts for the run log (the checks' timing is the run's, not the files')."""
        return {
            "seconds": round(self.seconds, 2),
            "onnx_seconds_per_sample": {k: c.seconds_per_sample for k, c in self.checks.items()},
        }

    def summary(self) -> dict[str, dict[str, float]]:
        """What the stage returns: per file the largest difference in output steps and the mask agreement."""
        return {
            name: {"max_diff_steps": round(c.max_diff_steps, 2), "mask_agreement": round(c.mask_agreement, 6)}
            for name, c in self.checks.items()
        }


def quantize_sources(quantized_dir: str | Path) -> dict[str, Path]:
    """The files of the quantize folder export reads, by name: the two ONNX files, ``probe.npz``, ``report.json``."""
    src = Path(quantized_dir)
    return {
        name: src / name
        for name in (QUANTIZE_MCTQ_FILE, QUANTIZE_FAKEQUANT_FILE, QUANTIZE_PROBE_FILE, QUANTIZE_REPORT_FILE)
    }


def export_network(quantized_dir: str | Path, work: Path, *, mctq_check_samples: int) -> Export:
    """Copy the quantize stage's two ONNX files into ``work`` under the network's name, stamp them with the contract,
    check them in onnxruntime on the probe crops (the MCTQ file on the first ``mctq_check_samples``) and write the
    contract and ``report.json``.

    Raises:
        ConfigError: a file of the quantize folder is missing.
        PipelineError: its report does not record the student's crop convention (an older quantize stage).
    """
    sources = quantize_sources(quantized_dir)
    require_inputs({f"export.quantized_dir ({name})": str(path) for name, path in sources.items()})
    start = time.perf_counter()
    made = json.loads(sources[QUANTIZE_REPORT_FILE].read_text())
    meta = made["student_meta"]
    if not isinstance(made.get("crop"), dict) or made["crop"].get("convention") not in ("roi", "point"):
        raise PipelineError(
            f"export.quantized_dir: {sources[QUANTIZE_REPORT_FILE]} does not record the student's crop "
            "convention (written by an older quantize stage); rerun quantize (`dvc repro quantize`)"
        )

    files = {"mctq": work / EXPORT_MCTQ_FILE, "fakequant": work / EXPORT_FAKEQUANT_FILE}
    shutil.copyfile(sources[QUANTIZE_MCTQ_FILE], files["mctq"])
    shutil.copyfile(sources[QUANTIZE_FAKEQUANT_FILE], files["fakequant"])
    contract = network_contract(files["mctq"], meta, made)
    for path in files.values():
        stamp_metadata(
            path,
            {
                "student": meta["student"],
                "input": contract["input"]["summary"],
                "input_normalization": "in_graph",
                "output": contract["output"]["summary"],
                "crop": json.dumps(contract["crop"], sort_keys=True),
                "provenance": json.dumps(contract["provenance"], sort_keys=True),
            },
        )

    with np.load(sources[QUANTIZE_PROBE_FILE]) as probe:
        rgb, reference, float_logits = probe["rgb"], probe["int8_logits"], probe["float_logits"]
    n = min(mctq_check_samples, len(rgb))
    checks = {
        "fakequant": compare_onnx(files["fakequant"], rgb, reference),
        "mctq": compare_onnx(files["mctq"], rgb[:n], reference[:n], batch=1),
    }
    contract["checks"] = contract_checks(checks, reference, float_logits, step=contract["output"]["quantization_step"])
    (work / CONTRACT_FILE).write_text(json.dumps(contract, indent=1) + "\n")
    write_report(
        work,
        {
            "checks": contract["checks"],
            "output_step": contract["output"]["quantization_step"],
            "bytes": {k: p.stat().st_size for k, p in files.items()},
        },
    )
    return Export(files, contract, checks, time.perf_counter() - start)


def contract_checks(
    checks: dict[str, OnnxCheck], reference: np.ndarray, float_logits: np.ndarray, *, step: float
) -> dict[str, dict[str, Any]]:
    """The contract's ``checks``: each onnxruntime check (its file's name, no timing) and, for scale, how far
    quantisation itself moved the logits on the same crops (``torch_int8_vs_float``: the torch INT8 logits
    ``reference`` against ``float_logits``, both float32 (N, 1, S, S), in output steps ``step``)."""
    # The check's timing is this run's, not the file's: it goes to the run log, so the contract and the metrics
    # stay byte-identical across reruns (and DVC's run cache can restore the stage).
    found = {
        k: {**{f: v for f, v in c.to_dict().items() if f != "seconds_per_sample"}, "file": Path(c.file).name}
        for k, c in checks.items()
    }
    noise = np.abs(reference - float_logits) / step
    found["torch_int8_vs_float"] = {
        "samples": len(reference),
        "max_diff_steps": float(noise.max()),
        "mean_diff_steps": float(noise.mean()),
        "mask_agreement": float(np.mean((reference > 0) == (float_logits > 0))),
    }
    return found


def check_agreement(export: Export, *, max_diff_steps: float, min_mask_agreement: float, out_dir: str) -> None:
    """Refuse an export whose ONNX file differs from the quantised torch model by more than ``max_diff_steps``
    output steps, or whose masks agree on fewer than ``min_mask_agreement`` of the pixels.

    Raises:
        PipelineError: naming the file, both figures and their bounds (``export.*``) and what to check.
    """
    for name, check in export.checks.items():
        if check.max_diff_steps > max_diff_steps or check.mask_agreement < min_mask_agreement:
            raise PipelineError(
                f"export: the {name} ONNX file {Path(out_dir) / export.files[name].name} disagrees with the quantised "
                f"torch model on the probe crops: largest logit difference {check.max_abs_diff:.4g} "
                f"({check.max_diff_steps:.1f} output steps, bound export.max_diff_steps={max_diff_steps}), masks "
                f"agree on {check.mask_agreement:.4%} of pixels (bound "
                f"export.min_mask_agreement={min_mask_agreement}). The exported graph does not compute what was "
                "quantised and scored; check the MCT / mct-quantizers / onnxruntime versions (requirements/base.txt); "
                f"{out_dir} was left as it was"
            )


def network_contract(mctq: Path, meta: dict[str, Any], made: dict[str, Any]) -> dict[str, Any]:
    """What the network takes and gives, from the MCTQ graph itself plus the student's normalisation and provenance
    (``meta``, the checkpoint's) and the quantize report (``made``: TPC version, method, crop convention).

    Input: float32 (batch, 3, S, S) RGB in [0, 1], NCHW, normalised inside the graph; output: float32
    (batch, 1, S, S) mask logits on the INT8 output grid (``quantization_step``, ``signed``, ``range``).
    """
    (inp,), (outp,) = graph_io(mctq)
    size = int(meta["input_size"])
    norm = meta.get("normalization") or {}
    grid = output_grid(mctq)
    return {
        "network": NETWORK,
        "student": meta["student"],
        "tpc_version": made["tpc_version"],
        "method": made["method"],
        "crop": made["crop"],  # the crop the student was trained on: the prompt kind and ROI the camera must use
        # where the student comes from; smoke_test: a random-weight teacher, the network is not for deployment
        "provenance": Provenance.from_dict(meta.get("provenance")).as_dict(),
        "files": {"mctq": EXPORT_MCTQ_FILE, "fakequant": EXPORT_FAKEQUANT_FILE},
        "input": {
            "name": inp.name,
            "shape": list(inp.shape),
            "dtype": inp.dtype,
            "layout": "NCHW",
            "channels": "RGB",
            "range": [0.0, 1.0],
            "summary": f"{inp.dtype} (batch, 3, {size}, {size}) RGB in [0, 1], NCHW",
            "normalization": {
                "where": "in_graph",
                "how": "node 'normalize': frozen depthwise 1x1 conv computing (x - mean) / std per channel, "
                "quantised by MCT",
                "mean": norm.get("mean"),
                "std": norm.get("std"),
            },
            "on_imx500": "the sensor's 8-bit RGB of the inference ROI, resized to the input size; pixel p enters as "
            "p / 256 (the converter's input tensor: 8 bits, unsigned, scale 1/256; see dnnParams.xml)",
        },
        "output": {
            "name": outp.name,
            "shape": list(outp.shape),
            "dtype": outp.dtype,
            "summary": f"{outp.dtype} (batch, 1, {size}, {size}) mask logits; mask = logit > 0",
            "meaning": "logits of the prompted object in the crop frame; mask = logit > 0 (sigmoid > 0.5)",
            "quantization_step": grid.step,
            "signed": grid.signed,
            "range": list(grid.range),
        },
    }
