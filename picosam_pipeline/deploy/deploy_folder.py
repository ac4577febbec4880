"""The package stage's work: ``imxconv-pt`` on the exported MCTQ file, then the Raspberry Pi deploy folder.

:func:`package_network` checks Java 17 first (the converter's back end is Java), reads the export folder's MCTQ
file and contract, runs ``imx500.convert`` into the package folder (pre-flight, converter, memory report, error
codes), checks the network's input tensor and writes ``deploy/``::

    deploy/packerOut.zip             the converter's package (its dates fixed)
    deploy/picosam_int8.json         the export's contract: the demo reads the crop convention from it
    deploy/picosam_imx500_demo.py    the picamera2 demo (template/), unchanged
    deploy/deploy.py, crops.py       raspberry_pi.py and data/crops.py, copied byte for byte (the demo's imports)
    deploy/README.md                 template/README.md filled in: the prompt, the contract, the memory figures,
                                     headed by the student's provenance (a "SMOKE TEST: not for deployment"
                                     banner when its teacher had random weights)

and ``report.json`` (the memory report, the converter's tensors and version). Every file is a function of the
export and the params: the converter's log (timestamps, absolute paths) goes to ``log_path``, outside the folder.

The converter's input tensor must be 8-bit unsigned with scale 1/256, i.e. the camera's RGB read as [0, 1], which
is what the network was quantised for; anything else is refused (it would segment garbage).
"""

from __future__ import annotations

import json
import shutil
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picosam_pipeline.config import require_inputs
from picosam_pipeline.data import crops
from picosam_pipeline.deploy import imx500, raspberry_pi
from picosam_pipeline.deploy.onnx_export import CONTRACT_FILE, EXPORT_MCTQ_FILE
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.provenance import SMOKE_TEST, Provenance
from picosam_pipeline.reports import write_report

TEMPLATES = "template"  # inside picosam_pipeline/deploy
DEMO = "picosam_imx500_demo.py"
CAMERA_INPUT_SCALE = 1 / 256  # 8-bit pixel p read as p / 256: RGB in [0, 1]


@dataclass(frozen=True)
class Package:
    """What :func:`package_network` converted and wrote."""

    conversion: imx500.Conversion  # packerOut.zip, the memory report, the converter's time, Java
    crop: dict[str, Any]  # the crop convention the student was trained on (the export contract's)
    seconds: float  # the whole packaging's wall time

    def headline(self) -> dict[str, Any]:
        """``metrics/package.json``: fits, chip memory utilisation and the INT8 model's bytes on the chip."""
        report = self.conversion.report
        return {"fits": report.fits, "utilization": report.utilization, "model_bytes": report.model_bytes}

    def run_facts(self, log_path: Path) -> dict[str, Any]:
        """This run's own facts (time, this machine's Java, where the log went): the run log, not the output."""
        return {
            "converter_seconds": round(self.conversion.seconds, 2),
            "java": self.conversion.java.version,
            "converter_log": str(log_path),
            "seconds": round(self.seconds, 2),
        }

    def summary(self) -> dict[str, Any]:
        """What the stage returns: the crop convention, whether it fits, memory use and the converter's time."""
        report = self.conversion.report
        return {
            "crop": self.crop["convention"],
            "fits": report.fits,
            "used_bytes": report.used_bytes,
            "available_bytes": report.available_bytes,
            "utilization": round(report.utilization, 3),
            "converter_seconds": round(self.conversion.seconds, 1),
        }


