"""Run a trained student on crops and on whole images: the ``predict`` command and the evaluators' model runners.

A :class:`CropModel` maps a batch of RGB crops to mask logits, whatever the model file::

    model = load_crop_model("data/train/student.pt", runtime)   # or an exported .onnx (onnxruntime)
    logits = model(rgb)      # rgb: float32 (B, 3, S, S) RGB in [0, 1]  ->  float32 (B, 1, S, S) logits (mask = > 0)

Both kinds take the crop *before* ImageNet normalisation and normalise it themselves, because the
published students keep the normalisation outside the graph (``students.normalize``); an exported ONNX
model therefore expects normalised input, as the PyTorch module does. The exception is the export stage's
INT8 model, which takes the camera's RGB and normalises in its first layer (ONNX metadata
``picosam.input_normalization = in_graph``); it is fed RGB in [0, 1] as it is.

:func:`predict_image` is the whole inference path for one prompt, in the conventions of
``docs/papers.md`` section 1: the crop box comes from ``crops.py`` (PicoSAM3 ROI for a
box, PicoSAM2 96-px window for a point), the crop is resized to ``S x S`` (PIL bilinear, as in training), the
logits are resized back into the crop box and pasted into the image frame (``crop_metrics.paste_crop``).

A model records the crop it was trained on (``crop``: ``crops.crop_convention``; in ``student.pt``'s meta, in the
exported ONNX files' ``picosam.crop`` metadata): :func:`prompt_settings` takes the prompt kind and the crop
parameters from there and refuses the other kind, so a point-trained model is not run on a box crop. It also
records where it comes from (``provenance``: ``student.pt``'s meta, the ONNX files' ``picosam.provenance``), which
:func:`predict_to_files` adds to its notes: a mask from a smoke-test student is said to be one.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from picosam_pipeline.data.crops import CONVENTIONS, CropBox, point_box, roi_box
from picosam_pipeline.data.images import load_image
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.crop_metrics import paste_crop
from picosam_pipeline.provenance import SMOKE_TEST, Provenance
from picosam_pipeline.train.students import NORMALIZATION
from picosam_pipeline.written_paths import absolute, check_output_file

if TYPE_CHECKING:
    import torch

    from picosam_pipeline.device import Runtime

ONNX_SUFFIX = ".onnx"


PREDICT_STAMP = "picosam-pipeline predict"  # the PNG text chunk Software of the files predict writes


class CropModel(Protocol):
    """A student that segments crops: float32 ``(B, 3, S, S)`` RGB in [0, 1] -> float32 ``(B, 1, S, S)`` logits."""

    name: str  # what the model file is, for reports ("checkpoint data/train/student.pt", "onnx ...")
    input_size: int  # S
    crop: dict | None  # the crop convention it was trained on (crops.crop_convention); None = not recorded
    # Also, where recorded: provenance (dict | None), the teachers, dataset and recipe (provenance.Provenance.as_dict)

    def __call__(self, rgb: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------------
# the two kinds of model file


class TorchCropModel:
    """A PyTorch student on ``runtime.device`` (autocast as the runtime says); logits come back as float32 numpy."""

    def __init__(
        self,
        model: torch.nn.Module,
        runtime: Runtime,
        input_size: int,
        name: str,
        crop: dict | None = None,
        provenance: dict | None = None,
    ) -> None:
        self.model = model.to(runtime.device).eval()
        self.runtime = runtime
        self.input_size = input_size
        self.name = name
        self.crop = crop
        self.provenance = provenance

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        from picosam_pipeline.train.students import normalize

        x = torch.as_tensor(rgb, dtype=torch.float32, device=self.runtime.device)
        with torch.inference_mode(), self.runtime.autocast():
            logits = self.model(normalize(x))
        return logits.float().cpu().numpy()


class OnnxCropModel:
    """An exported student (float or fake-quant / INT8 ONNX) run with onnxruntime on the CPU.

    MCT's own export format (custom ``mct_quantizers`` ops) is run with MCT's onnxruntime op library;
    models exported with a fixed batch of 1 (MCT's default) are run one crop at a time.
    """

    def __init__(self, path: str | Path) -> None:
        from picosam_pipeline.evaluate.onnx_runtime import ort_session

        path = Path(path)
        try:
            # The same session the export stage checks with: MCT's op library for MCTQ files, and no graph
            # rewrites, which would move INT8 outputs by a few quantisation steps.
            self.session = ort_session(path)
        except Exception as err:  # onnx raises DecodeError, onnxruntime its own untyped Fail / InvalidProtobuf
            raise PipelineError(
                f"model {str(path)!r} is not a loadable ONNX model ({str(err).strip()[:200]}); "
                "pass a student checkpoint (.pt) or an .onnx file written by the export / quantize stage"
            ) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else None
        if (
            shape is None
            or len(shape) != 4
            or shape[1] != 3
            or not isinstance(shape[2], int)
            or shape[2] != shape[3]
            or inputs[0].type != "tensor(float)"
            or len(outputs) != 1
        ):
            found = [(i.name, i.shape, i.type) for i in inputs]
            raise PipelineError(
                f"ONNX model {str(path)!r} is not a PicoSAM student: expected one float input of shape "
                f"(B, 3, S, S) and one logits output, found inputs {found} and {len(outputs)} output(s)"
            )
        self.input_name = inputs[0].name
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.input_size = shape[2]
        self.name = f"onnx {path}"
        self._mean = np.asarray(NORMALIZATION.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(NORMALIZATION.std, dtype=np.float32).reshape(1, 3, 1, 1)
        # The export stage's INT8 models take camera RGB and normalise inside the graph; they say so in their
        # metadata (deploy/onnx_export.py). Other exports expect normalised input, as the PyTorch module does.
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.normalizes_input = metadata.get("picosam.input_normalization") == "in_graph"
        try:  # the quantize / export stages record the student's crop convention (JSON)
            self.crop = json.loads(metadata["picosam.crop"]) if "picosam.crop" in metadata else None
        except ValueError:
            raise PipelineError(
                f"ONNX model {str(path)!r}: its picosam.crop metadata is not JSON; export it again"
            ) from None
        self.provenance = _json_or_none(metadata.get("picosam.provenance"))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        x = np.asarray(rgb, dtype=np.float32)
        if not self.normalizes_input:
            x = (x - self._mean) / self._std
        if self.fixed_batch is None:
            return self._run(x)
        step = self.fixed_batch
        return np.concatenate([self._run(x[i : i + step]) for i in range(0, len(x), step)])

    def _run(self, x: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})
        return np.asarray(logits, dtype=np.float32).reshape(len(x), 1, self.input_size, self.input_size)


def load_crop_model(path: str | Path, runtime: Runtime) -> CropModel:
    """Open a student checkpoint (torch.save zip, loaded with ``weights_only``) or an ``.onnx`` export.

    Raises:
        PipelineError: missing file, or a file of the wrong kind (an image, a teacher checkpoint, a non-student
            ONNX graph), with what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"model {str(path)!r} does not exist; pass a student checkpoint from the train stage "
            "(data/train/...) or an .onnx file from the export / quantize stage"
        )
    if path.suffix.lower() == ONNX_SUFFIX:
        return OnnxCropModel(path)
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise PipelineError(
            f"model {str(path)!r} is neither a torch checkpoint (a torch.save zip archive) nor an "
            f"{ONNX_SUFFIX} file; pass the student checkpoint written by the train stage or an exported ONNX model"
        )
    from picosam_pipeline.train.checkpoints import load_student

    model, meta = load_student(path)
    size = int(meta.get("input_size", 96))
    return TorchCropModel(model, runtime, size, f"checkpoint {path}", meta.get("crop"), meta.get("provenance"))


