"""The converter step: Java check, operator pre-flight, memory report, error codes (``imx500.py``).

Everything but the ``slow`` tests runs without the converter. Those run the real ``imxconv-pt``: on a deliberately
oversized network (about 70 s on two idle cores), and twice through the package stage on a tiny one, whose output
must come out byte-identical.
"""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from picosam_pipeline.deploy import imx500
from picosam_pipeline.deploy.imx500 import (
    ConverterError,
    check_java,
    converter_issues,
    find_memory_report,
    fixed_manifest_date,
    normalize_packer_zip,
    normalize_zip,
    parse_size,
    preflight,
    read_dnn_params,
    read_memory_report,
)

# Lines as imxconv-pt 3.19.2 printed them here (a fake-quant file, a network of 9.8 MB, a float ONNX).
USOP_LOG = (
    "2026-11-21 06:28:20,724 ERROR : CODE: [USOP] The network contains unsupported ops: DequantizeLinear, "
    "QuantizeLinear [/venv/lib/python3.11/site-packages/uni/common/logger.py:185]\n"
)
ISM_LOG = (
    "2026-11-21 06:25:33.406 INFO : CODE: [START] Starting SDSPconv\n"
    "2026-11-21 06:27:27.871 ERROR: CODE: [ISM] ConvFe error (ISM) on 'big_mctq': "
    "Not enough memory, available: 8.00MB , required: 9.83MB \n"
    "2026-11-21 06:27:28.512 INFO : CODE: [IMCF] ConvFe failed with insufficient memory, "
    "trying to run Tiling Advisor\n"
    'Exception in thread "main" java.lang.IllegalArgumentException: Available memory needs to be greater than 0\n'
    "2026-11-21 06:27:29.951 ERROR: CODE: [ISM] ConvFe error (ISM) on 'big_mctq': "
    "Not enough memory, available: 8.00MB , required: 9.83MB \n"
)
FLOAT_LOG = (
    "2026-11-21 06:28:42.595 ERROR: CODE: [GE] Caught exception while converting'float': List is empty. \n"
    "2026-11-21 06:28:42.691 ERROR: CODE: [FEFSUC] Failure in conversion process: \n"
)


# --------------------------------------------------------------------------------------------------
# Java


def _fake_java(folder: Path, version_line: str) -> str:
    """A ``java`` script printing ``version_line`` as ``java -version`` does (on stderr); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "java"
    script.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(folder)


def test_missing_java_says_how_to_install_it(tmp_path):
    with pytest.raises(ConverterError, match="no `java` is on PATH.*apt install openjdk-17-jre-headless"):
        check_java(search_path=str(tmp_path))


@pytest.mark.parametrize(
    "line, shown",
    [('openjdk version "11.0.22" 2024-01-16', "Java 11.0.22"), ('java version "1.8.0_392"', "Java 1.8.0_392")],
)
def test_old_java_is_refused(tmp_path, line, shown):
    with pytest.raises(ConverterError, match=f"needs Java 17, but .* is {shown}.*openjdk-17-jre-headless"):
        check_java(search_path=_fake_java(tmp_path, line))


def test_java_17_is_accepted(tmp_path):
    info = check_java(search_path=_fake_java(tmp_path, 'openjdk version "17.0.15" 2025-04-15'))
    assert (info.version, info.major) == ("17.0.15", 17)


def test_package_stage_without_java_says_so_before_anything_else(tmp_path, monkeypatch):
    """`run-stage package` with no Java on PATH: exit 1, one paragraph naming Java 17 and the install command,
    although the export it would package does not exist either (that would be the second complaint)."""
    from click.testing import CliRunner

    from picosam_pipeline.cli import cli
    from tests.helpers.paths import REPO

    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(
        cli,
        [
            "run-stage",
            "package",
            "--params",
            str(REPO / "params.yaml"),
            "--set",
            f"package.export_dir={tmp_path / 'nothing'}",
            "--set",
            f"package.out_dir={tmp_path / 'out'}",
        ],
    )
    assert result.exit_code == 1
    assert "Error: imxconv-pt (the IMX500 converter) needs Java 17" in result.output
    assert "apt install openjdk-17-jre-headless" in result.output and "Traceback" not in result.output
    assert "export_dir" not in result.output and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# pre-flight


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        list(initializers),
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("mct_quantizers", 1)]
    )


def _mctq_nodes(last_output: str = "output") -> list[onnx.NodeProto]:
    """An input quantiser, a 1x1 conv and an output quantiser, as MCT's MCTQ exporter writes them."""
    return [
        helper.make_node(
            "ActivationPOTQuantizer",
            ["input"],
            ["q_in"],
            name="/input_quantizer",
            domain="mct_quantizers",
            threshold=1.0,
            signed=0,
            num_bits=8,
        ),
        helper.make_node("Conv", ["q_in", "w"], ["conv"], name="/head/Conv"),
        helper.make_node(
            "ActivationPOTQuantizer",
            ["conv"],
            [last_output],
            name="/head_quantizer",
            domain="mct_quantizers",
            threshold=8.0,
            signed=1,
            num_bits=8,
        ),
    ]


