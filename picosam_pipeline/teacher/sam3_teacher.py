"""SAM3 teachers (optional ``sam3`` package, 0.1.4): PicoSAM3's geometric prompt path and the SAM-style instance path.

``teacher.sam3_path`` chooses how a box becomes a mask; both encode each image once (``Sam3Processor.set_image``:
resize to 1008x1008 without keeping the aspect ratio, normalise, the 840 M-parameter backbone):

* ``geometric`` (default, PicoSAM3's teacher precompute): the box is a geometric exemplar prompt of the DETR-style
  grounding head (``Sam3Image.forward_grounding``, the call behind ``Sam3Processor.add_geometric_prompt``) with
  the dummy text prompt ``"visual"``; of its 200 queries the one with the highest score
  ``sigmoid(logit) * sigmoid(presence)`` is kept; its mask is resized to the image with the processor's bilinear
  ``interpolate``, turned into probabilities (sigmoid) and back into logits clamped at ``p in [1e-7, 1 - 1e-7]``
  (:func:`probabilities_to_logits`): ``(N, H, W)`` logits within +-16.12, confidence = the kept query's score.
  Each box is its own prompt (N boxes of one exemplar set would be one concept, not N instances), but the boxes of
  an image go through ``forward_grounding`` together, ``decode_batch`` prompts per call (the model's prompt batch:
  ``FindStage.img_ids`` maps every prompt to the one encoded image). What PicoSAM3's per-box loop recomputes is
  done once: the dummy text features (once per teacher; ``reset_all_prompts`` drops them there) and the resize
  (only the kept query's mask, not all 200). Equal to the processor's per-box path bit for bit for one box per
  call (tested); several boxes per call agree to float rounding.
* ``instance``: ``build_sam3_image_model(enable_inst_interactivity=True)``, then ``Sam3Image.predict_inst`` with
  all boxes (or PicoSAM2's positive points) of the image as ``(N, 4)`` / ``(N, 1, 2)`` arrays in one call
  (``decode_batch`` per call): the SAM2-style decoder on SAM3's features, best of 3 masks by predicted IoU
  (``multimask_output``) -> ``(N, 288, 288)`` low-res logits over the whole image (stretched), clamped to +-32;
  confidence = predicted IoU. Its hole filling (``max_hole_area``) touches only the full-size masks this path
  drops, so it is turned off (a connected-components pass per mask on the CPU).

Results do not depend on how a pass groups its work: prompts are decoded in calls that start at every segment
boundary the runner gives (one per store shard) and hold at most ``decode_batch`` prompts, one per call on a CPU
(compute-bound there, so batching gains nothing, and each geometric prompt holds ~1 GB of attention maps). On
CUDA a call that runs out of memory is halved and retried (counted in :attr:`splits`).

Building: :mod:`sam3_compat` (triton stand-in, BPE vocabulary, ``device="cuda"`` mapping, seeded init of the
parameters the package leaves uninitialised). The image most recently encoded is kept with a digest of its pixels,
so asking for the same image again (verify-logits, a dask task that starts on the image the previous one ended
on) reuses it.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.device import Runtime
from picosam_pipeline.teacher import sam3_compat
from picosam_pipeline.teacher.base import TeacherOutput, as_rows, check_rgb, runs
from picosam_pipeline.teacher.weights import (
    autocast_name,
    checkpoint_or_none,
    load_checked,
    load_state_dict_safely,
    package_version,
    random_weights,
)

log = logging.getLogger(__name__)

DUMMY_TEXT = "visual"  # the text prompt Sam3Processor.add_geometric_prompt uses when none was set
INSTANCE_LOW_RES = 288  # predict_inst's low-res mask side (1008 / 14 * 4)

SAM3_PROB_EPS = 1e-7  # PicoSAM3's clamp before probability -> logit: |logit| <= 16.12


def probabilities_to_logits(prob: torch.Tensor, eps: float = SAM3_PROB_EPS) -> torch.Tensor:
    """Mask probabilities in [0, 1] -> float32 logits ``log(p / (1 - p))``, ``p`` clamped to ``[eps, 1 - eps]``.

    SAM3's processor returns sigmoid probabilities (named ``masks_logits``); PicoSAM3 stores them as logits
    after this clamp, so saturated pixels map to +-16.12 instead of +-inf. Computed in float64: in float32
    ``1 - 1e-7`` rounds to ``1 - 1.19e-7`` and the positive bound would come out as 15.94, not 16.12.
    """
    p = prob.double().clamp(eps, 1.0 - eps)
    return (torch.log(p) - torch.log1p(-p)).float()


def build_sam3_teacher(cfg: TeacherConfig, runtime: Runtime) -> Sam3GeometricTeacher | Sam3InstanceTeacher:
    """The SAM3 teacher of ``cfg.sam3_path`` on ``runtime.device``.

    Random weights (no checkpoint, ``allow_random_weights``) are drawn from ``runtime.seed`` on the CPU, so every
    process builds the same model (``metadata["weights_sha256"]``). A checkpoint (``sam3.pt``, the video model)
    gives the image model its ``detector.*`` weights, and the instance path also its ``tracker.*`` ones.

    Raises:
        PipelineError: sam3 or its vocabulary missing, checkpoint missing / unsafe / not matching.
    """
    api = sam3_compat.import_sam3()
    bpe_path, bpe_sha256 = sam3_compat.bpe_vocabulary()
    instance = cfg.sam3_path == "instance"
    checkpoint = checkpoint_or_none(cfg, runtime.seed)
    state_dict = load_state_dict_safely(checkpoint) if checkpoint else None
    model, drawn = sam3_compat.seeded_sam3_build(
        lambda: api.build_sam3_image_model(
            bpe_path=str(bpe_path),
            device="cpu",
            eval_mode=True,
            checkpoint_path=None,
            load_from_HF=False,
            enable_inst_interactivity=instance,
        ),
        runtime.seed,
        runtime.device,
    )
    if checkpoint is None:
        weights = random_weights(model, runtime.seed)
    else:
        # Only parameters must be covered: the image model recomputes some buffers (position encodings) at init.
        mapped = {k.removeprefix("detector."): v for k, v in state_dict.items() if k.startswith("detector.")}
        if instance:
            mapped.update(
                {
                    "inst_interactive_predictor.model." + k.removeprefix("tracker."): v
                    for k, v in state_dict.items()
                    if k.startswith("tracker.")
                }
            )
        weights = load_checked(model, mapped, {k for k, _ in model.named_parameters()}, checkpoint, cfg.model)
    model.to(runtime.device)
    processor = api.Sam3Processor(model, device=str(runtime.device), confidence_threshold=0.0)
    metadata = {
        "teacher": "sam3",
        "backend": "torch",
        "model": "sam3",
        "package": f"sam3 {package_version('sam3')}",
        **weights,
        "initialised_after_build": drawn,  # left uninitialised by the package: drawn from the seed (sam3_compat)
        "bpe_vocabulary_sha256": bpe_sha256,
        "prompt": cfg.prompt,
        "sam3_path": cfg.sam3_path,
        "autocast": autocast_name(runtime),
    }
    cls = Sam3InstanceTeacher if instance else Sam3GeometricTeacher
    return cls(model, processor, api, runtime, cfg, metadata)


class _Sam3Teacher(abc.ABC):
    """What both paths share: one encoded image at a time (cached by pixel digest), prompts decoded in calls that
    respect segment boundaries and ``decode_batch``."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        api: Any,
        runtime: Runtime,
        cfg: TeacherConfig,
        metadata: dict[str, Any],
        decode_batch: int,
    ) -> None:
        self.model = model
        self.processor = processor
        self.api = api
        self.runtime = runtime
        self.device = runtime.device
        self.multimask_output = cfg.multimask_output
        self.metadata = metadata
        self.decode_batch = decode_batch
        self.splits = 0  # calls halved after running out of device memory
        self._state: dict[str, Any] | None = None
        self._key: bytes | None = None
        self._size = (0, 0)  # (W, H) of the held image

    # ----------------------------------------------------------------------------------------------
    # the Teacher protocol

    def predict_images(
        self,
        images: list[torch.Tensor],
        prompts: list[np.ndarray],
        prompt: str,
        segments: list[list[int]] | None = None,
    ) -> list[TeacherOutput]:
        """One encoding per image (pixels stay on their device), then its prompts segment by segment."""
        outputs = []
        for i, (image, image_prompts) in enumerate(zip(images, prompts)):
            self._encode(image)
            rows = as_rows(image_prompts, 4 if prompt == "roi" else 2, "prompts")
            parts = [self._decode_all(rows[a:b], prompt) for a, b in runs(segments[i] if segments else [len(rows)])]
            outputs.append(TeacherOutput.concat(parts))
        return outputs

    def set_image(self, rgb: np.ndarray) -> None:
        check_rgb(rgb)
        self._encode(torch.from_numpy(rgb))

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> TeacherOutput:
        return self._decode_all(as_rows(boxes_xyxy, 4, "boxes_xyxy"), "roi")

    def predict_points(self, points_xy: np.ndarray) -> TeacherOutput:
        return self._decode_all(as_rows(points_xy, 2, "points_xy"), "point")

    # ----------------------------------------------------------------------------------------------

    def _encode(self, image: torch.Tensor) -> None:
        """Encode ``(H, W, 3)`` uint8 RGB (any device) unless it is the image already held."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {tuple(image.shape)}")
        key = (
            hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=16).digest() + repr(tuple(image.shape)).encode()
        )
        if key == self._key:
            return
        self._state, self._key = None, None  # free the previous image's features first
        with self._forward():
            # A (3, H, W) tensor: the processor reads (H, W) from the last two axes and resizes on the device.
            state = self.processor.set_image(image.to(self.device).permute(2, 0, 1))
        self._state, self._key = self._after_encode(state), key
        self._size = (int(image.shape[1]), int(image.shape[0]))

    def _after_encode(self, state: dict[str, Any]) -> dict[str, Any]:
        return state

    @contextlib.contextmanager
    def _forward(self) -> Iterator[None]:
        """Inference mode, the runtime's autocast and, off CUDA, sam3_compat's device mapping; the warning of sam3's
        hard-coded ``autocast(device_type="cuda", enabled=False)`` on a CUDA-less torch is silenced."""
        with (
            warnings.catch_warnings(),
            torch.inference_mode(),
            self.runtime.autocast(),
            sam3_compat.forward_context(self.device),
        ):
            warnings.filterwarnings("ignore", message=r".*CUDA is not available.*", category=UserWarning)
            yield

    def _decode_all(self, rows: np.ndarray, prompt: str) -> TeacherOutput:
        """Decode ``rows`` (prompts of the held image) in calls of at most ``decode_batch``; halve on OOM (CUDA)."""
        if self._state is None:
            raise RuntimeError("call set_image() before predicting")
        logits, confidence, start = [], [], 0
        while start < len(rows):
            stop = min(start + self.decode_batch, len(rows))
            try:
                with self._forward():
                    out = self._decode(rows[start:stop], prompt)
            except torch.OutOfMemoryError:
                if self.decode_batch == 1:
                    raise
                self.splits += 1
                if self.splits == 1:
                    log.warning(
                        "sam3 teacher: out of %s memory decoding %d prompts at once, halving",
                        self.device,
                        self.decode_batch,
                    )
                self.decode_batch //= 2
                torch.cuda.empty_cache()
                continue
            logits.append(out.image_logits)
            confidence.append(out.confidence)
            start = stop
        if not logits:
            return TeacherOutput(
                torch.zeros(0, *self._empty_grid(), device=self.device), torch.zeros(0, device=self.device)
            )
        return TeacherOutput(torch.cat(logits), torch.cat(confidence))

    @abc.abstractmethod
    def _decode(self, rows: np.ndarray, prompt: str) -> TeacherOutput:
        """One decoder call: ``rows`` (``(m, 4)`` boxes or ``(m, 2)`` points of the held image) -> logits,
        confidence."""

    @abc.abstractmethod
    def _empty_grid(self) -> tuple[int, int]:
        """``(h, w)`` of this path's logits for the held image."""