def package_network(
    export_dir: str | Path, work: Path, *, input_persistency: bool, timeout_s: float, log_path: Path
) -> Package:
    """Convert ``export_dir``'s MCTQ file into ``work`` and write the deploy folder and ``report.json`` there.

    Raises:
        ConverterError: no Java 17 (before anything else), or the converter failed (see ``imx500.convert``).
        ConfigError: the MCTQ file or its contract is missing.
        PipelineError: a contract without the crop convention, or a network that does not read camera RGB.
    """
    import imx500_converter  # the converter: the optional extra imx500, imported only when packaging

    imx500.check_java()  # before anything else: without Java 17 the converter fails late and obscurely
    onnx_path, contract_path = Path(export_dir) / EXPORT_MCTQ_FILE, Path(export_dir) / CONTRACT_FILE
    require_inputs(
        {
            f"package.export_dir ({EXPORT_MCTQ_FILE})": str(onnx_path),
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

    # work is a fresh <out_dir>.partial (--overwrite-output would keep stale files), renamed at the end
    conversion = imx500.convert(
        onnx_path, work, input_persistency=input_persistency, timeout_s=timeout_s, log_path=log_path
    )
    tensors = imx500.read_dnn_params(work / "dnnParams.xml")
    camera_input = tensors["inputs"][0]
    check_camera_input(camera_input, work / "dnnParams.xml")
    readme = deploy_readme(
        contract,
        conversion.report,
        onnx=project_path(onnx_path),
        converter_version=imx500_converter.__version__,
        camera_input=camera_input,
    )
    write_deploy_folder(work / "deploy", conversion.packer_zip, contract_path, readme)
    if Provenance.from_dict(contract.get("provenance")).smoke_test:
        print(f"warning: {SMOKE_TEST}: the student's teacher had random weights (deploy/README.md)", file=sys.stderr)
    report = conversion.report
    write_report(
        work,
        {
            "network": report.network,
            "crop": crop,
            "memory": report.to_dict(),
            "fits": report.fits,
            "utilization": report.utilization,
            "tensors": tensors,
            "packer_zip_bytes": conversion.packer_zip.stat().st_size,
            "converter": {"version": imx500_converter.__version__},
        },
    )
    return Package(conversion, crop, time.perf_counter() - start)


def check_camera_input(camera_input: dict[str, Any], dnn_params: Path) -> None:
    """Refuse a network whose input tensor (``imx500.read_dnn_params``'s first input: ``bits``, ``format``,
    ``scale``) is not the camera's 8-bit RGB read as p / 256 (unsigned, scale :data:`CAMERA_INPUT_SCALE`)."""
    if camera_input["format"] != "unsigned" or abs(camera_input["scale"] - CAMERA_INPUT_SCALE) > 1e-12:
        raise PipelineError(
            f"{dnn_params}: the network's input tensor is {camera_input['bits']}-bit "
            f"{camera_input['format']} with scale {camera_input['scale']}, but the camera feeds 8-bit RGB that the "
            f"network must read as p / 256 (unsigned, scale {CAMERA_INPUT_SCALE}); MCT chose another input range from "
            "the representative crops. Quantise with representative crops that span the full 0..1 range (more "
            "quantize.representative_batches)"
        )


def write_deploy_folder(deploy_dir: Path, packer_zip: Path, contract_path: Path, readme: str) -> None:
    """``deploy_dir``: packerOut.zip, the contract, the demo, ``deploy.py`` (raspberry_pi.py) and ``crops.py``
    copied byte for byte, and the ``readme`` text."""
    templates = Path(raspberry_pi.__file__).parent / TEMPLATES
    deploy_dir.mkdir()
    shutil.copyfile(packer_zip, deploy_dir / "packerOut.zip")
    shutil.copyfile(contract_path, deploy_dir / CONTRACT_FILE)
    shutil.copyfile(templates / DEMO, deploy_dir / DEMO)
    shutil.copyfile(raspberry_pi.__file__, deploy_dir / "deploy.py")  # the name the demo imports
    shutil.copyfile(crops.__file__, deploy_dir / "crops.py")
    (deploy_dir / "README.md").write_text(readme)


def deploy_readme(
    contract: dict[str, Any],
    report: imx500.MemoryReport,
    *,
    onnx: str,
    converter_version: str,
    camera_input: dict[str, Any],
) -> str:
    """The deploy folder's README: ``template/README.md`` with the export ``contract`` (its crop convention, input
    and output), the converted network's input tensor and memory ``report``, the ONNX file's project path and the
    converter's version filled in, headed by the contract's provenance (:func:`with_banner`)."""
    template = Path(raspberry_pi.__file__).parent / TEMPLATES / "README.md"
    text = string.Template(template.read_text()).substitute(
        **convention_text(contract["crop"]),
        student=contract["student"],
        onnx=onnx,
        converter_version=converter_version,
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
    return with_banner(text, Provenance.from_dict(contract.get("provenance")))


def with_banner(readme: str, provenance: Provenance) -> str:
    """``readme`` with the provenance's banner (:meth:`Provenance.banner`) as a quote under its title line."""
    title, _, rest = readme.partition("\n")
    return f"{title}\n\n> {provenance.banner()}\n{rest}"


def convention_text(crop: dict[str, Any]) -> dict[str, str]:
    """The deploy README's words for the recorded crop convention (``crops.crop_convention``)."""
    prompt, paper = crops.CONVENTIONS[crop["convention"]]
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
