"""The Raspberry Pi side off the Pi (``deploy.py``: box -> ROI, output -> mask -> overlay) and the package stage's deploy folder."""

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
from picosam_pipeline.data.crops import CropBox, roi_box
from picosam_pipeline.deploy import raspberry_pi as deploy
from picosam_pipeline.deploy.raspberry_pi import (as_xywh, inference_roi, logits_from_outputs, overlay_rgba, paste_mask,
                                                  preview_to_sensor, resize_nearest)
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.scoring import paste_crop, resize_crop_to_box

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
    expected = resize_crop_to_box(mask, CropBox(0, 0, hw[1], hw[0]))  # bool input: PIL NEAREST (scoring.py)
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
    code = ("import sys; sys.modules['picosam_pipeline'] = None; sys.path.insert(0, sys.argv[1]); import deploy; "
            "print(deploy.inference_roi((200, 150, 100, 50), (0, 0, 4056, 3040), (1014, 760)))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(inference_roi((200, 150, 100, 50), FULL_SENSOR, (1014, 760)))


def test_demo_script_uses_only_what_deploy_defines():
    tree = ast.parse((TEMPLATES / "picosam_imx500_demo.py").read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "deploy"
                for alias in node.names]
    assert imported and all(hasattr(deploy, name) for name in imported)
    calls = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert {"set_inference_roi_abs", "get_outputs", "get_roi_scaled", "set_overlay"} <= calls


# --------------------------------------------------------------------------------------------------
# the package stage around the converter (the converter itself: test_imx500.py)

DNN_PARAMS = """<?xml version="1.0"?><dnnParams><networks><network name="picosam_int8" ordinal="0">
<inputTensors><inputTensor ordinal="0" name="in:0" bitsPerElement="8" scale="{scale}" format="{fmt}">
<dimensions><dimension size="3" ordinal="0"/><dimension size="96" ordinal="1"/><dimension size="96" ordinal="2"/></dimensions>
</inputTensor></inputTensors><outputTensors><outputTensor ordinal="0" name="out:0" bitsPerElement="8" scale="0.125" format="signed">
<dimensions><dimension size="1" ordinal="0"/><dimension size="96" ordinal="1"/><dimension size="96" ordinal="2"/></dimensions>
</outputTensor></outputTensors></network></networks></dnnParams>"""


def _export_dir(root: Path) -> Path:
    """What the export stage leaves for package: the MCTQ file (opaque here) and its contract."""
    from picosam_pipeline.stages.export import CONTRACT_FILE, MCTQ_FILE

    folder = root / "export"
    folder.mkdir()
    (folder / MCTQ_FILE).write_bytes(b"onnx")
    (folder / CONTRACT_FILE).write_text(json.dumps({
        "network": "picosam_int8", "student": "picosam3", "tpc_version": "4.0", "method": "ptq",
        "input": {"shape": ["batch", 3, 96, 96], "summary": "float32 (batch, 3, 96, 96) RGB in [0, 1], NCHW",
                  "normalization": {"where": "in_graph", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        "output": {"summary": "float32 (batch, 1, 96, 96) mask logits; mask = logit > 0", "quantization_step": 0.125}}))
    return folder


def _fake_converter(monkeypatch, *, input_format: str = "unsigned", input_scale: float = 1 / 256):
    """Replace Java check and converter by what they leave behind for a network that fits (3.8 of 8 MB)."""
    from picosam_pipeline.deploy import imx500

    java = imx500.JavaInfo("/usr/bin/java", "17.0.15", 17)

    def convert(onnx_path, out_dir, **kwargs):
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "packerOut.zip").write_bytes(b"PK-packer")
        (out / "dnnParams.xml").write_text(DNN_PARAMS.format(scale=input_scale, fmt=input_format))
        report = imx500.MemoryReport("picosam_int8", 3844000, 8388480, 2403424, 1439552, 3844000 / 8388480, True, True)
        return imx500.Conversion(out / "packerOut.zip", report, 42.0, java, {"nodes": 175, "ops": {}})

    monkeypatch.setattr(imx500, "check_java", lambda: java)
    monkeypatch.setattr(imx500, "convert", convert)


def _package_config(root: Path):
    from picosam_pipeline.config import load_config

    return load_config(None, [f"package.export_dir={root / 'export'}", f"package.out_dir={root / 'package'}",
                              f"runtime.metrics_dir={root / 'metrics'}"])


def test_package_stage_writes_the_deploy_folder_and_memory_metrics(tmp_path, monkeypatch):
    from picosam_pipeline.stages import package

    _export_dir(tmp_path)
    _fake_converter(monkeypatch)
    summary = package.run(_package_config(tmp_path), None)
    assert summary == {"fits": True, "used_bytes": 3844000, "available_bytes": 8388480, "utilization": 0.458,
                       "converter_seconds": 42.0}
    folder = tmp_path / "package" / "deploy"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "crops.py", "deploy.py", "packerOut.zip",
                                                        "picosam_imx500_demo.py", "picosam_int8.json"]
    assert (folder / "packerOut.zip").read_bytes() == b"PK-packer"
    readme = (folder / "README.md").read_text()
    assert "$" not in readme and "imx500-package -i packerOut.zip -o ." in readme
    assert "3,844,000 of 8,388,480 bytes (46%)" in readme and "picosam3" in readme
    metrics = json.loads((tmp_path / "metrics" / "package.json").read_text())
    assert metrics["fits"] and metrics["memory"]["used_bytes"] == 3844000 and metrics["converter"]["java"] == "17.0.15"
    assert metrics["tensors"]["inputs"][0]["scale"] == 1 / 256


def test_package_stage_refuses_a_network_that_does_not_read_camera_rgb(tmp_path, monkeypatch):
    from picosam_pipeline.stages import package

    _export_dir(tmp_path)
    _fake_converter(monkeypatch, input_format="signed", input_scale=1 / 32)  # e.g. a model taking normalised input
    with pytest.raises(PipelineError, match="input tensor is 8-bit signed with scale 0.03125.*p / 256"):
        package.run(_package_config(tmp_path), None)
