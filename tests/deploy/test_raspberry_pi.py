"""The Raspberry Pi side off the Pi (``deploy.py``: box or point -> ROI, output -> mask -> overlay) and the package
stage's deploy folder."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from picosam_pipeline.data import crops
from picosam_pipeline.data.crops import CropBox, crop_convention, point_box, roi_box
from picosam_pipeline.deploy import raspberry_pi as deploy
from picosam_pipeline.deploy.imx500 import read_dnn_params
from picosam_pipeline.deploy.raspberry_pi import (
    SENSOR_SIZE,
    as_xywh,
    inference_roi,
    logits_from_outputs,
    overlay_rgba,
    paste_mask,
    point_roi,
    preview_to_sensor,
    prompt_roi,
    resize_nearest,
    sensor_size,
)
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.crop_metrics import paste_crop, resize_crop_to_box

TEMPLATES = Path(deploy.__file__).parent / "template"
FULL_SENSOR = (0, 0, 4056, 3040)


class Rectangle:
    """Stand-in for libcamera's Rectangle (attributes x, y, width, height)."""

    def __init__(self, x: int, y: int, width: int, height: int) -> None:
        self.x, self.y, self.width, self.height = x, y, width, height


def test_preview_to_sensor_scales_and_offsets_by_the_scaler_crop():
    # The preview shows the whole sensor at a quarter of its size: preview px x 4 = sensor px.
    assert preview_to_sensor((100, 50, 25, 10), FULL_SENSOR, (1014, 760)) == (400, 200, 100, 40)
    # A digital zoom: the preview shows the sensor area starting at (1000, 500), 2028 x 1520, at 1014 x 760.
    assert preview_to_sensor((10, 20, 30, 40), Rectangle(1000, 500, 2028, 1520), (1014, 760)) == (1020, 540, 60, 80)


def test_inference_roi_is_the_picosam3_crop_in_sensor_pixels():
    roi = inference_roi((200, 150, 100, 50), FULL_SENSOR, (1014, 760))
    expected, _ = roi_box((800, 600, 400, 200), 4056, 3040, 0.1)  # the same box in sensor px, padded and squared
    assert roi == (expected.x1, expected.y1, expected.width, expected.height)
    assert roi[2] == roi[3] == 480  # away from the edges the ROI is square: 400 px + 10 % per side
    # At the sensor's edge the square is clipped (and the sensor stretches it, as training did).
    x, y, w, h = inference_roi((0, 0, 100, 100), FULL_SENSOR, (1014, 760))
    assert (x, y) == (0, 0) and w == h < 480


@pytest.mark.parametrize("box", [(10, 10, 0, 5), (10, 10, 5, -1)])
def test_inference_roi_rejects_boxes_without_area(box):
    with pytest.raises(ValueError, match="width and height must be positive"):
        inference_roi(box, FULL_SENSOR, (1014, 760))


def test_inference_roi_rejects_boxes_outside_the_preview():
    with pytest.raises(ValueError, match="outside"):
        inference_roi((5000, 5000, 10, 10), FULL_SENSOR, (1014, 760))


ROI_CROP = crop_convention("roi", roi_padding=0.1, window=96, input_size=96)
POINT_CROP = crop_convention("point", roi_padding=0.1, window=96, input_size=96)


def test_point_roi_is_the_picosam2_window_in_sensor_pixels():
    # preview px x 4 = sensor px: the point (250, 100) is sensor (1000, 400); the window is 96 sensor px around it
    assert point_roi((250, 100), FULL_SENSOR, (1014, 760)) == (952, 352, 96, 96)
    expected = point_box(1000, 400, 4056, 3040, 96)
    assert point_roi((250, 100), FULL_SENSOR, (1014, 760)) == (expected.x1, expected.y1, 96, 96)
    # near the top-left corner the window is clamped to the sensor (left/top = 0), still 96 px
    assert point_roi((5, 2), FULL_SENSOR, (1014, 760)) == (0, 0, 96, 96)
    # at the right edge PicoSAM2 clips the window (and the sensor stretches it): sensor x 4012, 4056 - 3964 = 92 px
    assert point_roi((1003, 380), FULL_SENSOR, (1014, 760)) == (3964, 1472, 92, 96)
    # a digital zoom: the preview shows sensor (1000, 500) + 2028 x 1520 at 1014 x 760, so preview px x 2
    assert point_roi((100, 50), Rectangle(1000, 500, 2028, 1520), (1014, 760)) == (1152, 552, 96, 96)
    assert point_roi((100, 50), FULL_SENSOR, (1014, 760), window=128) == (336, 136, 128, 128)


