"""SAM2 in ONNX Runtime (``teacher.backend: onnxruntime``): export and its cache, parity with PyTorch (features,
logits, mask decisions, stored bytes), the stage and verify-logits across backends, and bad inputs.

SAM2.1-tiny with seeded random weights; one export (~30 s on 2 cores) shared by the module.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.data.images import load_image
from picosam_pipeline.device import Runtime, resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages import teacher_logits
from picosam_pipeline.teacher import sam2_onnx
from picosam_pipeline.teacher.sam2_batched import Sam2Teacher
from picosam_pipeline.teacher.sam2_onnx import OrtSam2Teacher, check_export, export_teacher
from picosam_pipeline.teacher.store import open_store
from tests.helpers.paths import shared_data_or_skip
from tests.helpers.teacher_project import config, tiny_project

pytestmark = pytest.mark.slow
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)
# Stated tolerances (random weights: |logit| <= ~0.4, so these are absolute float32 noise bounds).
FEATURE_TOL, LOGIT_TOL, CONFIDENCE_TOL = 1e-4, 1e-4, 1e-5


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """``(cfg, torch teacher, onnxruntime teacher)`` for SAM2.1-tiny with random weights from seed 0."""
    onnx_dir = tmp_path_factory.mktemp("onnx")
    cfg = TeacherConfig(checkpoint=None, allow_random_weights=True, backend="onnxruntime", onnx_dir=str(onnx_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort_teacher = OrtSam2Teacher.build(cfg, CPU)
        torch_teacher = Sam2Teacher.build(dataclasses.replace(cfg, backend="torch"), CPU)
    return cfg, torch_teacher, ort_teacher


def sample_image(tmp_path_factory) -> np.ndarray:
    from picosam_pipeline.config import SampleConfig
    from picosam_pipeline.data.sample import generate

    root = tmp_path_factory.mktemp("sample")
    generate(SampleConfig(out_dir=str(root), train_images=1, val_images=1, plant_bad_inputs=False))
    return load_image(next((root / "val").glob("*.jpg"))).pixels


def compare(torch_teacher, ort_teacher, rgb: np.ndarray, boxes: np.ndarray, points: np.ndarray) -> dict[str, float]:
    """Worst differences between the two backends on one image, for box and point prompts."""
    out = {}
    for name, teacher in (("torch", torch_teacher), ("ort", ort_teacher)):
        teacher.set_image(rgb)
        out[name] = (teacher.predict_boxes(boxes), teacher.predict_points(points))
    logit_diff = conf_diff = 0.0
    pixels = flips = 0
    for a, b in zip(out["torch"], out["ort"]):
        logit_diff = max(logit_diff, float((a.image_logits - b.image_logits).abs().max()))
        conf_diff = max(conf_diff, float((a.confidence - b.confidence).abs().max()))
        flips += int(((a.image_logits > 0) != (b.image_logits > 0)).sum())
        pixels += a.image_logits.numel()
    return {"logit": logit_diff, "confidence": conf_diff, "agreement": 1.0 - flips / pixels}


def test_encoder_features_match_pytorch(teachers, tmp_path_factory):
    _, torch_teacher, ort_teacher = teachers
    rgb = sample_image(tmp_path_factory)
    torch_teacher.set_image(rgb)
    ort_teacher.set_image(rgb)
    reference = torch_teacher._held[0]  # the encoded image's Sam2Features
    pairs = [
        (reference.image_embed, ort_teacher._features["image_embed"]),
        (reference.high_res[0], ort_teacher._features["high_res_0"]),
        (reference.high_res[1], ort_teacher._features["high_res_1"]),
    ]
    for ref, got in pairs:
        assert tuple(ref.shape) == got.shape
        assert float(np.abs(ref.numpy() - got).max()) < FEATURE_TOL


def test_box_and_point_logits_match_pytorch(teachers, tmp_path_factory, monkeypatch):
    _, torch_teacher, ort_teacher = teachers
    rgb = sample_image(tmp_path_factory)
    h, w = rgb.shape[:2]
    boxes = np.array([[5, 6, w / 2, h / 2], [w / 3, h / 4, w - 1, h - 1], [0, 0, 12, 9]], np.float32)
    points = np.array([[w / 2, h / 2], [3, 4]], np.float32)
    diff = compare(torch_teacher, ort_teacher, rgb, boxes, points)
    assert diff["logit"] < LOGIT_TOL and diff["confidence"] < CONFIDENCE_TOL
    assert diff["agreement"] >= 0.9999
    # one prompt (no batch in the predictor's call) decodes the same as in a batch
    ort_teacher.set_image(rgb)
    single = ort_teacher.predict_boxes(boxes[:1]).image_logits
    np.testing.assert_allclose(single.numpy(), ort_teacher.predict_boxes(boxes).image_logits[:1].numpy(), atol=1e-5)
    assert ort_teacher.predict_points(np.zeros((0, 2), np.float32)).image_logits.shape == (0, 256, 256)
    # many prompts are decoded in runs of decode_batch: the same results
    whole = ort_teacher.predict_boxes(boxes)
    monkeypatch.setattr(ort_teacher, "decode_batch", 2)
    runs = ort_teacher.predict_boxes(boxes)
    np.testing.assert_allclose(runs.image_logits.numpy(), whole.image_logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(runs.confidence.numpy(), whole.confidence.numpy(), atol=1e-6)


def test_parity_on_real_coco_images(teachers):
    """Boxes of the real annotations of two COCO val images from ../shared/data."""
    annotations = shared_data_or_skip("coco-sample", "annotations", "instances_val2017.json")
    _, torch_teacher, ort_teacher = teachers
    data = json.loads(annotations.read_text())
    for image in data["images"][:2]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]][:8]
        rgb = load_image(annotations.parent.parent / "val2017" / image["file_name"]).pixels
        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)], np.float32)
        points = (boxes[:, :2] + boxes[:, 2:]) / 2
        diff = compare(torch_teacher, ort_teacher, rgb, boxes, points)
        assert diff["logit"] < LOGIT_TOL and diff["agreement"] >= 0.9999, (image["file_name"], diff)


def test_the_export_is_cached_and_checked(teachers):
    cfg = teachers[0]
    folder = export_teacher(cfg, CPU)
    manifest = check_export(folder)
    assert manifest["settings"]["weights"] == "random weights, seed 0" and manifest["settings"]["opset"] == 17
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert export_teacher(cfg, CPU) == folder  # found, checked, not exported again
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    # another seed is another export folder
    assert sam2_onnx.export_dir(cfg, 1) != folder


def test_a_changed_onnx_file_is_refused_naming_it(teachers, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(export_teacher(teachers[0], CPU), folder)
    with open(folder / "decoder.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(PipelineError, match=r"decoder.onnx does not match its recorded digest.*export-teacher"):
        check_export(folder)


def test_exporter_failure_and_missing_provider_are_one_paragraph_errors(teachers, tmp_path, monkeypatch):
    cfg = dataclasses.replace(teachers[0], onnx_dir=str(tmp_path / "onnx"))

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with (
        warnings.catch_warnings(),
        pytest.raises(PipelineError, match=r"exporting teacher sam2.1_hiera_tiny to ONNX failed.*backend=torch"),
    ):
        warnings.simplefilter("ignore")
        export_teacher(cfg, CPU)
    assert not list((tmp_path / "onnx").iterdir())  # nothing half-written left behind
    with pytest.raises(
        PipelineError, match=r"teacher.ort_provider=tensorrt needs onnxruntime's TensorrtExecutionProvider"
    ):
        sam2_onnx.session_providers("tensorrt", CPU)
    assert sam2_onnx.session_providers("auto", CPU) == ["CPUExecutionProvider"]


def test_stage_writes_a_store_that_verify_logits_accepts_against_pytorch(tmp_path, monkeypatch):
    """The sample pipeline's teacher stage with each backend: stored bytes differ only by codec rounding, and the
    onnxruntime store passes verify-logits recomputed with PyTorch."""
    sets = tiny_project(tmp_path, 1)
    monkeypatch.chdir(tmp_path)
    stores = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend / "logits.zarr"
        cfg = config(
            tmp_path,
            sets,
            f"teacher.backend={backend}",
            f"teacher.out={out}",
            f"runtime.metrics_dir={out.parent / 'metrics'}",
        )
        teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
        stores[backend] = open_store(out)
    a, b = stores["torch"], stores["onnxruntime"]
    assert b.attrs["teacher"]["build"]["backend"] == "onnxruntime" and a.attrs["teacher"]["build"]["backend"] == "torch"
    recorded = b.attrs["teacher"]["build"]["onnx"]
    assert set(recorded) == {"opset", "encoder.onnx", "decoder.onnx"}
    assert a.attrs["teacher"]["build"]["weights_sha256"] == b.attrs["teacher"]["build"]["weights_sha256"]
    rows = np.arange(a.n_instances)
    raw_a, raw_b = a.read_raw(rows).astype(int), b.read_raw(rows).astype(int)
    assert np.abs(raw_a - raw_b).max() <= 1  # sigmoid_uint8: a one-code difference where rounding differs
    flips = ((raw_a >= 128) != (raw_b >= 128)).mean()
    assert flips <= 1e-4
    result = CliRunner().invoke(
        cli, ["verify-logits", str(b.path), "--sample", "4", "--device", "cpu", "--backend", "torch"]
    )
    assert result.exit_code == 0, result.output
    assert "backend torch; the store was made with onnxruntime" in result.output and "OK" in result.output
    result = CliRunner().invoke(cli, ["verify-logits", str(b.path), "--sample", "4", "--device", "cpu"])
    assert result.exit_code == 0 and "100.00%" in result.output, result.output


def test_export_teacher_command_prints_the_files(teachers, tmp_path):
    cfg = teachers[0]
    params = tmp_path / "params.yaml"
    params.write_text(
        "teacher:\n  checkpoint: null\n  allow_random_weights: true\n"
        f"  backend: onnxruntime\n  onnx_dir: {cfg.onnx_dir}\n"
    )
    result = CliRunner().invoke(cli, ["export-teacher", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert (
        "random weights, seed 0" in result.output
        and "encoder.onnx" in result.output
        and "decoder.onnx" in result.output
    )


def test_sam3_is_refused_for_the_onnxruntime_backend():
    with pytest.raises(Exception, match="onnxruntime runs SAM2 / SAM2.1 teachers only"):
        TeacherConfig(model="sam3", backend="onnxruntime").validate("teacher")