def _weights() -> onnx.TensorProto:
    return helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [0.1, 0.2, 0.3])


def test_preflight_accepts_an_mctq_graph(tmp_path):
    path = tmp_path / "ok.onnx"
    onnx.save(_model(_mctq_nodes(), [_weights()]), path)
    assert preflight(path) == {"nodes": 3, "ops": {"ActivationPOTQuantizer": 2, "Conv": 1}}


def test_preflight_names_the_nodes_with_unsupported_operators(tmp_path):
    nodes = _mctq_nodes("mid") + [
        helper.make_node("Einsum", ["mid", "mid"], ["e"], name="/attention/Einsum", equation="bchw,bchw->bchw"),
        helper.make_node("Erf", ["e"], ["output"], name="/gelu/Erf"),
    ]
    path = tmp_path / "bad.onnx"
    onnx.save(_model(nodes, [_weights()]), path)
    with pytest.raises(ConverterError) as err:
        preflight(path)
    message = str(err.value)
    assert "2 node(s) use operators the IMX500 converter does not support" in message
    assert "Einsum at /attention/Einsum" in message and "Erf at /gelu/Erf" in message
    assert "/head/Conv" not in message


def test_preflight_points_a_fake_quant_file_to_the_mctq_export(tmp_path):
    scale, zero = (
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("z", TensorProto.INT8, [], [0]),
    )
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="/q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["output"], name="/dq"),
    ]
    path = tmp_path / "fq.onnx"
    onnx.save(_model(nodes, [scale, zero]), path)
    with pytest.raises(ConverterError, match="fake-quant export: pass the MCTQ export"):
        preflight(path)


def test_preflight_refuses_a_float_model(tmp_path):
    path = tmp_path / "float.onnx"
    onnx.save(_model([helper.make_node("Conv", ["input", "w"], ["output"], name="/conv")], [_weights()]), path)
    with pytest.raises(ConverterError, match="no MCT quantisers.*float model"):
        preflight(path)