def test_point_roi_refuses_points_outside_and_windows_the_chip_cannot_take():
    with pytest.raises(ValueError, match="outside"):
        point_roi((1014, 10), FULL_SENSOR, (1014, 760))
    with pytest.raises(ValueError, match="side under the IMX500's minimum of 64"):
        point_roi((1013.9, 10), FULL_SENSOR, (1014, 760))  # sensor x 4055: a 49-px-wide window at the right edge
    with pytest.raises(ValueError, match="minimum of 64"):
        point_roi((100, 100), FULL_SENSOR, (1014, 760), window=32)


def test_prompt_roi_follows_the_recorded_convention():
    assert prompt_roi(ROI_CROP, FULL_SENSOR, (1014, 760), box=(200, 150, 100, 50)) == inference_roi(
        (200, 150, 100, 50), FULL_SENSOR, (1014, 760)
    )
    padded = {**ROI_CROP, "roi_padding": 0.2}
    assert prompt_roi(padded, FULL_SENSOR, (1014, 760), box=(200, 150, 100, 50))[2] == 560  # 400 px + 20 % per side
    assert prompt_roi(POINT_CROP, FULL_SENSOR, (1014, 760), point=(250, 100)) == (952, 352, 96, 96)
    assert prompt_roi({**POINT_CROP, "window": 128}, FULL_SENSOR, (1014, 760), point=(250, 100))[2:] == (128, 128)
    with pytest.raises(ValueError, match="PicoSAM2 point crops, which take a point prompt"):
        prompt_roi(POINT_CROP, FULL_SENSOR, (1014, 760), box=(200, 150, 100, 50))
    with pytest.raises(ValueError, match="PicoSAM3 roi crops, which take a box prompt"):
        prompt_roi(ROI_CROP, FULL_SENSOR, (1014, 760), point=(250, 100))
    with pytest.raises(ValueError, match="crop convention is None"):
        prompt_roi({}, FULL_SENSOR, (1014, 760), box=(200, 150, 100, 50))


class FakePicamera2:
    """Only the public attributes ``sensor_size`` reads."""

    def __init__(self, properties: dict | None, sensor_resolution=None) -> None:
        self.camera_properties = properties
        if sensor_resolution is not None:
            self.sensor_resolution = sensor_resolution


def test_sensor_size_uses_picamera2s_public_api():
    assert sensor_size(FakePicamera2({"PixelArraySize": (4056, 3040), "Model": "imx500"})) == (4056, 3040)
    assert sensor_size(FakePicamera2({"PixelArraySize": [2028, 1520]}, (4056, 3040))) == (2028, 1520)
    assert sensor_size(FakePicamera2({}, (4056, 3040))) == (4056, 3040)  # the native mode when the property is absent
    assert sensor_size(FakePicamera2(None)) == SENSOR_SIZE


def test_demo_uses_no_private_picamera2_api():
    """``IMX500.__get_full_sensor_resolution`` is name-mangled (private): calling it stops the demo with
    AttributeError."""
    source = (TEMPLATES / "picosam_imx500_demo.py").read_text()
    tree = ast.parse(source)
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "get_full_sensor_resolution" not in attributes and not any(a.startswith("_") for a in attributes)
    options = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
    }
    assert {"--box", "--point", "--fps", "--print-intrinsics", "--model", "--preview-size"} <= options


# The output tensor's way from the chip to the demo, for the converter's dnnParams.xml of our network (written by
# imxconv-pt 3.16 for the sample's PicoSAM3; dimension ordinals follow ONNX's (C, H, W), serializationOrder says
# which dimension runs fastest in the sensor's stream: here C, then H, then W).
DNN_OUTPUT = """<?xml version="1.0"?><dnnParams><networks><network name="picosam_int8" ordinal="0"><inputTensors>
<inputTensor ordinal="0" name="in:0" bitsPerElement="8" scale="0.00390625" format="unsigned"><dimensions>
<dimension size="3" serializationOrder="2" ordinal="0"/><dimension size="96" serializationOrder="1" ordinal="1"/>
<dimension size="96" serializationOrder="0" ordinal="2"/></dimensions></inputTensor></inputTensors><outputTensors>
<outputTensor ordinal="0" name="out:0" bitsPerElement="8" scale="0.03125" format="signed"><dimensions>
<dimension size="1" serializationOrder="0" ordinal="0"/><dimension size="96" serializationOrder="1" ordinal="1"/>
<dimension size="96" serializationOrder="2" ordinal="2"/></dimensions></outputTensor></outputTensors></network>
</networks></dnnParams>"""