class Sam3GeometricTeacher(_Sam3Teacher):
    """PicoSAM3's path: every box a geometric exemplar prompt of the grounding head (module docstring)."""

    def __init__(self, model, processor, api, runtime, cfg, metadata) -> None:
        super().__init__(
            model,
            processor,
            api,
            runtime,
            cfg,
            {
                **metadata,
                "path": "geometric: Sam3Image.forward_grounding, one box exemplar per prompt, dummy text 'visual'",
                "mask_selection": "highest query score sigmoid(logit) * sigmoid(presence) of 200",
                "logits": "full-resolution probabilities clamped to [1e-7, 1-1e-7], as logits (+-16.12)",
            },
            decode_batch=16 if runtime.device.type == "cuda" else 1,
        )
        # The processor computes these for every box after reset_all_prompts; they do not depend on the image.
        with self._forward():
            self._text = model.backbone.forward_text([DUMMY_TEXT], device=str(self.device))

    def _after_encode(self, state: dict[str, Any]) -> dict[str, Any]:
        state["backbone_out"].update(self._text)
        return state

    def _empty_grid(self) -> tuple[int, int]:
        return self._size[1], self._size[0]

    def _decode(self, rows: np.ndarray, prompt: str) -> TeacherOutput:
        if prompt != "roi":
            raise ValueError("the geometric path takes box prompts only (teacher.sam3_path=instance takes points)")
        width, height = self._size
        m = len(rows)
        x1, y1, x2, y2 = rows.astype(np.float64).T  # the processor's [cx, cy, w, h] / image size, in float64 first
        boxes = np.stack([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height], 1)
        boxes = torch.tensor(boxes, dtype=torch.float32, device=self.device).view(1, m, 4)  # (boxes, prompts, 4)
        zeros = torch.zeros(m, dtype=torch.long, device=self.device)  # every prompt: image 0, text 0
        find = self.api.FindStage(
            img_ids=zeros,
            text_ids=zeros,
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        geometric = self.model._get_dummy_prompt(num_prompts=m)
        geometric.append_boxes(boxes, torch.ones(1, m, dtype=torch.bool, device=self.device))
        out = self.model.forward_grounding(
            backbone_out=self._state["backbone_out"], find_input=find, geometric_prompt=geometric, find_target=None
        )
        scores = (out["pred_logits"].sigmoid() * out["presence_logit_dec"].sigmoid().unsqueeze(1)).squeeze(-1)
        # The processor drops queries scoring exactly 0 before its argmax; argmax over all picks the same query
        # whenever one scores above 0, and otherwise the first (kept, with confidence 0, never a blank mask).
        best = scores.argmax(dim=1)
        rows_ = torch.arange(m, device=self.device)
        masks = out["pred_masks"][rows_, best].unsqueeze(1)  # (m, 1, 288, 288) mask logits of the kept queries
        prob = self.api.interpolate(masks, (height, width), mode="bilinear", align_corners=False).sigmoid()
        return TeacherOutput(probabilities_to_logits(prob[:, 0]), scores[rows_, best].float())


class Sam3InstanceTeacher(_Sam3Teacher):
    """The SAM-style instance path: ``predict_inst`` with all prompts of a call at once (module docstring)."""

    def __init__(self, model, processor, api, runtime, cfg, metadata) -> None:
        super().__init__(
            model,
            processor,
            api,
            runtime,
            cfg,
            {
                **metadata,
                "path": "instance: Sam3Image.predict_inst, all prompts of an image in one call",
                "multimask_output": cfg.multimask_output,
                "mask_selection": "highest predicted IoU" if cfg.multimask_output else "single mask",
                "logits": "288x288 low-res mask logits over the whole image (stretched), clamped to +-32",
            },
            decode_batch=256 if runtime.device.type == "cuda" else 64,
        )
        transforms = model.inst_interactive_predictor._transforms
        transforms.max_hole_area = transforms.max_sprinkle_area = 0.0

    def _empty_grid(self) -> tuple[int, int]:
        return INSTANCE_LOW_RES, INSTANCE_LOW_RES

    def _decode(self, rows: np.ndarray, prompt: str) -> TeacherOutput:
        m = len(rows)
        if prompt == "roi":
            prompts = {"box": rows}
        else:  # one positive point per instance: coords (m, 1, 2), label 1
            prompts = {"point_coords": rows[:, None, :], "point_labels": np.ones((m, 1), dtype=np.int64)}
        _, iou, low_res = self.model.predict_inst(
            self._state, **prompts, multimask_output=self.multimask_output, return_logits=True, normalize_coords=True
        )
        # predict() squeezes the prompt axis away for a single prompt: restore (m, masks, ...) shapes.
        iou = torch.from_numpy(iou).float().reshape(m, -1)
        low_res = torch.from_numpy(low_res).float().reshape(m, iou.shape[1], *low_res.shape[-2:])
        best = iou.argmax(dim=1)
        rows_ = torch.arange(m)
        return TeacherOutput(low_res[rows_, best].to(self.device), iou[rows_, best].to(self.device))