def _json_or_none(text: str | None) -> dict | None:
    """A JSON object from ONNX metadata, or None (missing or malformed: provenance is informative, not required)."""
    try:
        found = json.loads(text) if text else None
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def provenance_note(model: CropModel) -> str:
    """predict's note on where ``model`` comes from (:meth:`Provenance.title`), with the smoke-test warning."""
    found = Provenance.from_dict(getattr(model, "provenance", None))
    warning = f" -- {SMOKE_TEST}: its teacher had random weights, this mask means nothing" if found.smoke_test else ""
    return f"model provenance: {found.title()}{warning}"


def prompt_settings(
    model: CropModel,
    *,
    box: tuple[float, ...] | None,
    point: tuple[float, ...] | None,
    roi_padding: float | None = None,
    window: int | None = None,
) -> tuple[float, int, list[str]]:
    """``(roi_padding, window, notes)`` for prompting ``model``: the crop parameters it recorded, else the given
    ones (else PicoSAM3's 0.1 / PicoSAM2's 96).

    Raises:
        PipelineError: the prompt is of the other kind than the model was trained with, or a given crop parameter
            differs from the recorded one (the crop would not be the one the model learned).
    """
    crop = model.crop
    if crop is None:
        notes = [
            "the model does not record its crop convention (not written by this pipeline's train / export "
            "stages): the crop follows the prompt you gave"
        ]
        return (0.1 if roi_padding is None else roi_padding), (96 if window is None else window), notes
    kind, paper = CONVENTIONS[crop["convention"]]
    given = "box" if box is not None else "point"
    if given != kind:
        example = "--box X,Y,W,H" if kind == "box" else "--point X,Y"
        raise PipelineError(
            f"{model.name} was trained on {paper} {crop['convention']} crops, which take a {kind} prompt; "
            f"give {example} instead of --{given}"
        )
    recorded = {"roi_padding": crop.get("roi_padding"), "window": crop.get("window")}
    for key, value in (("roi_padding", roi_padding), ("window", window)):
        if value is not None and recorded[key] is not None and value != recorded[key]:
            raise PipelineError(
                f"--{key.replace('_', '-')} {value}: {model.name} was trained with {key} "
                f"{recorded[key]}; leave the option out to use it"
            )
    return (
        recorded["roi_padding"] if recorded["roi_padding"] is not None else (roi_padding or 0.1),
        recorded["window"] if recorded["window"] is not None else (window or 96),
        [],
    )