def _sensor_stream(tensor: np.ndarray, serialization: list[int]) -> np.ndarray:
    """The chip's byte order: dimension ``serialization.index(0)`` fastest, then 1, ... (``tensor`` in ordinal
    order)."""
    order = sorted(range(tensor.ndim), key=lambda d: serialization[d], reverse=True)  # slowest first
    return np.transpose(tensor, order).reshape(-1)


def _libcamera_parse(stream: np.ndarray, sizes: list[int], serialization: list[int]) -> np.ndarray:
    """libcamera's IMX500 tensor parser (``imx500_tensor_parser.cpp``, parseOutputTensorBody): reorders the stream so
    that ordinal 0 runs fastest, i.e. a Fortran-order array of the ordinal sizes, flattened (CnnOutputTensor)."""
    by_serial = sorted(range(len(sizes)), key=lambda d: serialization[d])  # fastest first
    shaped = stream.reshape([sizes[d] for d in reversed(by_serial)])  # C order: slowest dimension first
    axes = [list(reversed(by_serial)).index(d) for d in range(len(sizes))]  # back to ordinal order
    return np.transpose(shaped, axes).reshape(-1, order="F")


def _picamera2_get_outputs(flat: np.ndarray, shapes: list[list[int]]) -> list[np.ndarray]:
    """``IMX500.get_outputs`` (picamera2 devices/imx500/imx500.py): each tensor reshaped with ``order='F'``."""
    outputs, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        outputs.append(flat[offset : offset + size].reshape(shape, order="F"))
        offset += size
    return outputs


def test_output_tensor_layout_survives_the_way_to_the_demo(tmp_path):
    """A non-symmetric pattern (an L in the top-left corner, a ramp along x) from the network's (1, 96, 96) output
    through the sensor's serialisation, libcamera's parser and picamera2's reshape comes out as the same (H, W)
    logits: a transposed or flipped mask cannot pass."""
    (tmp_path / "dnnParams.xml").write_text(DNN_OUTPUT)
    (out,) = read_dnn_params(tmp_path / "dnnParams.xml")["outputs"]
    assert out["dims"] == [1, 96, 96] and out["serialization"] == [0, 1, 2]
    pattern = np.tile(np.arange(96, dtype=np.float32) / 8, (96, 1))  # value grows with x only
    pattern[5:40, 3:9] = -7.0  # the L's vertical bar
    pattern[34:40, 3:30] = -7.0  # and its foot
    assert not np.array_equal(pattern, pattern.T) and not np.array_equal(pattern, pattern[::-1])
    network_output = pattern[None]  # (C, H, W): what the ONNX graph's output holds, batch dropped
    flat = _libcamera_parse(_sensor_stream(network_output, out["serialization"]), out["dims"], out["serialization"])
    logits = logits_from_outputs(_picamera2_get_outputs(flat, [out["dims"]]), 96)
    np.testing.assert_array_equal(logits, pattern)
    # the checks have teeth: reading the stream the naive way (C order) gives the transpose
    naive = logits_from_outputs([_sensor_stream(network_output, out["serialization"]).reshape(1, 96, 96)], 96)
    assert not np.array_equal(naive, pattern) and np.array_equal(naive, pattern.T)


@pytest.mark.parametrize("shape", [(96, 96), (1, 96, 96), (96, 96, 1), (1, 1, 96, 96)])
def test_logits_from_outputs_squeezes_singleton_axes(shape):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=shape).astype(np.float32)
    logits = logits_from_outputs([raw, np.zeros(3)], 96)
    assert logits.shape == (96, 96) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, raw.reshape(96, 96))


def test_logits_from_outputs_without_result_and_with_a_foreign_network():
    assert logits_from_outputs(None, 96) is None
    assert logits_from_outputs([], 96) is None
    with pytest.raises(ValueError, match="expected 96x96"):
        logits_from_outputs([np.zeros((1, 21, 320, 320))], 96)  # e.g. a DeepLabv3+ rpk left on the camera


