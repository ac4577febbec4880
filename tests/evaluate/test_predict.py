"""`predict`: prompt -> crop box, crop -> model -> paste back, model files (ONNX, wrong kinds) and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from picosam_pipeline.cli import cli
from picosam_pipeline.data.crops import CropBox, point_box, roi_box
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.predict import (
    OnnxCropModel,
    TorchCropModel,
    crop_rgb,
    load_crop_model,
    predict_image,
    prompt_box,
)
from picosam_pipeline.train.checkpoints import save_checkpoint, save_student
from picosam_pipeline.train.students import build_student

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)
W, H = 120, 80


class ConstantModel:
    """Calls every crop pixel foreground (logit +3) and keeps the inputs it was given."""

    name = "constant"
    input_size = 96

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        self.inputs.append(rgb)
        return np.full((len(rgb), 1, 96, 96), 3.0, dtype=np.float32)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _box_mask(box: CropBox) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[box.y1 : box.y2, box.x1 : box.x2] = True
    return mask


# --------------------------------------------------------------------------------------------------
# prompt -> crop -> model -> image frame


def test_box_prompt_crops_the_padded_roi_and_pastes_back_into_it(pixels):
    model = ConstantModel()
    pred = predict_image(model, pixels, box=(30, 20, 20, 10))
    expected, _ = roi_box((30, 20, 20, 10), W, H, 0.1)
    assert pred.crop_box == expected and pred.notes == []
    np.testing.assert_array_equal(pred.mask, _box_mask(expected))  # all-foreground crop = exactly the crop box
    # the model saw the bilinear crop of that box, channels first, in [0, 1]
    (seen,) = model.inputs
    assert seen.shape == (1, 3, 96, 96) and seen.dtype == np.float32
    np.testing.assert_allclose(seen[0], np.moveaxis(crop_rgb(pixels, expected, 96), -1, 0) / 255.0)


def test_point_prompt_uses_the_picosam2_window_clipped_at_the_border(pixels):
    pred = predict_image(ConstantModel(), pixels, point=(110, 75))
    assert pred.crop_box == point_box(110, 75, W, H, 96) == CropBox(62, 27, 120, 80)
    np.testing.assert_array_equal(pred.mask, _box_mask(pred.crop_box))


def test_prompts_outside_the_image_are_errors_and_overhanging_boxes_are_clipped():
    box, notes = prompt_box(W, H, box=(-10, 50, 40, 60))
    assert box == roi_box((0, 50, 30, 30), W, H, 0.1)[0] and notes == ["box clipped to the image: 0,50,30,30"]
    for kwargs, message in [
        ({"box": (130, 10, 20, 20)}, "lies outside the 120x80"),
        ({"box": (10, 10, 0, 20)}, "width and height must be positive"),
        ({"point": (5, 80)}, "lies outside the 120x80"),
        ({"point": (5, 5), "box": (1, 1, 5, 5)}, "exactly one prompt"),
        ({}, "exactly one prompt"),
    ]:
        with pytest.raises(PipelineError, match=message):
            prompt_box(W, H, **kwargs)


# --------------------------------------------------------------------------------------------------
# model files


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_student("picosam2").eval()
    with torch.no_grad():  # BN statistics away from 0/1 so a normalisation mistake shows in the logits
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _export(model: torch.nn.Module, path, dynamic_batch: bool) -> None:
    axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(
        model,
        torch.zeros(1, 3, 96, 96),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes=axes,
        dynamo=False,
    )


@pytest.fixture(scope="module")
def onnx_paths(student, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    paths = {"dynamic": folder / "student.onnx", "fixed": folder / "student_b1.onnx"}
    with pytest.warns(DeprecationWarning):  # the legacy TorchScript exporter; the dynamo one needs onnxscript
        _export(student, paths["dynamic"], dynamic_batch=True)
        _export(student, paths["fixed"], dynamic_batch=False)
    return paths


def test_onnx_model_matches_the_pytorch_student_with_dynamic_or_fixed_batch(student, onnx_paths):
    rgb = np.random.default_rng(1).random((3, 3, 96, 96), dtype=np.float32)
    expected = TorchCropModel(student, CPU, 96, "torch")(rgb)
    for kind, path in onnx_paths.items():
        model = load_crop_model(path, CPU)
        assert isinstance(model, OnnxCropModel) and model.input_size == 96
        assert model.fixed_batch == (None if kind == "dynamic" else 1)
        np.testing.assert_allclose(model(rgb), expected, atol=2e-4, err_msg=kind)


def test_student_checkpoint_loads_as_the_same_model(student, onnx_paths, tmp_path):
    path = save_student(tmp_path / "student.pt", student, {"student": "picosam2", "input_size": 96})
    model = load_crop_model(path, CPU)
    assert isinstance(model, TorchCropModel) and model.input_size == 96
    rgb = np.random.default_rng(2).random((2, 3, 96, 96), dtype=np.float32)
    np.testing.assert_allclose(model(rgb), load_crop_model(onnx_paths["dynamic"], CPU)(rgb), atol=2e-4)


def test_wrong_kinds_of_model_file_are_refused(tmp_path, pixels):
    state = save_checkpoint(tmp_path / "checkpoint.pt", {"w": torch.zeros(1)}, {"kind": "train_state"})
    with pytest.raises(PipelineError, match="expected a 'student' checkpoint"):
        load_crop_model(state, CPU)
    sam_like = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, sam_like)
    with pytest.raises(PipelineError, match="is not a picosam-checkpoint"):
        load_crop_model(sam_like, CPU)
    jpeg = tmp_path / "student.pt"
    Image.fromarray(pixels).save(jpeg, "JPEG")
    with pytest.raises(PipelineError, match="neither a torch checkpoint"):
        load_crop_model(jpeg, CPU)
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(PipelineError, match="not a loadable ONNX model"):
        load_crop_model(garbage, CPU)
    other = tmp_path / "other.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(torch.nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 8, 8), str(other), dynamo=False)
    with pytest.raises(PipelineError, match="is not a PicoSAM student"):
        load_crop_model(other, CPU)
    with pytest.raises(PipelineError, match="does not exist"):
        load_crop_model(tmp_path / "missing.pt", CPU)


# --------------------------------------------------------------------------------------------------
# the command


def test_predict_command_writes_mask_and_overlay_in_the_image_frame(tmp_path, pixels, onnx_paths, student):
    image = tmp_path / "photo.png"
    Image.fromarray(pixels).save(image)
    mask_out, overlay_out = tmp_path / "out" / "mask.png", tmp_path / "out" / "overlay.png"
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            "--model",
            str(onnx_paths["dynamic"]),
            "--image",
            str(image),
            "--box",
            "30,20,20,10",
            "--out",
            str(mask_out),
            "--overlay",
            str(overlay_out),
        ],
    )
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(mask_out))
    assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(overlay_out).size == (W, H)
    # the written mask is the student's logits pasted back: the same as running the PyTorch model directly
    direct = predict_image(TorchCropModel(student, CPU, 96, "torch"), pixels, box=(30, 20, 20, 10))
    assert np.count_nonzero((mask > 0) != direct.mask) <= 2  # ONNX vs torch float noise at the 0 threshold
    assert not (mask > 0)[~_box_mask(direct.crop_box)].any()  # nothing outside the crop box


def test_predict_command_errors_are_one_paragraph(tmp_path, onnx_paths, pixels):
    runner = CliRunner()
    broken = tmp_path / "broken.jpg"
    broken.write_text("<html>404</html>")
    result = runner.invoke(
        cli, ["predict", "--model", str(onnx_paths["dynamic"]), "--image", str(broken), "--point", "3,3"]
    )
    assert result.exit_code == 1 and "Error:" in result.output and "not in any image format" in result.output
    image = tmp_path / "ok.png"
    Image.fromarray(pixels).save(image)
    result = runner.invoke(cli, ["predict", "--model", str(image), "--image", str(image), "--point", "3,3"])
    assert result.exit_code == 1 and "neither a torch checkpoint" in result.output
    result = runner.invoke(
        cli, ["predict", "--model", str(onnx_paths["dynamic"]), "--image", str(image), "--box", "500,5,10,10"]
    )
    assert result.exit_code == 1 and "lies outside" in result.output
    result = runner.invoke(
        cli, ["predict", "--model", str(onnx_paths["dynamic"]), "--image", str(image), "--box", "1,2,3"]
    )
    assert result.exit_code == 2 and "X,Y,W,H" in result.output


def test_predict_command_takes_the_prompt_kind_the_model_recorded(tmp_path, pixels, student):
    image = tmp_path / "ok.png"
    Image.fromarray(pixels).save(image)
    crop = {"convention": "point", "prompt": "point", "paper": "PicoSAM2", "window": 96, "input_size": 96}
    path = save_student(tmp_path / "student_best.pt", student, {"student": "picosam2", "input_size": 96, "crop": crop})
    runner = CliRunner()
    base = ["predict", "--model", str(path), "--image", str(image), "--out", str(tmp_path / "m.png"), "--overlay", ""]
    result = runner.invoke(cli, [*base, "--box", "30,20,20,10"])
    assert (
        result.exit_code == 1 and "trained on PicoSAM2 point crops" in result.output and "--point X,Y" in result.output
    )
    result = runner.invoke(cli, [*base, "--point", "30,20"])
    assert result.exit_code == 0, result.output
    assert "crop box (0, 0, " in result.output  # the recorded 96-px window around the point, clamped at 0
    result = runner.invoke(cli, [*base, "--point", "30,20", "--window", "48"])
    assert result.exit_code == 1 and "trained with window 96" in result.output


# --------------------------------------------------------------------------------------------------
# hostile prompts, outputs and model files (issue 13)


def test_non_finite_and_sub_pixel_prompts_are_refused():
    with pytest.raises(PipelineError, match="every coordinate must be a finite number"):
        prompt_box(W, H, box=(float("nan"), 1.0, 10.0, 10.0))  # NaN passed every bound: the whole image was used
    with pytest.raises(PipelineError, match="every coordinate must be a finite number"):
        prompt_box(W, H, point=(3.0, float("inf")))
    with pytest.raises(PipelineError, match=r"--box 10.2,10.2,0.3,0.3 is smaller than a pixel"):
        prompt_box(W, H, box=(10.2, 10.2, 0.3, 0.3))  # its crop (10, 10, 10, 10) crashed the resampler
    assert prompt_box(W, H, box=(10.2, 10.2, 0.9, 0.9))[0] == CropBox(10, 10, 11, 11)  # one whole pixel: fine


def test_student_with_nan_weights_is_refused_on_load(student, tmp_path):
    state = {name: t.clone() for name, t in student.state_dict().items()}
    name = next(n for n, t in state.items() if t.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    path = save_checkpoint(tmp_path / "student.pt", state, {"kind": "student", "student": "picosam2", "input_size": 96})
    with pytest.raises(PipelineError, match=rf"NaN or infinite weights in 1 of {len(state)} tensors \({name}\)"):
        load_crop_model(path, CPU)


def test_predict_command_refuses_bad_prompts_and_outputs_before_running_the_model(tmp_path, onnx_paths, pixels):
    image = tmp_path / "ok.png"
    Image.fromarray(pixels).save(image)
    base = ["predict", "--model", str(onnx_paths["dynamic"]), "--image", str(image)]
    runner = CliRunner()
    for prompt in (
        ["--box", "nan,1,10,10"],
        ["--box", "1,1,inf,10"],
        ["--point", "nan,3"],
        ["--roi-padding", "nan", "--box", "1,1,10,10"],
    ):
        result = runner.invoke(cli, base + prompt)
        assert result.exit_code == 2 and "finite" in result.output, (prompt, result.output)
    result = runner.invoke(cli, base + ["--box", "10.2,10.2,0.3,0.3"])
    assert result.exit_code == 1 and "smaller than a pixel" in result.output and "Traceback" not in result.output
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    for out, expected in (
        (blocker / "mask.png", "cannot write {out!r}: its folder cannot be made"),
        (tmp_path, "--out: {out!r} is a folder"),
        (tmp_path / "mask.xyz", "cannot write {out!r}: predict writes PNG files and .xyz is not .png"),
        (image, "--out: {out!r} is the input --image"),
        (blocker, "--out: {out!r} exists and is not a PNG written by predict"),
    ):
        result = runner.invoke(cli, base + ["--point", "3,3", "--out", str(out), "--overlay", ""])
        assert result.exit_code == 1 and expected.format(out=str(out)) in result.output, result.output
    result = runner.invoke(
        cli, base + ["--point", "3,3", "--out", str(tmp_path / "m.png"), "--overlay", str(blocker / "o.png")]
    )
    assert result.exit_code == 1 and not (tmp_path / "m.png").exists()  # checked before anything is written
