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
  model's bytes on the chip; ``untrained_student: true`` when the export's ONNX metadata says the student is
  untrained (also said on stderr: such a network segments little better than random weights).

Every file of the folder is a function of the export and the params, so a rerun gives the same bytes (DVC's hash
stays). What belongs to one run on one machine stays out of it: the converter's log (timestamps, absolute paths)
goes to ``metrics/runs/package.converter.log``, its time and the Java version to the run log
(``metrics/runs/package.jsonl``).

The converter's input tensor must be 8-bit unsigned with scale 1/256, i.e. the camera's RGB read as [0, 1],
which is what the network was quantised for; anything else fails the stage (it would segment garbage). The work
is ``picosam_pipeline/deploy/deploy_folder.py``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config
from picosam_pipeline.deploy.deploy_folder import package_network
from picosam_pipeline.deploy.onnx_export import EXPORT_MCTQ_FILE, METADATA_PREFIX, read_onnx_metadata
from picosam_pipeline.device import Runtime
from picosam_pipeline.outputs import StageOutput
from picosam_pipeline.reports import RUN_LOG_DIR, write_metrics
from picosam_pipeline.untrained import metadata_training_warnings, untrained_flag, warn_untrained

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


def run(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    """Convert and write the deploy folder; returns memory use and the converter's time."""
    p = cfg.package
    log_path = Path(cfg.runtime.metrics_dir) / RUN_LOG_DIR / CONVERTER_LOG
    with output(cfg) as work:
        package = package_network(
            p.export_dir, work, input_persistency=p.input_persistency, timeout_s=p.timeout_s, log_path=log_path
        )
        untrained = _training_warnings(Path(p.export_dir) / EXPORT_MCTQ_FILE)
        write_metrics(cfg, "package", {**package.headline(), **untrained_flag(untrained)}, package.run_facts(log_path))
    warn_untrained("package", p.export_dir, untrained)
    return {**package.summary(), **untrained_flag(untrained)}


def _training_warnings(onnx_path: Path) -> list[str] | None:
    """The trainer's warnings that quantize wrote into the network's ONNX metadata for an untrained student, else
    None (also for a file that is not ONNX: the converter, which read it, is the one to say so)."""
    from google.protobuf.message import DecodeError

    try:
        return metadata_training_warnings(read_onnx_metadata(onnx_path), METADATA_PREFIX)
    except (OSError, DecodeError):
        return None
