"""Stage ``package``: ``imxconv-pt`` on the MCTQ export -> ``packerOut.zip`` + a Raspberry Pi deploy folder.

Checks Java 17 first (the converter's back end is Java), then reads the export stage's folder
(``package.export_dir``: ``picosam_int8.onnx`` and its contract ``picosam_int8.json``) and runs
``imx500.convert``: operator pre-flight, the converter, its memory report and error codes. A network that
does not fit on the chip fails with the required and available bytes. Writes, in ``package.out_dir``:

* ``packerOut.zip`` (its dates fixed, the one in its manifest too: ``imx500.normalize_packer_zip``),
  ``dnnParams.xml``, ``picosam_int8.pbtxt``, ``picosam_int8_MemoryReport.json`` (the converter's outputs);
* ``deploy/``: ``packerOut.zip``, the picamera2 demo, ``deploy.py`` + ``crops.py`` (its numpy helpers), the
  contract JSON and a README with the ``imx500-package`` step and the memory figures;
* ``report.json``: the memory report, the converter's input and output tensors and its version;
* ``config.resolved.json``; and ``metrics/package.json``: the headline, fits, chip memory utilisation and the INT8
  model's bytes on the chip.

Every file of the folder is a function of the export and the params, so a rerun gives the same bytes (DVC's hash
stays). What belongs to one run on one machine stays out of it: the converter's log (timestamps, absolute paths)
goes to ``metrics/runs/package.converter.log``, its time and the Java version to the run log
(``metrics/runs/package.jsonl``).

The converter's input tensor must be 8-bit unsigned with scale 1/256, i.e. the camera's RGB read as [0, 1],
which is what the network was quantised for; anything else fails the stage (it would segment garbage).
"""

from __future__ import annotations

import json
import shutil
import string
import time
from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config, require_inputs
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.outputs import StageOutput, output_folder, save_resolved, writes_output
from picosam_pipeline.reports import RUN_LOG_DIR, write_metrics, write_report

TEMPLATES = "template"  # inside picosam_pipeline/deploy
DEMO = "picosam_imx500_demo.py"
CAMERA_INPUT_SCALE = 1 / 256  # 8-bit pixel p read as p / 256: RGB in [0, 1]
CONVERTER_LOG = "package.converter.log"  # in <runtime.metrics_dir>/runs: per machine, git-ignored, not hashed by DVC


def output(cfg: Config) -> StageOutput:
    """``package.out_dir``: replaced whole, only when it holds an earlier package (outputs.py). The converter decides
    the names of its files, so everything in a folder carrying this stage's marker counts as its own."""
    p = cfg.package
    return StageOutput(
        cfg,
        "package",
        "package.out_dir",
        p.out_dir,
        sections=["package"],
        names=("*",),
        what="converter output and deploy folder",
        inputs={"package.export_dir": p.export_dir},
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
        keep_failed=True,
    )