# --------------------------------------------------------------------------------------------------
# one image, one prompt


def crop_rgb(pixels: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 image -> ``(size, size, 3)`` uint8 crop of ``box``, PIL bilinear as in the papers.

    The pack stage's resampler, so a crop seen at prediction time is byte-identical to the one trained on.
    """
    from picosam_pipeline.train.shards import resample_window

    return resample_window(pixels, box, size, Image.Resampling.BILINEAR)


def to_model_input(crops: np.ndarray) -> np.ndarray:
    """``(B, S, S, 3)`` uint8 crops -> ``(B, 3, S, S)`` float32 RGB in [0, 1], what a :class:`CropModel` takes."""
    return np.ascontiguousarray(np.moveaxis(crops, -1, 1), dtype=np.float32) / 255.0


@dataclass
class ImagePrediction:
    """The student's answer to one prompt, in both frames.

    ``mask``: ``(H, W)`` bool in the image frame; ``logits``: ``(S, S)`` float32 in the crop frame;
    ``crop_box``: where the crop was cut; ``notes``: adjustments made to the prompt (e.g. a clipped box).
    """

    mask: np.ndarray
    logits: np.ndarray
    crop_box: CropBox
    notes: list[str] = field(default_factory=list)


def prompt_box(
    width: int,
    height: int,
    *,
    box: tuple[float, ...] | None = None,
    point: tuple[float, ...] | None = None,
    roi_padding: float = 0.1,
    window: int = 96,
) -> tuple[CropBox, list[str]]:
    """Crop box of a user prompt: PicoSAM3 ROI of ``box`` ``(x, y, w, h)``, or PicoSAM2 window around ``point``.

    A box reaching past the image border is clipped to it (noted), as prepare does with COCO boxes.

    Raises:
        PipelineError: neither or both prompts, a box with no positive width/height, or a prompt outside the image.
    """
    if (box is None) == (point is None):
        raise PipelineError("give exactly one prompt: --box x,y,w,h (PicoSAM3 ROI) or --point x,y (PicoSAM2 window)")
    values = box if box is not None else point
    if not all(math.isfinite(v) for v in values):  # NaN compares false with every bound below
        raise PipelineError(
            f"--{'box' if box is not None else 'point'} {','.join(f'{v:g}' for v in values)}: "
            "every coordinate must be a finite number of pixels"
        )
    size = f"{width}x{height} (width x height)"
    if point is not None:
        x, y = point
        if not (0 <= x < width and 0 <= y < height):
            raise PipelineError(
                f"--point {x:g},{y:g} lies outside the {size} image; pixel coordinates start at 0,0 top left"
            )
        return point_box(int(x), int(y), width, height, window), []
    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise PipelineError(
            f"--box {x:g},{y:g},{w:g},{h:g}: width and height must be positive (the format is x,y,w,h, COCO style)"
        )
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        raise PipelineError(
            f"--box {x:g},{y:g},{w:g},{h:g} lies outside the {size} image; the format is x,y,w,h "
            "with x,y the top-left corner in pixels"
        )
    notes = []
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        notes.append(f"box clipped to the image: {x1:g},{y1:g},{x2 - x1:g},{y2 - y1:g}")
    crop_box, _ = roi_box((x1, y1, x2 - x1, y2 - y1), width, height, roi_padding)
    if crop_box.x2 <= crop_box.x1 or crop_box.y2 <= crop_box.y1:
        raise PipelineError(
            f"--box {x:g},{y:g},{w:g},{h:g} is smaller than a pixel: its crop {tuple(crop_box)} "
            "(x1, y1, x2, y2) holds no whole pixel; give a box around the object, a few pixels wide at least"
        )
    return crop_box, notes


def predict_image(
    model: CropModel,
    pixels: np.ndarray,
    *,
    box: tuple[float, ...] | None = None,
    point: tuple[float, ...] | None = None,
    roi_padding: float = 0.1,
    window: int = 96,
) -> ImagePrediction:
    """Segment the object a prompt names in an ``(H, W, 3)`` uint8 RGB image: crop -> model -> paste back."""
    height, width = pixels.shape[:2]
    crop_box, notes = prompt_box(width, height, box=box, point=point, roi_padding=roi_padding, window=window)
    crop = crop_rgb(pixels, crop_box, model.input_size)
    logits = model(to_model_input(crop[None]))[0, 0]
    return ImagePrediction(paste_crop(logits, crop_box, (height, width)), logits, crop_box, notes)


def overlay(
    pixels: np.ndarray,
    prediction: ImagePrediction,
    *,
    box: tuple[float, ...] | None = None,
    point: tuple[float, ...] | None = None,
) -> Image.Image:
    """The image with the mask tinted red, the crop box in yellow and the prompt (box or point) in cyan."""
    tint = np.array([255, 40, 40], dtype=np.float32)
    out = pixels.astype(np.float32)
    out[prediction.mask] = 0.5 * out[prediction.mask] + 0.5 * tint
    image = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    x1, y1, x2, y2 = prediction.crop_box
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=(255, 220, 0))
    if box is not None:
        x, y, w, h = box
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=(0, 220, 255), width=2)
    if point is not None:
        x, y = point
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), outline=(0, 220, 255), width=2)
    return image


def predict_to_files(
    model: CropModel,
    image_path: str | Path,
    mask_out: str | Path,
    overlay_out: str | Path | None,
    *,
    box: tuple[float, ...] | None = None,
    point: tuple[float, ...] | None = None,
    roi_padding: float = 0.1,
    window: int = 96,
    model_path: str | Path | None = None,
) -> ImagePrediction:
    """:func:`predict_image` on a file; writes the mask (8-bit PNG, 255 = object) and optionally the overlay PNG.
    The model's provenance is added to the prediction's notes (:func:`provenance_note`).

    Neither output may be an input (the image, ``model_path``), part of the project or a stage's output, or an
    existing file predict did not write (:func:`picosam_pipeline.written_paths.check_output_file`).

    Raises:
        PipelineError: unreadable image (``images.BadImageError``), bad prompt.
    """
    outputs = [Path(mask_out)] + ([Path(overlay_out)] if overlay_out is not None else [])
    options = ["--out", "--overlay"]
    if overlay_out is not None and absolute(mask_out) == absolute(overlay_out):
        raise PipelineError(f"--out and --overlay both name {str(mask_out)!r}; give them different file names")
    for option, path in zip(options, outputs):  # before the model runs: a typo in --out must not cost the work
        check_output_file(
            "predict",
            option,
            path,
            inputs={"--image": image_path, "--model": model_path},
            recognise=_written_by_predict,
            what="PNG",
        )
        _check_writable(path)
    pixels = load_image(image_path).pixels
    prediction = predict_image(model, pixels, box=box, point=point, roi_padding=roi_padding, window=window)
    images = [Image.fromarray(prediction.mask.astype(np.uint8) * 255)]
    if overlay_out is not None:
        images.append(overlay(pixels, prediction, box=box, point=point))
    stamp = PngInfo()
    stamp.add_text("Software", PREDICT_STAMP)  # how a rerun recognises the file as its own to replace
    for path, image in zip(outputs, images):
        try:
            image.save(path, format="PNG", pnginfo=stamp)
        except OSError as err:  # e.g. the disk filled up between the check and the write
            raise PipelineError(
                f"cannot write {str(path)!r}: {err.strerror or err}; choose another --out / --overlay"
            ) from None
    prediction.notes.append(provenance_note(model))
    return prediction


def _written_by_predict(path: Path) -> bool:
    """Whether ``path`` is a PNG that predict wrote (its ``Software`` text chunk)."""
    try:
        with Image.open(path) as image:  # reads the header chunks only
            return image.format == "PNG" and image.info.get("Software") == PREDICT_STAMP
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _check_writable(path: Path) -> None:
    """Raise :class:`PipelineError` unless ``path`` can be written as a PNG: a .png name, a folder that exists or can
    be made, write permission, and not a folder itself."""
    if path.is_dir():
        raise PipelineError(f"cannot write {str(path)!r}: it is a folder; give a file name such as {path / 'mask.png'}")
    if path.suffix.lower() != ".png":
        what = f"{path.suffix} is not .png" if path.suffix else "the name has no .png extension"
        raise PipelineError(f"cannot write {str(path)!r}: predict writes PNG files and {what}; name the file .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(
            f"cannot write {str(path)!r}: its folder cannot be made ({err.strerror or err}); "
            "choose another --out / --overlay"
        ) from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PipelineError(f"cannot write {str(path)!r}: no write permission there; choose another --out / --overlay")