@pytest.mark.parametrize("hw", [(37, 211), (300, 150)])
def test_resize_nearest_matches_the_pipelines_mask_resize(hw):
    rng = np.random.default_rng(1)
    mask = rng.random((96, 96)) > 0.5
    expected = resize_crop_to_box(mask, CropBox(0, 0, hw[1], hw[0]))  # bool input: PIL NEAREST (crop_metrics.py)
    np.testing.assert_array_equal(resize_nearest(mask, *hw), expected)


def test_paste_mask_matches_scoring_paste_crop_inside_the_frame():
    rng = np.random.default_rng(2)
    mask = rng.random((96, 96)) > 0.3
    box = CropBox(120, 40, 120 + 173, 40 + 190)
    pasted = paste_mask(mask, (box.x1, box.y1, box.width, box.height), (480, 640))
    np.testing.assert_array_equal(pasted, paste_crop(mask, box, (480, 640)))


def test_paste_mask_clips_a_roi_reaching_past_the_frame():
    mask = np.ones((96, 96), dtype=bool)
    pasted = paste_mask(mask, Rectangle(600, 440, 100, 100), (480, 640))
    assert pasted.shape == (480, 640)
    assert pasted.sum() == 40 * 40 and pasted[440:, 600:].all()
    assert not paste_mask(mask, (0, 0, 0, 10), (480, 640)).any()


def test_overlay_rgba_tints_only_the_mask():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1, 2] = True
    over = overlay_rgba(mask, colour=(1, 2, 3), alpha=99)
    assert over.shape == (4, 5, 4) and over.dtype == np.uint8
    assert tuple(over[1, 2]) == (1, 2, 3, 99) and over.sum() == 1 + 2 + 3 + 99


def test_as_xywh_reads_rectangles_and_sequences():
    assert as_xywh(Rectangle(1, 2, 3, 4)) == (1, 2, 3, 4)
    assert as_xywh([5, 6, 7, 8]) == (5, 6, 7, 8)


def test_deploy_module_runs_beside_crops_without_the_package(tmp_path):
    """On the Pi only deploy.py and crops.py are there: the fallback import must work."""
    shutil.copyfile(deploy.__file__, tmp_path / "deploy.py")
    shutil.copyfile(crops.__file__, tmp_path / "crops.py")
    code = (
        "import sys; sys.modules['picosam_pipeline'] = None; sys.path.insert(0, sys.argv[1]); import deploy; "
        "print(deploy.inference_roi((200, 150, 100, 50), (0, 0, 4056, 3040), (1014, 760)))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(inference_roi((200, 150, 100, 50), FULL_SENSOR, (1014, 760)))


def test_demo_script_uses_only_what_deploy_defines():
    tree = ast.parse((TEMPLATES / "picosam_imx500_demo.py").read_text())
    imported = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "deploy"
        for alias in node.names
    ]
    assert imported and all(hasattr(deploy, name) for name in imported)
    calls = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert {"set_inference_roi_abs", "get_outputs", "get_roi_scaled", "set_overlay"} <= calls
    assert "get_full_sensor_resolution" not in calls


# --------------------------------------------------------------------------------------------------
# the package stage around the converter (the converter itself: test_imx500.py)

DNN_PARAMS = """<?xml version="1.0"?><dnnParams><networks><network name="picosam_int8" ordinal="0">
<inputTensors><inputTensor ordinal="0" name="in:0" bitsPerElement="8" scale="{scale}" format="{fmt}">
<dimensions><dimension size="3" ordinal="0"/><dimension size="96" ordinal="1"/><dimension size="96" ordinal="2"/></dimensions>
</inputTensor></inputTensors><outputTensors><outputTensor ordinal="0" name="out:0" bitsPerElement="8" scale="0.125" format="signed">
<dimensions><dimension size="1" ordinal="0"/><dimension size="96" ordinal="1"/><dimension size="96" ordinal="2"/></dimensions>
</outputTensor></outputTensors></network></networks></dnnParams>"""  # noqa: E501 (literal dnnParams.xml)