@writes_output(output)
def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Convert and write the deploy folder; returns memory use and the converter's time."""
    import imx500_converter

    from picosam_pipeline.data import crops
    from picosam_pipeline.deploy import raspberry_pi
    from picosam_pipeline.deploy.imx500 import check_java, convert, read_dnn_params
    from picosam_pipeline.deploy.onnx_export import CONTRACT_FILE
    from picosam_pipeline.deploy.onnx_export import EXPORT_MCTQ_FILE as MCTQ_FILE

    check_java()  # before anything else: without Java 17 the converter fails late and obscurely
    p = cfg.package
    onnx_path, contract_path = Path(p.export_dir) / MCTQ_FILE, Path(p.export_dir) / CONTRACT_FILE
    require_inputs(
        {
            f"package.export_dir ({MCTQ_FILE})": str(onnx_path),
            f"package.export_dir ({CONTRACT_FILE})": str(contract_path),
        }
    )
    start = time.perf_counter()
    contract = json.loads(contract_path.read_text())
    crop = contract.get("crop")
    if not isinstance(crop, dict) or crop.get("convention") not in crops.CONVENTIONS:
        raise PipelineError(
            f"package.export_dir: {contract_path} does not record the crop convention the student was "
            "trained on (written by an older export stage), so the demo cannot choose its ROI; rerun "
            "quantize and export (`dvc repro export`)"
        )

    out = output_folder(
        p.out_dir
    )  # a fresh <out_dir>.partial (--overwrite-output would keep stale files), renamed at the end
    log_path = Path(cfg.runtime.metrics_dir) / RUN_LOG_DIR / CONVERTER_LOG
    conversion = convert(
        onnx_path, out, input_persistency=p.input_persistency, timeout_s=p.timeout_s, log_path=log_path
    )
    tensors = read_dnn_params(out / "dnnParams.xml")
    camera_input = tensors["inputs"][0]
    if camera_input["format"] != "unsigned" or abs(camera_input["scale"] - CAMERA_INPUT_SCALE) > 1e-12:
        raise PipelineError(
            f"{out / 'dnnParams.xml'}: the network's input tensor is {camera_input['bits']}-bit "
            f"{camera_input['format']} with scale {camera_input['scale']}, but the camera feeds 8-bit RGB that the "
            f"network must read as p / 256 (unsigned, scale {CAMERA_INPUT_SCALE}); MCT chose another input range from "
            "the representative crops. Quantise with representative crops that span the full 0..1 range (more "
            "quantize.representative_batches)"
        )

    report = conversion.report
    templates = Path(raspberry_pi.__file__).parent / TEMPLATES
    deploy_dir = out / "deploy"
    deploy_dir.mkdir()
    shutil.copyfile(conversion.packer_zip, deploy_dir / "packerOut.zip")
    shutil.copyfile(contract_path, deploy_dir / CONTRACT_FILE)
    shutil.copyfile(templates / DEMO, deploy_dir / DEMO)
    shutil.copyfile(raspberry_pi.__file__, deploy_dir / "deploy.py")  # the name the demo imports
    shutil.copyfile(crops.__file__, deploy_dir / "crops.py")
    onnx_name = project_path(onnx_path)
    (deploy_dir / "README.md").write_text(
        string.Template((templates / "README.md").read_text()).substitute(
            **convention_text(crop),
            student=contract["student"],
            onnx=onnx_name,
            converter_version=imx500_converter.__version__,
            tpc_version=contract["tpc_version"],
            method=contract["method"],
            input_size=contract["input"]["shape"][-1],
            input_summary=contract["input"]["summary"],
            input_bits=camera_input["bits"],
            input_format=camera_input["format"],
            input_scale=camera_input["scale"],
            mean=contract["input"]["normalization"]["mean"],
            std=contract["input"]["normalization"]["std"],
            output_summary=contract["output"]["summary"],
            output_step=contract["output"]["quantization_step"],
            used_bytes=f"{report.used_bytes:,}",
            available_bytes=f"{report.available_bytes:,}",
            utilization=f"{report.utilization:.0%}",
            model_bytes=f"{report.model_bytes:,}",
            runtime_bytes=f"{report.runtime_bytes:,}",
            input_persistency="on" if report.input_persistent else "off",
        )
    )
    save_resolved(cfg, out, ["package"])

    metrics = {
        "network": report.network,
        "crop": crop,
        "memory": report.to_dict(),
        "fits": report.fits,
        "utilization": report.utilization,
        "tensors": tensors,
        "packer_zip_bytes": conversion.packer_zip.stat().st_size,
        "converter": {"version": imx500_converter.__version__},
    }
    write_report(out, metrics)
    headline = {"fits": report.fits, "utilization": report.utilization, "model_bytes": report.model_bytes}
    # the run's own facts (time, this machine's Java, where the log went): the run log, not the hashed output
    write_metrics(
        cfg,
        "package",
        headline,
        {
            "converter_seconds": round(conversion.seconds, 2),
            "java": conversion.java.version,
            "converter_log": str(log_path),
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
    return {
        "crop": crop["convention"],
        "fits": report.fits,
        "used_bytes": report.used_bytes,
        "available_bytes": report.available_bytes,
        "utilization": round(report.utilization, 3),
        "converter_seconds": round(conversion.seconds, 1),
    }


def convention_text(crop: dict[str, Any]) -> dict[str, str]:
    """The deploy README's words for the recorded crop convention (``crops.crop_convention``)."""
    from picosam_pipeline.data.crops import CONVENTIONS

    prompt, paper = CONVENTIONS[crop["convention"]]
    if prompt == "box":
        text = (
            f"the box becomes the IMX500's inference ROI grown by {crop['roi_padding']:g} of its width/height per "
            "side and squared, in sensor pixels (PicoSAM3's ROI)."
        )
        example = "--box 480,300,320,240     # x,y,w,h of the object in preview pixels"
    else:
        text = (
            f"the point becomes the IMX500's inference ROI, the {crop['window']}-sensor-pixel window around it "
            "(left/top clamped to the sensor, right/bottom clipped: PicoSAM2's native-resolution window)."
        )
        example = "--point 640,480           # x,y of a point on the object in preview pixels"
    return {
        "prompt": prompt,
        "paper": paper,
        "convention": crop["convention"],
        "convention_text": text,
        "example": example,
    }


def project_path(path: Path) -> str:
    """``path`` relative to the working directory (the project) when it lies inside it, else as given."""
    # the deploy README is part of the hashed output: it must not name the folder a clone happens to live in
    absolute, project = path.resolve(), Path.cwd().resolve()
    return str(absolute.relative_to(project)) if absolute.is_relative_to(project) else str(path)
