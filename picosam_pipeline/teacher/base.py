"""What a segmentation teacher is to the pipeline: the :class:`Teacher` interface and its output.

A :class:`Teacher` encodes an image once (:meth:`~Teacher.set_image`) and then decodes every instance prompt
of that image -- boxes for the PicoSAM3 ROI convention, positive points for PicoSAM2 -- returning one
:class:`TeacherOutput`: soft logits over the WHOLE image plus a confidence per instance. Mapping those logits
into each instance's crop frame is :mod:`geometry`'s job, so a teacher knows nothing about crops.

The implementations: SAM2 batched on the device (``sam2_batched.py``), through the ``sam2`` predictor
(``sam2_predictor.py``) and in ONNX Runtime (``sam2_onnx.py``); SAM3's two prompt paths (``sam3_teacher.py``).
``build.py`` picks one from the config; ``weights.py`` is how all of them get their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


class RandomWeightsWarning(UserWarning):
    """The teacher runs with random weights: its logits are noise, fine for smoke tests only."""


@dataclass
class TeacherOutput:
    """Teacher predictions for the N prompts of one image.

    Attributes:
        image_logits: ``(N, h, w)`` float32 mask logits covering the whole image ``[0, W] x [0, H]``,
            stretched (cell ``(r, c)`` centred at ``((c + .5) W/w, (r + .5) H/h)``). SAM2: ``h = w = 256``
            low-resolution logits clamped to +-32; SAM3's geometric path: ``h, w = H, W``, within +-16.12; SAM3's
            instance path: ``h = w = 288``, clamped to +-32.
        confidence: ``(N,)`` float32 in [0, 1]: the predicted IoU of the kept mask (SAM2, SAM3 instance path), or
            the kept query's score (SAM3 geometric path).
    """

    image_logits: torch.Tensor
    confidence: torch.Tensor

    @classmethod
    def concat(cls, parts: list[TeacherOutput]) -> TeacherOutput:
        """The outputs of consecutive prompt runs of one image as one output (a single part as it is)."""
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.image_logits for p in parts]), torch.cat([p.confidence for p in parts]))


class Teacher(Protocol):
    """What the teacher stage needs from a segmentation teacher."""

    metadata: dict[str, Any]  # model, config, checkpoint + sha256 or "random weights", prompt settings

    def set_image(self, rgb: np.ndarray) -> None:
        """Encode one ``(H, W, 3)`` uint8 RGB image; every later prediction refers to it."""

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> TeacherOutput:
        """Decode ``(N, 4)`` float ``(x1, y1, x2, y2)`` image-pixel boxes, one instance each."""

    def predict_points(self, points_xy: np.ndarray) -> TeacherOutput:
        """Decode ``(N, 2)`` float ``(x, y)`` image-pixel positive points, one instance each."""

    def predict_images(
        self,
        images: list[torch.Tensor],
        prompts: list[np.ndarray],
        prompt: str,
        segments: list[list[int]] | None = None,
    ) -> list[TeacherOutput]:
        """The teacher pass's call: ``images`` (``(H_i, W_i, 3)`` uint8 RGB tensors, on any device) with their
        prompts (``(N_i, 4)`` boxes for ``prompt="roi"``, ``(N_i, 2)`` points for ``"point"``) -> one output per
        image, its tensors on the teacher's device. Batched teachers encode several images per forward.
        ``segments[i]``: lengths of runs of image ``i``'s prompts (one per store shard) decoded in calls of their
        own where the results must not depend on how the pass groups shards (see ``Sam2Teacher``)."""


class OneImageAtATime:
    """:meth:`Teacher.predict_images` for teachers that hold one encoded image at a time (ONNX Runtime, the SAM2
    predictor): ``set_image``, then one prompt call per segment of the image."""

    def predict_images(
        self,
        images: list[torch.Tensor],
        prompts: list[np.ndarray],
        prompt: str,
        segments: list[list[int]] | None = None,
    ) -> list[TeacherOutput]:
        outputs = []
        for i, (image, image_prompts) in enumerate(zip(images, prompts)):
            self.set_image(image.cpu().numpy())
            parts = []
            for start, stop in runs(segments[i] if segments else [len(image_prompts)]):
                chunk = image_prompts[start:stop]
                parts.append(self.predict_boxes(chunk) if prompt == "roi" else self.predict_points(chunk))
            outputs.append(TeacherOutput.concat(parts))
        return outputs


def runs(lengths: list[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive runs of the given lengths."""
    ends = np.cumsum(lengths).tolist()
    return list(zip([0] + ends[:-1], ends))


def check_rgb(rgb: np.ndarray) -> None:
    """Raise ValueError unless ``rgb`` is an ``(H, W, 3)`` uint8 array."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {got}")


def as_rows(values: np.ndarray, width: int, name: str) -> np.ndarray:
    """``values`` as an ``(N, width)`` float32 array (ValueError naming ``name`` otherwise)."""
    rows = np.asarray(values, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != width:
        raise ValueError(f"{name} must have shape (N, {width}), got {rows.shape}")
    return rows
