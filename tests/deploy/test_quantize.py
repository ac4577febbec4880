"""MCT INT8 quantisation with the input normalisation in the graph (``deploy/quantize.py``, ``stages/quantize.py``).

The unit tests quantise a small camera-input network (the students' operators: depthwise and pointwise
convs with BatchNorm, a stride-2 conv, nearest upsampling, an added skip, a logit head) in seconds; the stage
test quantises a real PicoSAM2 (random weights) on the built-in sample's shards.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from picosam_pipeline.deploy.quantize import (
    RgbModel,
    camera_input_model,
    normalization_conv,
    quantize,
    quantized_weight_bytes,
    representative_batches,
    target_platform,
)
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.train.students import NORMALIZATION, build_student, folded_int8_bytes, normalize
from tests.helpers.tiny_models import SIZE, TinyStudent, tiny_camera_model


@pytest.fixture(scope="module")
def models():
    model = tiny_camera_model()
    return model, quantize(model, [torch.rand(8, 3, SIZE, SIZE) for _ in range(2)], tpc_version="4.0")


# --------------------------------------------------------------------------------------------------
# the camera-input model


def test_normalization_conv_is_imagenet_normalize():
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(normalization_conv()(x), normalize(x), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in normalization_conv().parameters())


def test_camera_input_model_equals_student_on_normalized_input():
    torch.manual_seed(1)
    student = build_student("picosam3").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(camera_input_model(student)(x), student(normalize(x)), rtol=1e-4, atol=1e-5)


def test_camera_input_model_takes_normalization_from_checkpoint_meta():
    meta = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    conv = camera_input_model(TinyStudent(), meta).normalize
    assert conv.weight.flatten().tolist() == [4.0, 4.0, 4.0] and conv.bias.tolist() == [-2.0, -2.0, -2.0]
    default = camera_input_model(TinyStudent()).normalize
    torch.testing.assert_close(default.bias, -torch.tensor(NORMALIZATION.mean) / torch.tensor(NORMALIZATION.std))


# --------------------------------------------------------------------------------------------------
# MCT


def test_int8_model_tracks_the_float_model(models):
    model, int8 = models
    rgb = torch.rand(6, 3, SIZE, SIZE).numpy()
    f, q = RgbModel(model, "float", SIZE)(rgb), RgbModel(int8, "int8", SIZE)(rgb)
    assert q.shape == f.shape == (6, 1, SIZE, SIZE) and q.dtype == np.float32
    assert np.mean((f > 0) == (q > 0)) > 0.97
    assert np.abs(f - q).max() < 0.1 * np.abs(f).max()
    assert not np.array_equal(f, q)  # quantised, not the float model passed through


def test_weights_are_int8_per_output_channel(models):
    from mct_quantizers import PytorchQuantizationWrapper

    model, int8 = models
    wrappers = [m for m in int8.modules() if isinstance(m, PytorchQuantizationWrapper)]
    assert len(wrappers) == sum(isinstance(m, nn.Conv2d) for m in model.modules())  # normalize conv included
    for wrapper in wrappers:
        weight = wrapper.weights_quantizers["weight"](wrapper.layer.weight).detach()
        assert all(torch.unique(channel).numel() <= 256 for channel in weight.flatten(1))


def test_weight_bytes_match_the_students_size_helper(models):
    model, int8 = models
    # BN folded into the convs; MCT also gives the bias- and BN-free stride-2 conv a (zero) bias.
    assert quantized_weight_bytes(int8) == folded_int8_bytes(model) + 4 * model.student.down.out_channels


@pytest.mark.slow  # MCT's GPTQ: Hessians on the CPU
def test_gptq_runs_when_asked():
    model = tiny_camera_model(seed=2)
    int8 = quantize(model, [torch.rand(4, 3, SIZE, SIZE)], gptq_epochs=1)  # one small batch: the Hessians are slow
    rgb = torch.rand(4, 3, SIZE, SIZE).numpy()
    f, q = RgbModel(model, "float", SIZE)(rgb), RgbModel(int8, "gptq", SIZE)(rgb)
    assert np.mean((f > 0) == (q > 0)) > 0.97 and not np.array_equal(f, q)


def test_representative_batches_takes_the_first_n_images():
    batches = ({"image": torch.full((2, 3, 4, 4), float(i)), "gt_mask": None} for i in range(5))
    taken = representative_batches(batches, 3)
    assert [float(b[0, 0, 0, 0]) for b in taken] == [0.0, 1.0, 2.0]
    assert len(representative_batches(iter([{"image": torch.zeros(1, 3, 4, 4)}]), 3)) == 1
    with pytest.raises(PipelineError, match="yielded no batch"):
        representative_batches(iter([]), 3)


def test_unknown_target_platform_version_lists_the_known_ones():
    with pytest.raises(PipelineError, match=r"quantize.tpc_version: .*'9.9'.*4\.0"):
        target_platform("9.9")


# --------------------------------------------------------------------------------------------------
# the stage


@pytest.fixture(scope="module")
def quantized_stage(sample_inputs, sample_shards, sample_student, tmp_path_factory):
    """The quantize stage on the sample's shards, for a random PicoSAM2 whose masks cover about half a crop (the
    session's shards and student, read-only; the stage writes into this module's folder)."""
    from picosam_pipeline.config import QuantizeConfig
    from picosam_pipeline.device import Runtime
    from picosam_pipeline.stages import quantize as quantize_stage
    from tests.helpers.pipeline_inputs import elsewhere

    root = tmp_path_factory.mktemp("quantize_stage")
    cfg = elsewhere(sample_inputs, root)
    checkpoint = sample_student
    cfg = dataclasses.replace(
        cfg,
        quantize=QuantizeConfig(
            checkpoint=str(checkpoint),
            train_shards=str(sample_shards / "train"),
            val_shards=str(sample_shards / "val"),
            index=cfg.pack.index,
            representative_batches=2,
            batch_size=4,
            probe_samples=4,
            out_dir=str(root / "quantize"),
        ),
    )
    summary = quantize_stage.run(cfg, Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0))
    headline = json.loads((Path(cfg.runtime.metrics_dir) / "quantize.json").read_text())
    details = json.loads((Path(cfg.quantize.out_dir) / "report.json").read_text())["metrics"]
    # metrics/quantize.json: the headline only, INT8 and its drop from float, taken from the details
    assert headline == {
        "int8_crop_miou": details["int8"]["crop_miou"],
        "crop_miou_drop": details["float"]["crop_miou"] - details["int8"]["crop_miou"],
        "int8_within_target": details["int8_within_target"],
    }
    plot = (Path(cfg.quantize.out_dir) / "plots" / "by_size.csv").read_text().splitlines()
    assert plot[0] == "size,model,crop_miou,samples" and {line.split(",")[1] for line in plot[1:]} == {
        "student",
        "student_int8",
    }
    return cfg, summary, details


@pytest.mark.slow  # quantized_stage: MCT on a real PicoSAM2
def test_stage_scores_float_and_int8_side_by_side(quantized_stage):
    cfg, summary, metrics = quantized_stage
    assert metrics["student"] == "picosam2" and metrics["method"] == "ptq" and metrics["representative_samples"] == 8
    for name in ("crop_miou", "crop_success_map_50_95", "full_image_miou"):
        assert 0 < metrics["float"][name] <= 1 and 0 < metrics["int8"][name] <= 1
        assert metrics["delta"][name] == pytest.approx(metrics["int8"][name] - metrics["float"][name])
    assert metrics["mask_pixel_agreement"] > 0.9
    assert metrics["int8_within_target"] == (metrics["float"]["crop_miou"] - metrics["int8"]["crop_miou"] <= 0.01)
    assert summary["int8_crop_miou"] == round(metrics["int8"]["crop_miou"], 4)
    report = json.loads((Path(cfg.quantize.out_dir) / "report.json").read_text())
    assert report["evaluation"]["student"]["crop_miou"] == metrics["float"]["crop_miou"]  # evaluate's own report


@pytest.mark.slow  # quantized_stage: MCT on a real PicoSAM2
def test_stage_reports_int8_weight_bytes_beside_the_papers(quantized_stage):
    _, _, metrics = quantized_stage
    weights = metrics["weights"]
    model = camera_input_model(build_student("picosam2"))
    assert weights["int8_bytes"] == folded_int8_bytes(model) and weights["params"] == 1_262_818 + 6
    assert weights["int8_bytes_in_model"] == weights["int8_bytes"] + 4 * (
        48 + 96 + 160 + 256
    )  # zero biases of down1..4
    assert weights["published_int8_mb"] == 1.22


@pytest.mark.slow  # quantized_stage: MCT on a real PicoSAM2
def test_stage_serialises_the_int8_model_for_export(quantized_stage):
    from picosam_pipeline.deploy.onnx_export import graph_io
    from picosam_pipeline.evaluate.onnx_runtime import is_mctq

    cfg, _, _ = quantized_stage
    out = Path(cfg.quantize.out_dir)
    assert is_mctq(out / "quantized_mctq.onnx") and not is_mctq(out / "quantized_fakequant.onnx")
    assert graph_io(out / "quantized_mctq.onnx")[0][0].shape == ("batch", 3, 96, 96)
    with np.load(out / "probe.npz") as probe:
        assert probe["rgb"].shape == (4, 3, 96, 96) and 0 <= probe["rgb"].min() and probe["rgb"].max() <= 1
        assert probe["int8_logits"].shape == probe["float_logits"].shape == (4, 1, 96, 96)
    # Runners read this to feed RGB in [0, 1] as it is (the normalisation is the graph's first op).
    from picosam_pipeline.evaluate.predict import OnnxCropModel

    assert OnnxCropModel(out / "quantized_fakequant.onnx").normalizes_input
    # The student here records no crop convention: the val shards' (ROI) goes with the model, in both files.
    from picosam_pipeline.train.shards import read_shard_index

    crop = read_shard_index(cfg.quantize.val_shards).crop
    assert json.loads((out / "report.json").read_text())["crop"] == crop and crop["convention"] == "roi"
    assert (
        OnnxCropModel(out / "quantized_fakequant.onnx").crop == OnnxCropModel(out / "quantized_mctq.onnx").crop == crop
    )


@pytest.mark.slow  # quantized_stage: MCT on a real PicoSAM2
def test_stage_refuses_a_student_trained_on_other_crops(quantized_stage, tmp_path):
    from picosam_pipeline.device import Runtime
    from picosam_pipeline.stages import quantize as quantize_stage
    from picosam_pipeline.train.checkpoints import load_checkpoint, save_checkpoint

    cfg, _, _ = quantized_stage
    tensors, meta = load_checkpoint(cfg.quantize.checkpoint, kind="student")
    point = {"convention": "point", "prompt": "point", "paper": "PicoSAM2", "window": 96, "input_size": 96}
    other = save_checkpoint(tmp_path / "point.pt", tensors, {**meta, "crop": point})
    cfg = dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, checkpoint=str(other)))
    with pytest.raises(
        PipelineError,
        match=r"holds roi crops, but quantize.checkpoint \(.*point.pt\) needs point crops .*; quantise it",
    ):
        quantize_stage.run(cfg, Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0))


@pytest.mark.slow  # quantized_stage: MCT on a real PicoSAM2
def test_stage_names_a_missing_checkpoint(quantized_stage, tmp_path):
    from picosam_pipeline.stages import quantize as quantize_stage

    cfg, _, _ = quantized_stage
    cfg = dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, checkpoint=str(tmp_path / "none.pt")))
    with pytest.raises(PipelineError, match="quantize.checkpoint"):
        quantize_stage.run(cfg, None)