def _export_dir(root: Path, crop: dict | None = ROI_CROP) -> Path:
    """What the export stage leaves for package: the MCTQ file (opaque here) and its contract (with ``crop``)."""
    from picosam_pipeline.deploy.onnx_export import CONTRACT_FILE
    from picosam_pipeline.deploy.onnx_export import EXPORT_MCTQ_FILE as MCTQ_FILE

    folder = root / "export"
    folder.mkdir()
    (folder / MCTQ_FILE).write_bytes(b"onnx")
    (folder / CONTRACT_FILE).write_text(
        json.dumps(
            {
                "network": "picosam_int8",
                "student": "picosam3",
                "tpc_version": "4.0",
                "method": "ptq",
                "input": {
                    "shape": ["batch", 3, 96, 96],
                    "summary": "float32 (batch, 3, 96, 96) RGB in [0, 1], NCHW",
                    "normalization": {"where": "in_graph", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                },
                "output": {
                    "summary": "float32 (batch, 1, 96, 96) mask logits; mask = logit > 0",
                    "quantization_step": 0.125,
                },
                **({"crop": crop} if crop is not None else {}),
            }
        )
    )
    return folder


def _fake_converter(monkeypatch, *, input_format: str = "unsigned", input_scale: float = 1 / 256):
    """Replace Java check and converter by what they leave behind for a network that fits (3.8 of 8 MB)."""
    from picosam_pipeline.deploy import imx500

    java = imx500.JavaInfo("/usr/bin/java", "17.0.15", 17)

    def convert(onnx_path, out_dir, **kwargs):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)  # the stage made it (outputs.py), as the real converter allows
        (out / "packerOut.zip").write_bytes(b"PK-packer")
        (out / "dnnParams.xml").write_text(DNN_PARAMS.format(scale=input_scale, fmt=input_format))
        report = imx500.MemoryReport("picosam_int8", 3844000, 8388480, 2403424, 1439552, 3844000 / 8388480, True, True)
        return imx500.Conversion(out / "packerOut.zip", report, 42.0, java, {"nodes": 175, "ops": {}})

    monkeypatch.setattr(imx500, "check_java", lambda: java)
    monkeypatch.setattr(imx500, "convert", convert)


def _package_config(root: Path):
    from picosam_pipeline.config import load_config

    return load_config(
        None,
        [
            f"package.export_dir={root / 'export'}",
            f"package.out_dir={root / 'package'}",
            f"runtime.metrics_dir={root / 'metrics'}",
        ],
    )


@pytest.mark.parametrize("crop", [ROI_CROP, POINT_CROP], ids=["picosam3-roi", "picosam2-point"])
def test_package_stage_writes_the_deploy_folder_and_memory_metrics(tmp_path, monkeypatch, crop):
    from picosam_pipeline.reports import last_run
    from picosam_pipeline.stages import package

    _export_dir(tmp_path, crop)
    _fake_converter(monkeypatch)
    summary = package.run(_package_config(tmp_path), None)
    assert summary == {
        "crop": crop["convention"],
        "fits": True,
        "used_bytes": 3844000,
        "available_bytes": 8388480,
        "utilization": 0.458,
        "converter_seconds": 42.0,
    }
    folder = tmp_path / "package" / "deploy"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "crops.py",
        "deploy.py",
        "packerOut.zip",
        "picosam_imx500_demo.py",
        "picosam_int8.json",
    ]
    assert (folder / "packerOut.zip").read_bytes() == b"PK-packer"
    readme = (folder / "README.md").read_text()
    assert "$" not in readme and "imx500-package -i packerOut.zip -o ." in readme
    assert "3,844,000 of 8,388,480 bytes (46%)" in readme and "picosam3" in readme
    kind = "box" if crop["convention"] == "roi" else "point"
    assert f"takes a **{kind}** prompt" in readme and f"picosam_imx500_demo.py --{kind} " in readme
    # the demo reads the crop from the contract copied beside it: the convention travels into the deploy folder
    assert json.loads((folder / "picosam_int8.json").read_text())["crop"] == crop
    metrics = json.loads((folder.parent / "report.json").read_text())
    assert metrics["crop"] == crop
    assert metrics["fits"] and metrics["memory"]["used_bytes"] == 3844000 and set(metrics["converter"]) == {"version"}
    # this machine's Java goes to the run log, not into the output that DVC hashes
    assert last_run(tmp_path / "metrics", "package")["java"] == "17.0.15"
    assert metrics["tensors"]["inputs"][0]["scale"] == 1 / 256
    headline = json.loads((tmp_path / "metrics" / "package.json").read_text())
    assert headline == {
        "fits": True,
        "utilization": metrics["utilization"],
        "model_bytes": metrics["memory"]["model_bytes"],
    }


