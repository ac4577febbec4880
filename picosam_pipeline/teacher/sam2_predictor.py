"""SAM2 / SAM2.1 (``sam2`` package): the model build shared by every SAM2 teacher, and the predictor-API teacher.

:func:`build_sam2_model` builds the model of ``teacher.model`` with checked or seeded random weights
(``weights.py``); :class:`Sam2PredictorTeacher` runs it through ``sam2.SAM2ImagePredictor``, one image at a time,
the reference the stage's batched path (``sam2_batched.py``) is checked against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from picosam_pipeline.config import SAM2_MODELS, TeacherConfig
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import require_extra
from picosam_pipeline.teacher.base import OneImageAtATime, TeacherOutput, as_rows, check_rgb
from picosam_pipeline.teacher.weights import (
    autocast_name,
    checkpoint_or_none,
    load_checked,
    load_state_dict_safely,
    package_version,
    random_weights,
    seeded_build,
)

_SAM2_SIZES = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


def sam2_config_name(model: str) -> str:
    """The ``sam2`` package's Hydra config for a model name: ``sam2.1_hiera_tiny`` ->
    ``configs/sam2.1/sam2.1_hiera_t.yaml``."""
    if model not in SAM2_MODELS:
        raise ValueError(f"not a SAM2 model name: {model!r}; expected one of {SAM2_MODELS}")
    family, _, size = model.partition("_hiera_")
    return f"configs/{family}/{family}_hiera_{_SAM2_SIZES[size]}.yaml"


def build_sam2_model(cfg: TeacherConfig, runtime: Runtime) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The SAM2 / SAM2.1 model of ``cfg.model`` on ``runtime.device`` in eval mode, plus its metadata.

    Raises:
        PipelineError: the teacher extra is missing, or the checkpoint is missing (and random weights are not
            allowed), unsafe or not matching the model.
    """
    require_extra("teacher", f"teacher.model={cfg.model}")
    from sam2.build_sam import build_sam2

    config_name = sam2_config_name(cfg.model)
    checkpoint = checkpoint_or_none(cfg, runtime.seed)  # fail fast, before the model is built
    state_dict = load_state_dict_safely(checkpoint) if checkpoint else None
    # build_sam2 loads nothing when ckpt_path is None; the checked state dict is loaded below.
    # apply_postprocessing=True (its default, as PicoSAM used it): with multimask_output=False SAM2 falls
    # back to the best of its 3 masks when the single mask is unstable.
    model = seeded_build(lambda: build_sam2(config_name, ckpt_path=None, device="cpu", mode="eval"), runtime.seed)
    if checkpoint is None:
        weights = random_weights(model, runtime.seed)
    else:
        weights = load_checked(model, state_dict, set(model.state_dict()), checkpoint, cfg.model)
    model.to(runtime.device)
    metadata = {
        "teacher": "sam2",
        "backend": "torch",
        "model": cfg.model,
        "config": config_name,
        "package": f"sam2 {package_version('sam2')}",
        **weights,
        "prompt": cfg.prompt,
        "multimask_output": cfg.multimask_output,
        "mask_selection": "highest predicted IoU" if cfg.multimask_output else "single mask (stability fallback on)",
        "logits": "256x256 low-res mask logits over the whole image (stretched), clamped to +-32",
        "autocast": autocast_name(runtime),
    }
    return model, metadata


class Sam2PredictorTeacher(OneImageAtATime):
    """SAM2 / SAM2.1 through ``sam2.SAM2ImagePredictor``: the reference the stage's own path is checked against.

    The stage runs :class:`picosam_pipeline.teacher.sam2_batched.Sam2Teacher` (several images per encoder
    forward, everything on the device); this class is the predictor API, one image at a time, kept as the
    independent implementation that the parity tests and ``bench/teacher_gpu.py`` compare it with.

    One image-encoder pass per image; the N prompts of the image go through the prompt encoder and mask
    decoder in batched predictor calls of up to ``decode_batch`` prompts (the predictor batches ``(N, 4)``
    boxes and ``(N, 1, 2)`` points by repeating the image embedding per prompt: ~17 MB of fp32 activations per
    prompt, measured, so an LVIS image with hundreds of instances is split rather than decoded in one call).
    With ``multimask_output`` the decoder proposes 3 masks per prompt and the one with the highest predicted
    IoU is kept (as PicoSAM2 and SAM2's own zero-shot evaluation do); its predicted IoU is the confidence.
    The logits are the decoder's 256x256 low-resolution masks, not the masks upsampled to image size.

    On CPUs without bf16 hardware (AVX2 only, as on the CI machine) bf16 autocast is ~30x slower than
    fp32; ``runtime.precision=auto`` already keeps fp32 on CPU.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        runtime: Runtime,
        multimask_output: bool,
        metadata: dict[str, Any],
        decode_batch: int = 32,
    ):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model
        self.predictor = SAM2ImagePredictor(model)
        self.runtime = runtime
        self.multimask_output = multimask_output
        self.metadata = metadata
        self.decode_batch = decode_batch

    @classmethod
    def build(cls, cfg: TeacherConfig, runtime: Runtime) -> Sam2PredictorTeacher:
        model, metadata = build_sam2_model(cfg, runtime)
        return cls(
            model, runtime, cfg.multimask_output, {**metadata, "path": "SAM2ImagePredictor, one image at a time"}
        )

    def set_image(self, rgb: np.ndarray) -> None:
        check_rgb(rgb)
        with torch.inference_mode(), self.runtime.autocast():
            self.predictor.set_image(rgb)

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> TeacherOutput:
        boxes = as_rows(boxes_xyxy, 4, "boxes_xyxy")
        return self._decode(len(boxes), box=boxes)

    def predict_points(self, points_xy: np.ndarray) -> TeacherOutput:
        points = as_rows(points_xy, 2, "points_xy")
        # One single-point prompt per instance: coords (N, 1, 2), label 1 = foreground.
        return self._decode(len(points), point_coords=points[:, None, :], point_labels=np.ones((len(points), 1)))

    def _decode(self, n: int, **prompts: np.ndarray) -> TeacherOutput:
        """Decode ``n`` prompts (arrays with a leading prompt axis) in chunks; keep the best mask of each."""
        logits, confidence = [torch.zeros(0, 256, 256)], [torch.zeros(0)]
        for start in range(0, n, self.decode_batch):
            chunk = {k: v[start : start + self.decode_batch] for k, v in prompts.items()}
            m = len(next(iter(chunk.values())))
            with torch.inference_mode(), self.runtime.autocast():
                # The first output (masks upsampled to image size) is unused; it costs ~1 ms per prompt.
                _, iou, low_res = self.predictor.predict(
                    **chunk, multimask_output=self.multimask_output, return_logits=True
                )
            # predict() squeezes the prompt axis away for a single prompt: restore (m, masks, ...) shapes.
            iou = torch.from_numpy(iou).float().reshape(m, -1)
            low_res = torch.from_numpy(low_res).float().reshape(m, iou.shape[1], *low_res.shape[-2:])
            best = iou.argmax(dim=1)
            rows = torch.arange(m)
            logits.append(low_res[rows, best])
            confidence.append(iou[rows, best])
        return TeacherOutput(torch.cat(logits), torch.cat(confidence))