def test_convert_stops_at_the_preflight_before_running_the_converter(tmp_path, monkeypatch):
    path = tmp_path / "bad.onnx"
    onnx.save(_model([helper.make_node("Einsum", ["input", "input"], ["output"], name="/e", equation="i,i->i")]), path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the converter ran although the pre-flight should have stopped it")

    monkeypatch.setattr(imx500, "run_converter", must_not_run)
    with pytest.raises(ConverterError, match="Einsum at /e"):
        imx500.convert(path, tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# memory report, dnnParams.xml, error codes


def test_parse_size_in_every_unit():
    assert parse_size("3844000B") == 3844000
    assert parse_size("1.00KB") == 1024
    assert parse_size("8.00MB") == 8 * 2**20
    with pytest.raises(ValueError):
        parse_size("8 megabytes")


def _write_report(folder: Path, used: str, available: str, fits: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "net_MemoryReport.json"
    path.write_text(
        json.dumps(
            {
                "Memory Report": {
                    "Name": "net",
                    "Runtime Memory Physical Size": "529920B",
                    "Model Memory Physical Size": "9777376B",
                    "Reserved Memory": "1024B",
                    "Memory Usage": used,
                    "Total Memory Available On Chip": available,
                    "Memory Utilization": "123%",
                    "Fit In Chip": fits,
                    "Input Persistent": True,
                }
            }
        )
    )
    return path


def test_read_memory_report(tmp_path):
    report = read_memory_report(_write_report(tmp_path, "10308320B", "8388480B", False))
    assert (report.used_bytes, report.available_bytes, report.fits) == (10308320, 8388480, False)
    assert (report.model_bytes, report.runtime_bytes) == (9777376, 529920)
    assert report.utilization == pytest.approx(1.2289, abs=1e-4)
    assert find_memory_report(tmp_path) == tmp_path / "net_MemoryReport.json"
    assert find_memory_report(tmp_path / "empty") is None


def test_read_dnn_params(tmp_path):
    xml = tmp_path / "dnnParams.xml"
    xml.write_text("""<?xml version="1.0"?><dnnParams><networks><network name="n" ordinal="0">
      <inputTensors><inputTensor ordinal="0" name="in:0" bitsPerElement="8" scale="0.00390625" format="unsigned">
        <dimensions><dimension size="3" ordinal="0"/><dimension size="96" ordinal="1"/><dimension size="96" ordinal="2"/></dimensions>
      </inputTensor></inputTensors>
      <outputTensors><outputTensor ordinal="0" name="out:0" bitsPerElement="8" scale="0.125" format="signed">
        <dimensions><dimension size="96" ordinal="2"/><dimension size="1" ordinal="0"/><dimension size="96" ordinal="1"/></dimensions>
      </outputTensor></outputTensors></network></networks></dnnParams>""")  # noqa: E501 (literal dnnParams.xml)
    tensors = read_dnn_params(xml)
    assert tensors["inputs"] == [
        {
            "name": "in:0",
            "dims": [3, 96, 96],
            "serialization": [0, 1, 2],
            "bits": 8,
            "scale": 0.00390625,
            "format": "unsigned",
        }
    ]  # no serializationOrder: ordinal order
    assert tensors["outputs"][0]["dims"] == [1, 96, 96] and tensors["outputs"][0]["format"] == "signed"


def test_converter_issues_one_clear_message_per_code():
    (usop,) = converter_issues(USOP_LOG)
    assert (
        usop.code == "USOP" and usop.detail == "The network contains unsupported ops: DequantizeLinear, QuantizeLinear"
    )
    assert "replace them" in usop.explanation
    (ism,) = converter_issues(ISM_LOG)  # printed twice, reported once; the INFO-level [IMCF] is not an error
    assert ism.code == "ISM" and "required: 9.83MB" in ism.detail and "does not fit" in ism.explanation
    (ge,) = converter_issues(FLOAT_LOG)  # [FEFSUC] only summarises the failure
    assert ge.code == "GE" and "float" in ge.explanation
    (unknown,) = converter_issues("2026-01-01 ERROR: CODE: [XYZ] something new\n")
    assert unknown.code == "XYZ" and "converter log" in unknown.explanation
    assert converter_issues("2026-01-01 INFO : CODE: [START] Starting SDSPconv\n") == []


def test_convert_reports_required_and_available_memory(tmp_path, monkeypatch):
    """The converter's own failure (here replayed from a real run) becomes one message with both figures."""
    path = tmp_path / "ok.onnx"
    onnx.save(_model(_mctq_nodes(), [_weights()]), path)

    def replay(onnx_path, out_dir, **kwargs):
        _write_report(Path(out_dir), "10308320B", "8388480B", False)
        return imx500.ConverterRun(1, 0.1, ISM_LOG, Path(out_dir))

    monkeypatch.setattr(imx500, "run_converter", replay)
    with pytest.raises(ConverterError, match=r"needs 10,308,320 bytes .* the chip has 8,388,480 .* 123% utilisation"):
        imx500.convert(path, tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# reproducible packerOut.zip

# manifest.json as imxconv-pt 3.19.2's packer wrote it (shortened): the date of the run, in Java's Date format
PACKER_MANIFEST = b"""{
  "Release Version": "3.19.1",
  "Network Name": "picosam_int8",
  "Date Info": "Mon Dec 07 12:16:52 UTC 2026",
  "coef": {
    "File": "l2staticData.bin",
    "md5": "93300A11B64FAE0FBF3C88BC32CE0C15"
  }
}
"""
MEMBERS = {
    "sdpsA.bin": bytes(range(256)) * 64,
    "cfgC.bin": b"\x00\x01\x02\x03",
    "dnnParams.xml": b"<dnnParams/>",
    "manifest.json": PACKER_MANIFEST,
}


def _zip(path: Path, members: dict[str, bytes], when: tuple[int, ...], order: list[str], mode: int) -> Path:
    """A zip of ``members`` written in ``order``, dated ``when``, with Unix ``mode``; ``cfgC.bin`` stored, the rest
    deflated (as a converter run at that time on that machine would leave it)."""
    with zipfile.ZipFile(path, "w") as z:
        for name in order:
            info = zipfile.ZipInfo(name, date_time=when)
            info.compress_type = zipfile.ZIP_STORED if name == "cfgC.bin" else zipfile.ZIP_DEFLATED
            info.external_attr = mode << 16
            z.writestr(info, members[name])
    return path


def test_normalize_zip_gives_the_same_bytes_for_the_same_members(tmp_path):
    first = _zip(tmp_path / "first.zip", MEMBERS, (2026, 12, 7, 12, 16, 52), list(MEMBERS), 0o600)
    second = _zip(tmp_path / "second.zip", MEMBERS, (2026, 12, 7, 12, 18, 44), sorted(MEMBERS, reverse=True), 0o644)
    assert first.read_bytes() != second.read_bytes()
    assert normalize_zip(first).read_bytes() == normalize_zip(second).read_bytes()
    with zipfile.ZipFile(first) as z:
        infos = z.infolist()
        assert z.testzip() is None and [i.filename for i in infos] == sorted(MEMBERS)
        assert {i.filename: z.read(i) for i in infos} == MEMBERS  # contents untouched, the manifest's date too
        assert {(i.date_time, i.external_attr >> 16) for i in infos} == {((1980, 1, 1, 0, 0, 0), 0o100644)}
        assert {i.filename: i.compress_type for i in infos} == {
            n: zipfile.ZIP_STORED if n == "cfgC.bin" else zipfile.ZIP_DEFLATED for n in MEMBERS
        }
    assert not list(tmp_path.glob("*.normalizing"))


def test_the_packer_manifest_date_is_fixed_and_nothing_else():
    fixed = fixed_manifest_date(PACKER_MANIFEST)
    assert fixed == PACKER_MANIFEST.replace(b"Mon Dec 07 12:16:52 UTC 2026", b"Tue Jan 01 00:00:00 UTC 1980")
    assert fixed_manifest_date(fixed) == fixed
    assert fixed_manifest_date(b'{"Network Name": "n"}') == b'{"Network Name": "n"}'  # no date: left as it is


def test_normalize_packer_zip_fixes_the_manifest_date_and_copies_the_network(tmp_path):
    later = {**MEMBERS, "manifest.json": PACKER_MANIFEST.replace(b"12:16:52 UTC", b"14:18:44 CET")}
    first = _zip(tmp_path / "first.zip", MEMBERS, (2026, 12, 7, 12, 16, 52), list(MEMBERS), 0o600)
    second = _zip(tmp_path / "second.zip", later, (2026, 12, 7, 14, 18, 44), list(MEMBERS), 0o600)
    assert normalize_packer_zip(first).read_bytes() == normalize_packer_zip(second).read_bytes()
    with zipfile.ZipFile(first) as z:
        assert json.loads(z.read("manifest.json"))["Date Info"] == "Tue Jan 01 00:00:00 UTC 1980"
        assert all(z.read(name) == data for name, data in MEMBERS.items() if name != "manifest.json")


# --------------------------------------------------------------------------------------------------
# the real converter


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_oversized_network_fails_with_required_and_available_memory(tmp_path):
    """A 9.4 M-weight conv (9.8 MB with the rest) through MCT and imxconv-pt: the chip has 8 MB."""
    import model_compression_toolkit as mct
    import torch
    from torch import nn

    from picosam_pipeline.deploy.onnx_export import export_quantized
    from picosam_pipeline.deploy.quantize import target_platform

    try:
        check_java()
    except ConverterError as err:
        pytest.skip(f"no Java 17 for the converter: {err}")
    torch.manual_seed(0)
    big = nn.Sequential(
        nn.Conv2d(3, 1024, 1), nn.ReLU(), nn.Conv2d(1024, 1024, 3, padding=1), nn.ReLU(), nn.Conv2d(1024, 1, 1)
    ).eval()
    # No-clipping thresholds: MCT's default per-channel MSE search over 9.4 M weights takes minutes.
    fast = mct.core.QuantizationErrorMethod.NOCLIPPING
    core = mct.core.CoreConfig(
        quantization_config=mct.core.QuantizationConfig(
            weights_error_method=fast, activation_error_method=fast, weights_bias_correction=False
        )
    )
    quantized, _ = mct.ptq.pytorch_post_training_quantization(
        big,
        lambda: iter([[torch.rand(2, 3, 8, 8)]]),
        core_config=core,
        target_platform_capabilities=target_platform("4.0"),
    )
    onnx_path = export_quantized(quantized, tmp_path / "big.onnx", fmt="mctq", input_size=8)

    with pytest.raises(ConverterError) as err:
        imx500.convert(onnx_path, tmp_path / "out")
    message = str(err.value)
    assert "does not fit on the IMX500" in message
    report = read_memory_report(find_memory_report(tmp_path / "out"))
    assert report.used_bytes > report.available_bytes and not report.fits
    assert f"needs {report.used_bytes:,} bytes" in message and f"the chip has {report.available_bytes:,}" in message
    assert (tmp_path / "out" / "converter.log").read_text().count("[ISM]") >= 1


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_package_stage_output_is_byte_identical_across_runs_and_folders(tmp_path, monkeypatch):
    """The package stage on one export, in two project folders (other absolute paths) one converter run (~20 s)
    apart: every file of data/package has the same bytes, so DVC records the same hash. The converter's log, with
    its timestamps and absolute paths, goes to metrics/runs/ (per machine, not hashed)."""
    from picosam_pipeline.config import load_config
    from picosam_pipeline.stages import package
    from tests.helpers.pipeline_inputs import tiny_export

    try:
        check_java()
    except ConverterError as err:
        pytest.skip(f"no Java 17 for the converter: {err}")
    export = tiny_export(tmp_path / "inputs")
    outputs = []
    for name in ("first", "second"):
        project = tmp_path / name
        shutil.copytree(export, project / "data" / "export")
        monkeypatch.chdir(project)
        package.run(load_config(None, []), None)  # the default params: data/export -> data/package, metrics/
        outputs.append(_files(project / "data" / "package"))
        assert "INFO" in (project / "metrics" / "runs" / package.CONVERTER_LOG).read_text()
    first, second = outputs
    assert sorted(first) == sorted(second) and "converter.log" not in first and "deploy/packerOut.zip" in first
    assert [name for name in first if first[name] != second[name]] == []
    with zipfile.ZipFile(tmp_path / "first" / "data" / "package" / "packerOut.zip") as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert json.loads(z.read("manifest.json"))["Date Info"] == "Tue Jan 01 00:00:00 UTC 1980"


def test_converter_output_is_collected_while_a_progress_line_runs(tmp_path):
    """The converter runs through _run_with_progress: its output lines are kept (for converter.log) and a run past
    the timeout is killed and reported as such (returncode None)."""
    import sys

    done = imx500._run_with_progress(
        [sys.executable, "-c", "import time; print('loading'); time.sleep(0.7); print('done')"], 30
    )
    assert done.returncode == 0 and done.lines == ["loading\n", "done\n"]
    stuck = imx500._run_with_progress(
        [sys.executable, "-c", "import time; print('start', flush=True); time.sleep(30)"], 1
    )
    assert stuck.returncode is None and stuck.lines == ["start\n"]