def test_package_stage_refuses_a_network_that_does_not_read_camera_rgb(tmp_path, monkeypatch):
    from picosam_pipeline.stages import package

    _export_dir(tmp_path)
    _fake_converter(monkeypatch, input_format="signed", input_scale=1 / 32)  # e.g. a model taking normalised input
    with pytest.raises(PipelineError, match="input tensor is 8-bit signed with scale 0.03125.*p / 256"):
        package.run(_package_config(tmp_path), None)


def test_package_stage_refuses_a_contract_without_crop_convention(tmp_path, monkeypatch):
    from picosam_pipeline.stages import package

    _export_dir(tmp_path, crop=None)
    _fake_converter(monkeypatch)
    with pytest.raises(PipelineError, match="does not record the crop convention.*rerun quantize and export"):
        package.run(_package_config(tmp_path), None)


@pytest.mark.parametrize(
    "crop, prompt, refused",
    [(ROI_CROP, "--box 10,10,50,50", "--point 5,5"), (POINT_CROP, "--point 5,5", "--box 10,10,50,50")],
)
def test_demo_takes_only_the_prompt_of_its_convention(tmp_path, crop, prompt, refused):
    """The demo, run off the Pi with stand-in picamera2 modules that record the ROI it sets: the recorded convention
    decides the ROI, and the other prompt kind stops it before the camera starts."""
    folder = tmp_path / "deploy"
    folder.mkdir()
    for source, name in (
        (TEMPLATES / "picosam_imx500_demo.py", "picosam_imx500_demo.py"),
        (Path(deploy.__file__), "deploy.py"),
        (Path(crops.__file__), "crops.py"),
    ):
        shutil.copyfile(source, folder / name)
    (folder / "picosam_int8.json").write_text(json.dumps({"input": {"shape": ["batch", 3, 96, 96]}, "crop": crop}))
    fakes = tmp_path / "fakes" / "picamera2"
    (fakes / "devices" / "imx500").mkdir(parents=True)
    (fakes / "__init__.py").write_text(
        "class CompletedRequest: pass\n"
        "class Picamera2:\n"
        "    camera_properties = {'PixelArraySize': (4056, 3040)}\n"
        "    def __init__(self, num): pass\n"
        "    def create_preview_configuration(self, **kw): return kw\n"
        "    def start(self, config, show_preview): pass\n"
        "    def capture_metadata(self): return {'ScalerCrop': (0, 0, 4056, 3040)}\n"
        "    def stop(self): pass\n"
    )
    (fakes / "devices" / "__init__.py").write_text(
        "class IMX500:\n"
        "    camera_num = 0\n"
        "    network_intrinsics = None\n"
        "    config = {}\n"
        "    def __init__(self, model): pass\n"
        "    def show_network_fw_progress_bar(self): pass\n"
        "    def set_inference_roi_abs(self, roi):\n"
        "        print('ROI', tuple(roi)); raise SystemExit(0)\n"
    )
    (fakes / "devices" / "imx500" / "__init__.py").write_text(
        "class NetworkIntrinsics:\n"
        "    task = None; inference_rate = None\n"
        "    def update_with_defaults(self): self.inference_rate = self.inference_rate or 30.0\n"
        '    def __repr__(self): return \'{"task": "%s", "inference_rate": %s}\' % (self.task, self.inference_rate)\n'
    )
    env = {"PYTHONPATH": str(tmp_path / "fakes"), "PATH": "/usr/bin:/bin"}

    def demo(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(folder / "picosam_imx500_demo.py"), "--preview-size", "1014x760", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=folder,
        )

    ran = demo(*prompt.split())
    assert ran.returncode == 0, ran.stderr
    if crop["convention"] == "roi":
        assert f"ROI {inference_roi((10, 10, 50, 50), FULL_SENSOR, (1014, 760))}" in ran.stdout
    else:
        assert f"ROI {point_roi((5, 5), FULL_SENSOR, (1014, 760))}" in ran.stdout
    refused_run = demo(*refused.split())
    assert refused_run.returncode != 0 and "ROI" not in refused_run.stdout
    kind = "box" if crop["convention"] == "roi" else "point"
    assert f"give --{kind}" in refused_run.stderr
    intrinsics = demo("--fps", "12", "--print-intrinsics")
    assert intrinsics.returncode == 0 and json.loads(intrinsics.stdout) == {
        "task": "segmentation",
        "inference_rate": 12,
    }
