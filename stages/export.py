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
  headline (each ONNX file's mask agreement with the quantised torch model on the probe crops).

Both files carry the contract in their ONNX ``metadata_props`` too (``picosam.*`` keys, beside MCT's). Each is run
in onnxruntime on the probe crops (the MCTQ file, ~300x slower, on ``mctq_check_samples`` of them) and
compared with the quantised torch model; the stage fails when the largest difference exceeds
``max_diff_steps`` output quantisation steps or masks agree on fewer than ``min_mask_agreement`` of the pixels.
For scale the contract also gives how far quantisation itself moved the logits (torch INT8 against float).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from picosam_pipeline.config import Config, require_inputs
from picosam_pipeline.deploy.onnx_export import (
    CONTRACT_FILE,
    NETWORK,
    QUANTIZE_FAKEQUANT_FILE,
    QUANTIZE_MCTQ_FILE,
    QUANTIZE_PROBE_FILE,
    QUANTIZE_REPORT_FILE,
)
from picosam_pipeline.deploy.onnx_export import EXPORT_FAKEQUANT_FILE as FAKEQUANT_FILE
from picosam_pipeline.deploy.onnx_export import EXPORT_MCTQ_FILE as MCTQ_FILE
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.outputs import StageOutput, output_folder, save_resolved, writes_output
from picosam_pipeline.reports import write_metrics, write_report

NAMES = (MCTQ_FILE, FAKEQUANT_FILE, CONTRACT_FILE)  # what the stage writes into export.out_dir, besides its marker


def output(cfg: Config) -> StageOutput:
    """``export.out_dir``: replaced whole, only when it holds an earlier export (outputs.py)."""
    e = cfg.export
    return StageOutput(
        cfg,
        "export",
        "export.out_dir",
        e.out_dir,
        sections=["export"],
        names=NAMES,
        what="ONNX files",
        inputs={"export.quantized_dir": e.quantized_dir},
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


@writes_output(output)
def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Copy, stamp and check the two ONNX files; returns the largest differences found."""
    from picosam_pipeline.deploy.onnx_export import compare_onnx, stamp_metadata

    e = cfg.export
    src = Path(e.quantized_dir)
    sources = {
        name: src / name
        for name in (QUANTIZE_MCTQ_FILE, QUANTIZE_FAKEQUANT_FILE, QUANTIZE_PROBE_FILE, QUANTIZE_REPORT_FILE)
    }
    require_inputs({f"export.quantized_dir ({name})": str(path) for name, path in sources.items()})
    start = time.perf_counter()
    made = json.loads(sources[QUANTIZE_REPORT_FILE].read_text())
    meta = made["student_meta"]
    if not isinstance(made.get("crop"), dict) or made["crop"].get("convention") not in ("roi", "point"):
        raise PipelineError(
            f"export.quantized_dir: {sources[QUANTIZE_REPORT_FILE]} does not record the student's crop "
            "convention (written by an older quantize stage); rerun quantize (`dvc repro quantize`)"
        )

    out = output_folder(e.out_dir)  # <out_dir>.partial, renamed to out_dir when this returns
    files = {"mctq": out / MCTQ_FILE, "fakequant": out / FAKEQUANT_FILE}
    shutil.copyfile(sources[QUANTIZE_MCTQ_FILE], files["mctq"])
    shutil.copyfile(sources[QUANTIZE_FAKEQUANT_FILE], files["fakequant"])
    contract = _contract(files["mctq"], meta, made)
    for path in files.values():
        stamp_metadata(
            path,
            {
                "student": meta["student"],
                "input": contract["input"]["summary"],
                "input_normalization": "in_graph",
                "output": contract["output"]["summary"],
                "crop": json.dumps(contract["crop"], sort_keys=True),
            },
        )

    with np.load(sources[QUANTIZE_PROBE_FILE]) as probe:
        rgb, reference, float_logits = probe["rgb"], probe["int8_logits"], probe["float_logits"]
    n = min(e.mctq_check_samples, len(rgb))
    checks = {
        "fakequant": compare_onnx(files["fakequant"], rgb, reference),
        "mctq": compare_onnx(files["mctq"], rgb[:n], reference[:n], batch=1),
    }
    # The check's timing is this run's, not the file's: it goes to the run log, so the contract and the metrics
    # stay byte-identical across reruns (and DVC's run cache can restore the stage).
    contract["checks"] = {
        k: {**{f: v for f, v in c.to_dict().items() if f != "seconds_per_sample"}, "file": Path(c.file).name}
        for k, c in checks.items()
    }
    # For scale: how far quantisation itself moved the logits on the same crops (torch INT8 against float).
    noise = np.abs(reference - float_logits) / contract["output"]["quantization_step"]
    contract["checks"]["torch_int8_vs_float"] = {
        "samples": len(rgb),
        "max_diff_steps": float(noise.max()),
        "mean_diff_steps": float(noise.mean()),
        "mask_agreement": float(np.mean((reference > 0) == (float_logits > 0))),
    }
    (out / CONTRACT_FILE).write_text(json.dumps(contract, indent=1) + "\n")
    save_resolved(cfg, out, ["export"])

    metrics = {
        "checks": contract["checks"],
        "output_step": contract["output"]["quantization_step"],
        "bytes": {k: p.stat().st_size for k, p in files.items()},
    }
    write_report(out, metrics)
    # Headline: how well each ONNX file agrees with the quantised model it was exported from.
    headline = {f"{name}_mask_agreement": contract["checks"][name]["mask_agreement"] for name in ("mctq", "fakequant")}
    write_metrics(
        cfg,
        "export",
        headline,
        {
            "seconds": round(time.perf_counter() - start, 2),
            "onnx_seconds_per_sample": {k: c.seconds_per_sample for k, c in checks.items()},
        },
    )
    for name, check in checks.items():
        if check.max_diff_steps > e.max_diff_steps or check.mask_agreement < e.min_mask_agreement:
            raise PipelineError(
                f"export: the {name} ONNX file {Path(e.out_dir) / files[name].name} disagrees with the quantised torch "
                f"model on the probe crops: largest logit difference {check.max_abs_diff:.4g} "
                f"({check.max_diff_steps:.1f} output steps, bound export.max_diff_steps={e.max_diff_steps}), masks "
                f"agree on {check.mask_agreement:.4%} of pixels (bound "
                f"export.min_mask_agreement={e.min_mask_agreement}). The exported graph does not compute what was "
                "quantised and scored; check the MCT / mct-quantizers / onnxruntime versions (requirements/base.txt); "
                f"{e.out_dir} was left as it was"
            )
    return {
        name: {"max_diff_steps": round(c.max_diff_steps, 2), "mask_agreement": round(c.mask_agreement, 6)}
        for name, c in checks.items()
    }


def _contract(mctq: Path, meta: dict[str, Any], made: dict[str, Any]) -> dict[str, Any]:
    """What the network takes and gives, from the graph itself plus the student's normalisation."""
    from picosam_pipeline.deploy.onnx_export import graph_io, output_grid

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
        "files": {"mctq": MCTQ_FILE, "fakequant": FAKEQUANT_FILE},
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
