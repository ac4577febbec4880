"""The IMX500 converter step: Java check, operator pre-flight, ``imxconv-pt``, memory report, error codes.

::

    result = convert("student_int8_mctq.onnx", "data/package/converter")   # raises ConverterError on failure
    result.report.used_bytes, result.report.available_bytes, result.report.fits, result.packer_zip

:func:`convert` does, in order, and stops at the first problem with one message naming it and the fix:

1. :func:`check_java`: the converter's back end is Java; without Java 17 it dies late with a shell error.
2. :func:`preflight` (a second, no converter run): every node's operator must be one the installed converter
   maps (its own table, ``uni.pytorch.onnx_parser.onnx_op_to_factory``), and the graph must carry MCT's
   quantisers; the offending node names are listed.
3. :func:`run_converter`: ``imxconv-pt -i MODEL -o OUT --overwrite-output --report-size-unit B`` (15-70 s on two
   cores, minutes when they are busy); its log is kept as ``OUT/converter.log`` or where ``log_path`` says.
4. :func:`read_memory_report` (``<name>_MemoryReport.json``, written even when the network does not fit) and
   :func:`converter_issues`, which turns the converter's ``CODE: [XXX]`` error lines into one
   :class:`ConverterIssue` each (``[USOP]`` unsupported ops, ``[ISM]`` not enough memory, ...).

A network that does not fit (``Fit In Chip: false``, or ``[ISM]``) fails with the required and available bytes.
On success ``packerOut.zip`` is rewritten without the converter's timestamps (:func:`normalize_packer_zip`), so
two runs on the same model give the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import onnx

from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.onnx_runtime import MCTQ_DOMAIN

JAVA_MAJOR = 17
JAVA_HINT = (
    "install a Java 17 runtime and put its `java` on PATH, e.g. "
    "`sudo apt install openjdk-17-jre-headless` (Debian/Ubuntu), "
    "`sudo dnf install java-17-openjdk-headless` (Fedora) or `brew install openjdk@17` (macOS)"
)
CONVERTER = "imxconv-pt"
LOG_FILE = "converter.log"


class ConverterError(PipelineError):
    """The model cannot be converted for the IMX500 (the message says why and what to change)."""


# --------------------------------------------------------------------------------------------------
# 1. Java


@dataclass(frozen=True)
class JavaInfo:
    path: str
    version: str  # as `java -version` prints it, e.g. "17.0.15"
    major: int


def check_java(search_path: str | None = None) -> JavaInfo:
    """Find ``java`` (on ``search_path``, default ``$PATH``) and check it is Java 17 or newer.

    Raises:
        ConverterError: no ``java``, an unreadable version, or one older than 17, with how to install Java 17.
    """
    java = shutil.which("java", path=search_path)
    if java is None:
        raise ConverterError(
            f"{CONVERTER} (the IMX500 converter) needs Java {JAVA_MAJOR}, and no `java` is on PATH; {JAVA_HINT}"
        )
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConverterError(
            f"{java} -version failed ({err}); {CONVERTER} needs a working Java {JAVA_MAJOR}: {JAVA_HINT}"
        ) from None
    printed = out.stderr + out.stdout  # java prints its version on stderr
    match = re.search(r'version "((\d+)(?:\.(\d+))?[^"]*)"', printed)
    if match is None:
        raise ConverterError(
            f"cannot read the Java version from `{java} -version` (it printed {printed.strip()[:200]!r}); "
            f"{CONVERTER} needs Java {JAVA_MAJOR}: {JAVA_HINT}"
        )
    version = match.group(1)
    major = int(match.group(3) or 0) if match.group(2) == "1" else int(match.group(2))  # "1.8.0_392" is Java 8
    if major < JAVA_MAJOR:
        raise ConverterError(f"{CONVERTER} needs Java {JAVA_MAJOR}, but {java} is Java {version}; {JAVA_HINT}")
    return JavaInfo(java, version, major)


# --------------------------------------------------------------------------------------------------
# 2. pre-flight


def supported_ops() -> frozenset[str]:
    """ONNX operator types the installed converter maps (standard ops plus MCT's quantiser ops)."""
    try:
        from uni.pytorch.onnx_parser.onnx_op_to_factory import onnx_op_factory
    except ImportError as err:
        raise ConverterError(
            f"the IMX500 converter's PyTorch front end is not installed ({err}); install "
            "`imx500-converter[pt]==3.19.2` (requirements/base.txt)"
        ) from None
    return frozenset(k.value if isinstance(k, Enum) else str(k) for k in onnx_op_factory)


def preflight(path: str | Path) -> dict[str, Any]:
    """Check an ONNX file before the converter runs; returns ``{"nodes": N, "ops": {op_type: count}}``.

    Raises:
        ConverterError: operators outside the converter's set (each with its node names), or a graph without
            MCT quantisers (a float or fake-quant export, which the converter rejects after a long run).
    """
    path = Path(path)
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # onnx raises DecodeError / OSError variants
        raise ConverterError(
            f"{path} is not a readable ONNX file ({type(err).__name__}: {err}); pass the MCTQ export "
            "of the export stage"
        ) from None
    supported = supported_ops()
    unsupported: dict[str, list[str]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type not in supported:
            unsupported.setdefault(node.op_type, []).append(node.name or f"#{i} (unnamed)")
    if unsupported:
        listing = "; ".join(
            f"{op} at {', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"
            for op, names in sorted(unsupported.items())
        )
        hint = (
            "QuantizeLinear/DequantizeLinear come from a fake-quant export: pass the MCTQ export instead"
            if {"QuantizeLinear", "DequantizeLinear"} & set(unsupported)
            else "replace these layers in the model with IMX500 operators (conv, depthwise conv, ReLU, add, mul, "
            "nearest resize, sigmoid, ...) and quantise and export it again"
        )
        count = sum(map(len, unsupported.values()))
        raise ConverterError(
            f"{path}: {count} node(s) use operators the IMX500 converter does not support: {listing}. {hint}"
        )
    if not any(node.domain == MCTQ_DOMAIN for node in graph.node):
        raise ConverterError(
            f"{path} holds no MCT quantisers (no {MCTQ_DOMAIN} nodes): it is a float model, and the "
            "IMX500 converter needs the INT8 model exported by MCT in MCTQ format (the quantize and "
            "export stages)"
        )
    return {"nodes": len(graph.node), "ops": dict(sorted(Counter(n.op_type for n in graph.node).items()))}


# --------------------------------------------------------------------------------------------------
# 3. the converter run


def converter_executable() -> str:
    """``imxconv-pt`` of this Python environment (beside ``sys.executable``), else the one on PATH."""
    local = Path(sys.executable).parent / CONVERTER
    if local.is_file():
        return str(local)
    found = shutil.which(CONVERTER)
    if found is None:
        raise ConverterError(
            f"{CONVERTER} is not installed; install `imx500-converter[pt]==3.19.2` (requirements/base.txt)"
        )
    return found


@dataclass
class ConverterRun:
    returncode: int
    seconds: float
    log: str  # stdout + stderr of the converter
    out_dir: Path
    log_path: Path | None = None  # where the log was written


def run_converter(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    input_persistency: bool = True,
    timeout_s: float = 1800,
    log_path: str | Path | None = None,
) -> ConverterRun:
    """Run ``imxconv-pt`` on ``onnx_path`` into ``out_dir`` (overwritten); its log goes to ``log_path`` (default
    ``out_dir/converter.log``).

    ``input_persistency=False`` adds ``--no-input-persistency``: more memory for the network, but no input-tensor
    stream for debugging on the camera.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path is not None else out_dir / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        converter_executable(),
        "-i",
        str(onnx_path),
        "-o",
        str(out_dir),
        "--overwrite-output",
        "--report-size-unit",
        "B",
    ]
    if not input_persistency:
        cmd.append("--no-input-persistency")
    start = time.perf_counter()
    log = _run_with_progress(cmd, timeout_s)
    log_path.write_text("".join(log.lines))
    if log.returncode is None:
        raise ConverterError(
            f"{CONVERTER} did not finish within {timeout_s:.0f} s on {onnx_path}; raise package.timeout_s "
            f"or run it by hand: {' '.join(cmd)}"
        )
    return ConverterRun(log.returncode, time.perf_counter() - start, "".join(log.lines), out_dir, log_path)


@dataclass
class _Output:
    returncode: int | None  # None: killed at the timeout
    lines: list[str]


def _run_with_progress(cmd: list[str], timeout_s: float) -> _Output:
    """Run ``cmd``, collecting its output, with a progress line on stderr: elapsed time, log lines, the last line.

    The converter takes ~40 s and prints little while it works; the line is redrawn twice a second so the elapsed
    time moves (in a terminal; tqdm stays silent when stderr is not one, e.g. under `dvc repro` into a log).
    """
    import threading

    from tqdm import tqdm

    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    bar = tqdm(
        desc=CONVERTER, bar_format="{desc}: {elapsed} elapsed, {n} log lines {postfix}", disable=None, file=sys.stderr
    )
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        bar.n = len(lines)
        if lines:
            bar.set_postfix_str(lines[-1].strip()[:70], refresh=False)
        bar.refresh()
    timed_out = proc.poll() is None
    if timed_out:
        proc.kill()
        proc.wait()
    reader.join(timeout=10)
    bar.n = len(lines)
    bar.close()
    return _Output(None if timed_out else proc.returncode, lines)


# --------------------------------------------------------------------------------------------------
# 4. memory report and error codes


@dataclass(frozen=True)
class MemoryReport:
    """The converter's ``<name>_MemoryReport.json``, sizes in bytes."""

    network: str
    used_bytes: int  # "Memory Usage" = runtime + model + reserved
    available_bytes: int  # "Total Memory Available On Chip"
    runtime_bytes: int  # activations ("Runtime Memory Physical Size")
    model_bytes: int  # weights and network parameters ("Model Memory Physical Size")
    utilization: float  # used / available
    fits: bool  # "Fit In Chip"
    input_persistent: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_size(text: str) -> int:
    """``"3844000B"`` / ``"1.00KB"`` / ``"3.55MB"`` -> bytes (the converter's units are binary: 1 KB = 1024 B)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?B)\s*", text)
    if match is None:
        raise ValueError(f"not a converter memory size: {text!r}")
    return round(float(match.group(1)) * _UNITS[match.group(2)])


def find_memory_report(out_dir: str | Path) -> Path | None:
    """The ``*_MemoryReport.json`` in a converter output folder, if the converter got that far."""
    reports = sorted(Path(out_dir).glob("*_MemoryReport.json"))
    return reports[0] if reports else None


def read_memory_report(path: str | Path) -> MemoryReport:
    """Parse a converter memory report (any ``--report-size-unit``)."""
    raw = json.loads(Path(path).read_text())["Memory Report"]
    used, available = parse_size(raw["Memory Usage"]), parse_size(raw["Total Memory Available On Chip"])
    return MemoryReport(
        network=raw["Name"],
        used_bytes=used,
        available_bytes=available,
        runtime_bytes=parse_size(raw["Runtime Memory Physical Size"]),
        model_bytes=parse_size(raw["Model Memory Physical Size"]),
        utilization=used / available,
        fits=bool(raw["Fit In Chip"]),
        input_persistent=bool(raw.get("Input Persistent", True)),
    )


def read_dnn_params(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Input and output tensors of the converter's ``dnnParams.xml``: name, dims, bits, scale, signedness.

    The input entry says how the camera's pixels reach the network: ``format="unsigned"`` with ``scale`` 1/256
    means pixel value ``p`` (0..255) is read as ``p / 256``, i.e. the network takes RGB in [0, 1].
    """
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()

    def tensor(node: ET.Element) -> dict[str, Any]:
        dims = sorted(node.iter("dimension"), key=lambda d: int(d.get("ordinal")))
        # serialization: per dimension (ordinal order), its rank in the chip's byte stream, 0 = fastest
        return {
            "name": node.get("name"),
            "dims": [int(d.get("size")) for d in dims],
            "serialization": [int(d.get("serializationOrder", i)) for i, d in enumerate(dims)],
            "bits": int(node.get("bitsPerElement")),
            "scale": float(node.get("scale")),
            "format": node.get("format"),
        }

    return {
        "inputs": [tensor(t) for t in root.iter("inputTensor")],
        "outputs": [tensor(t) for t in root.iter("outputTensor")],
    }


@dataclass(frozen=True)
class ConverterIssue:
    """One converter error code, what the converter said, and what it means for this pipeline."""

    code: str
    detail: str
    explanation: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.detail} -- {self.explanation}"


# What each code means and what to change. Codes are the converter's (uni front end: USOP, INVOP, INVMOD, QUANT;
# Java back end: ISM, GE, FEFSUC, ...); an unknown code is reported with the converter's own words.
EXPLANATIONS = {
    "USOP": "the network uses operators the IMX500 does not run; replace them in the model and export it again",
    "INVOP": "an operator is in the IMX500 set but not with these attributes or shapes (see the converter log for the "
    "node); change that layer's configuration",
    "INVMOD": "the converter cannot read this ONNX graph; pass the MCTQ file written by MCT's exporter (export stage)",
    "QUANT": "quantisation parameters are missing or invalid; quantise the model with MCT for the IMX500 target and "
    "export it in MCTQ format",
    "ISM": "the network does not fit in the IMX500's memory; use a smaller model (fewer channels or a smaller input), "
    "or convert with package.input_persistency=false to free the input buffer",
    "GE": "the converter's back end failed on this graph; a float (unquantised) or non-MCT ONNX model is the usual "
    "cause",
}
_SKIP = {"FEFSUC"}  # "Failure in conversion process": the summary line after GE / ISM, adds nothing
_ERROR_LINE = re.compile(r"ERROR\s*:?\s*CODE: \[(?P<code>[A-Z0-9_]+)\]\s*(?P<detail>.*)")
_LOG_SUFFIX = re.compile(r"\s*\[/\S+:\d+\]\s*$")  # uni's "[/path/logger.py:185]" tail


def converter_issues(log: str) -> list[ConverterIssue]:
    """The distinct ``ERROR ... CODE: [XXX]`` lines of a converter log, one :class:`ConverterIssue` per code."""
    issues: dict[str, ConverterIssue] = {}
    for line in log.splitlines():
        match = _ERROR_LINE.search(line)
        if match is None or match["code"] in _SKIP or match["code"] in issues:
            continue
        detail = _LOG_SUFFIX.sub("", match["detail"]).strip()
        issues[match["code"]] = ConverterIssue(
            match["code"],
            detail,
            EXPLANATIONS.get(match["code"], "see the converter log (named below) for the context of this code"),
        )
    return list(issues.values())


# --------------------------------------------------------------------------------------------------
# all together


@dataclass
class Conversion:
    """A successful conversion: ``packerOut.zip`` and what it costs on the chip."""

    packer_zip: Path
    report: MemoryReport
    seconds: float
    java: JavaInfo
    preflight: dict[str, Any]


def convert(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    input_persistency: bool = True,
    timeout_s: float = 1800,
    log_path: str | Path | None = None,
) -> Conversion:
    """Java check, pre-flight, ``imxconv-pt``, memory report, ``packerOut.zip`` normalised; see the module
    docstring. The converter's log goes to ``log_path`` (default ``out_dir/converter.log``).

    Raises:
        ConverterError: no Java 17, an unsupported operator, a float model, a network that does not fit (the
            message gives required and available bytes), or any converter error code, one line each.
    """
    java = check_java()
    checked = preflight(onnx_path)
    run = run_converter(onnx_path, out_dir, input_persistency=input_persistency, timeout_s=timeout_s, log_path=log_path)
    log_file = run.log_path or Path(out_dir) / LOG_FILE
    report_path = find_memory_report(out_dir)
    report = read_memory_report(report_path) if report_path else None
    issues = converter_issues(run.log)
    if report is not None and not report.fits:
        mib = 2**20
        raise ConverterError(
            f"{onnx_path} does not fit on the IMX500: it needs {report.used_bytes:,} bytes "
            f"({report.used_bytes / mib:.2f} "
            f"MiB: {report.model_bytes:,} for weights, {report.runtime_bytes:,} for activations) and the chip has "
            f"{report.available_bytes:,} ({report.available_bytes / mib:.2f} MiB), {report.utilization:.0%} "
            "utilisation. "
            f"{EXPLANATIONS['ISM']}"
        )
    if run.returncode != 0 or issues:
        found = "; ".join(str(i) for i in issues) or "no error code in its log"
        raise ConverterError(
            f"{CONVERTER} failed on {onnx_path} (exit code {run.returncode}): {found}; log: {log_file}"
        )
    packer = Path(out_dir) / "packerOut.zip"
    if report is None or not packer.is_file():
        missing = "memory report" if report is None else "packerOut.zip"
        raise ConverterError(f"{CONVERTER} exited 0 but wrote no {missing} in {out_dir}; see {log_file}")
    normalize_packer_zip(packer)
    return Conversion(packer, report, run.seconds, java, checked)


# --------------------------------------------------------------------------------------------------
# reproducible bytes

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can record
FILE_MODE, DIR_MODE = 0o100644, 0o040755
MSDOS_DIRECTORY = 0x10
UNIX = 3  # ZipInfo.create_system: the "made by" host whose mode bits external_attr carries

# The packer's manifest.json records when it ran (Java's `new Date().toString()`, in the machine's time zone): the
# only member whose content changes between two runs on the same model. Its other entries (each file's load address,
# size and md5) stay as they are; the date keeps the packer's format, set to the zip epoch.
MANIFEST = "manifest.json"
MANIFEST_DATE = re.compile(rb'("Date Info"\s*:\s*)"[^"]*"')
FIXED_MANIFEST_DATE = b"Tue Jan 01 00:00:00 UTC 1980"


def normalize_packer_zip(path: str | Path) -> Path:
    """Make the converter's ``packerOut.zip`` a function of the network: :func:`normalize_zip`, with the date in
    its ``manifest.json`` fixed too. The network's files (``*.bin``, ``dnnParams.xml``, ...) are copied unchanged."""
    return normalize_zip(path, {MANIFEST: fixed_manifest_date})


def fixed_manifest_date(manifest: bytes) -> bytes:
    """``manifest.json``'s ``"Date Info"`` value replaced by 1980-01-01 in the packer's format; the rest unchanged."""
    return MANIFEST_DATE.sub(lambda m: m.group(1) + b'"' + FIXED_MANIFEST_DATE + b'"', manifest, count=1)


def normalize_zip(path: str | Path, fixes: Mapping[str, Callable[[bytes], bytes]] | None = None) -> Path:
    """Rewrite the zip at ``path`` so that its bytes depend only on its members' names and contents.

    Members in name order, each dated 1980-01-01 with mode 0644 (folders 0755), without extra fields or comments,
    and compressed as before (same method, zlib's default level). Contents are copied unchanged, except those of
    the members named in ``fixes``, which go through their function; the archive comment is kept. The rewrite goes
    through a temporary sibling and a rename.
    """
    path, fixes = Path(path), fixes or {}
    tmp = path.with_name(path.name + ".normalizing")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        dst.comment = src.comment
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            data = src.read(info)
            dst.writestr(_fixed_info(info), fixes[info.filename](data) if info.filename in fixes else data)
    os.replace(tmp, path)
    return path


def _fixed_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A fresh header for ``info``'s member: its name and compression method, everything else fixed."""
    fixed = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
    fixed.create_system = UNIX
    if info.is_dir():
        fixed.external_attr = DIR_MODE << 16 | MSDOS_DIRECTORY
    else:
        fixed.external_attr = FILE_MODE << 16
        fixed.compress_type = info.compress_type
    return fixed
