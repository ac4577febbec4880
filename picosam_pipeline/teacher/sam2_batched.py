"""SAM2 / SAM2.1 run straight on the model's modules: several images per encoder forward, all on the device.

``sam2.SAM2ImagePredictor`` is host-bound on a GPU (measured 8-16 % GPU utilisation for our stage): it
preprocesses on the CPU, round-trips through numpy and upsamples every mask to image size. :class:`Sam2Teacher`
does what its ``set_image_batch`` / ``_predict`` do, with the model's own modules and nothing else:

1. :meth:`~Sam2Teacher.preprocess`: ``(H, W, 3)`` uint8 -> ``(B, 3, 1024, 1024)`` float32, the predictor's
   ``SAM2Transforms`` (``/ 255``, antialiased bilinear resize to 1024x1024, ImageNet mean/std) on the device.
2. :meth:`~Sam2Teacher.encode`: ``forward_image`` + ``_prepare_backbone_features`` + ``no_mem_embed`` ->
   :class:`Sam2Features` (``image_embed (B, 256, 64, 64)``, high-res ``(B, 32, 256, 256)`` and
   ``(B, 64, 128, 128)``; bf16 under bf16 autocast).
3. :meth:`~Sam2Teacher.decode`: every prompt of the batch through ``sam_prompt_encoder`` and
   ``sam_mask_decoder`` in calls of up to ``decode_batch`` prompts, each prompt paired with its image's
   features (gathered, so prompts of different images share one call), best of 3 by predicted IoU ->
   ``(N, 256, 256)`` float32 low-res logits clamped to +-32 (as the predictor's ``low_res_masks``) and the
   ``(N,)`` predicted IoU of the kept mask.

The results equal the predictor's up to float rounding (tests: >= 99.99 % of stored mask decisions on the
sample, and 1 vs 8 images per batch alike). Memory: a batch that does not fit the GPU is split in halves and
retried, and the decoder's prompt chunk is halved likewise; each split is counted in :attr:`Sam2Teacher.splits`
and said once in the log, never a crash.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.device import Runtime
from picosam_pipeline.teacher.base import TeacherOutput, as_rows, check_rgb
from picosam_pipeline.teacher.sam2_predictor import build_sam2_model

log = logging.getLogger(__name__)

INPUT_SIZE = 1024  # SAM2's encoder input side (the predictor's SAM2Transforms resolution)
_MEAN = (0.485, 0.456, 0.406)  # SAM2Transforms' ImageNet normalisation
_STD = (0.229, 0.224, 0.225)
_BOX_LABELS = (2, 3)  # SAM2's point labels for a box's top-left and bottom-right corners
_POSITIVE_POINT = 1


class Sam2Features(NamedTuple):
    """Encoded images: ``image_embed`` ``(B, 256, 64, 64)``; ``high_res`` ``[(B, 32, 256, 256), (B, 64, 128, 128)]``."""

    image_embed: torch.Tensor
    high_res: list[torch.Tensor]

    def take(self, index: torch.Tensor) -> Sam2Features:
        """The features of images ``index`` (``(N,)`` long, repeats allowed): one row per prompt."""
        return Sam2Features(self.image_embed.index_select(0, index), [f.index_select(0, index) for f in self.high_res])


class Sam2Teacher:
    """SAM2 / SAM2.1 on its own modules, batched over images and prompts (see the module doc).

    Implements the :class:`~picosam_pipeline.teacher.base.Teacher` protocol: :meth:`predict_images` for the
    teacher pass, and ``set_image`` / ``predict_boxes`` / ``predict_points`` (a batch of one) for callers that
    hold one image, such as ``verify-logits``.
    """

    def __init__(self, model: torch.nn.Module, runtime: Runtime, multimask_output: bool, metadata: dict[str, Any]):
        self.model = model
        self.runtime = runtime
        self.multimask_output = multimask_output
        self.metadata = metadata
        self.device = runtime.device
        # Prompts per decoder call: each one gathers ~6 MB of bf16 features (~12 MB fp32) plus the decoder's
        # activations, so a GPU call of 256 prompts stays within a few GB.
        self.decode_batch = 256 if self.device.type == "cuda" else 32
        self.splits = 0  # batches split after running out of device memory
        self._mean = torch.tensor(_MEAN, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(_STD, device=self.device).view(3, 1, 1)
        self._held: tuple[Sam2Features, tuple[int, int]] | None = None  # set_image's image and its (W, H)
        # The predictor's _bb_feat_sizes for a 1024 input: the backbone's stride-4, -8 and -16 grids.
        self._feat_sizes = [
            (INPUT_SIZE // 4, INPUT_SIZE // 4),
            (INPUT_SIZE // 8, INPUT_SIZE // 8),
            (INPUT_SIZE // 16, INPUT_SIZE // 16),
        ]

    @classmethod
    def build(cls, cfg: TeacherConfig, runtime: Runtime) -> Sam2Teacher:
        model, metadata = build_sam2_model(cfg, runtime)
        return cls(model, runtime, cfg.multimask_output, {**metadata, "path": "model modules, batched on the device"})

    # ----------------------------------------------------------------------------------------------
    # the teacher pass

    def predict_images(
        self,
        images: list[torch.Tensor],
        prompts: list[np.ndarray],
        prompt: str,
        segments: list[list[int]] | None = None,
    ) -> list[TeacherOutput]:
        """Encode ``images`` in one forward (split on OOM) and decode all their prompts; one output per image.

        ``segments[i]`` (lengths summing to ``len(prompts[i])``) are runs of image ``i``'s prompts that must be
        decoded apart on a CPU: the pass gives one per store shard, so that the stored bytes do not depend on how
        shards are grouped into tasks or resumed (a decoder call's rounding depends on how many prompts it
        holds). On a GPU all prompts of the batch are decoded together, for speed; reruns then agree within the
        codec's bound rather than byte for byte.
        """
        width = 4 if prompt == "roi" else 2
        rows = [as_rows(p, width, "prompts") for p in prompts]
        sizes = [(int(img.shape[1]), int(img.shape[0])) for img in images]
        features = self.encode(self.preprocess(images))
        counts = [len(r) for r in rows]
        image_of_prompt = torch.from_numpy(np.repeat(np.arange(len(images)), counts)).to(self.device)
        coords, labels = self._prompt_points(
            np.concatenate(rows) if rows else np.zeros((0, width), np.float32),
            np.repeat(np.asarray(sizes, dtype=np.float32).reshape(-1, 2), counts, axis=0),
            prompt,
        )
        breaks = None
        if self.device.type != "cuda":
            lengths = [n for i, c in enumerate(counts) for n in (segments[i] if segments else [c])]
            breaks = np.cumsum([0] + lengths)[:-1].tolist()
        logits, iou = self.decode(features, image_of_prompt, coords, labels, breaks)
        return [
            TeacherOutput(chunk_logits, chunk_iou)
            for chunk_logits, chunk_iou in zip(logits.split(counts), iou.split(counts))
        ]

    @torch.inference_mode()
    def preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``(H_i, W_i, 3)`` uint8 RGB -> ``(B, 3, 1024, 1024)`` float32 normalised, on the device.

        The predictor's ``SAM2Transforms`` step by step (``ToTensor``'s ``/ 255``, torchvision ``Resize``'s
        antialiased bilinear interpolate, ``Normalize``), so a CPU run matches it bit for bit.
        """
        out = torch.empty(len(images), 3, INPUT_SIZE, INPUT_SIZE, device=self.device)
        for i, image in enumerate(images):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(
                    f"image {i}: expected an (H, W, 3) uint8 tensor, got {image.dtype} {tuple(image.shape)}"
                )
            chw = image.to(self.device).permute(2, 0, 1).float().div(255)
            resized = F.interpolate(
                chw[None], size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
            )[0]
            out[i] = (resized - self._mean) / self._std
        return out

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> Sam2Features:
        """``(B, 3, 1024, 1024)`` -> :class:`Sam2Features`; a batch that runs out of device memory is halved."""
        try:
            with self.runtime.autocast():
                backbone_out = self.model.forward_image(pixels)
                _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
                if self.model.directly_add_no_mem_embed:
                    vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
            b = pixels.shape[0]
            # (HW, B, C) token maps -> (B, C, H, W), finest first, as set_image_batch lays them out.
            feats = [f.permute(1, 2, 0).reshape(b, -1, *size) for f, size in zip(vision_feats, self._feat_sizes)]
            return Sam2Features(feats[-1], feats[:-1])
        except torch.OutOfMemoryError:
            if pixels.shape[0] == 1:
                raise
            self._split("encoder", pixels.shape[0])
            half = pixels.shape[0] // 2
            first, second = self.encode(pixels[:half]), self.encode(pixels[half:])
            return Sam2Features(
                torch.cat([first.image_embed, second.image_embed]),
                [torch.cat(pair) for pair in zip(first.high_res, second.high_res)],
            )

    @torch.inference_mode()
    def decode(
        self,
        features: Sam2Features,
        image_of_prompt: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        breaks: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``N`` prompts against their images' features.

        Args:
            features: the encoded images.
            image_of_prompt: ``(N,)`` long, which image each prompt belongs to.
            coords: ``(N, P, 2)`` float32 prompt points in the 1024x1024 input frame; labels ``(N, P)`` int32.
            breaks: prompt indices where a new decoder call must start (ascending); None: chunks of
                ``decode_batch`` across images.

        Returns:
            ``(N, 256, 256)`` float32 low-res logits of the kept mask, clamped to +-32, and its ``(N,)`` float32
            predicted IoU, both on the device.
        """
        n = coords.shape[0]
        logits = torch.empty(n, INPUT_SIZE // 4, INPUT_SIZE // 4, device=self.device)
        iou = torch.empty(n, device=self.device)
        starts = set(breaks or [])
        start = 0
        while start < n:
            stop = min(start + self.decode_batch, n)
            stop = min([b for b in starts if start < b < stop] + [stop])
            try:
                logits[start:stop], iou[start:stop] = self._decode_chunk(
                    features.take(image_of_prompt[start:stop]), coords[start:stop], labels[start:stop]
                )
            except torch.OutOfMemoryError:
                if self.decode_batch == 1:
                    raise
                self._split("decoder", self.decode_batch)
                self.decode_batch //= 2  # for the rest of the pass: the next chunk would not fit either
                continue
            start = stop
        return logits, iou

    def _decode_chunk(self, features: Sam2Features, coords: torch.Tensor, labels: torch.Tensor):
        with self.runtime.autocast():
            sparse, dense = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            # One image embedding per prompt already (gathered): no repeat_image.
            low_res, iou, _, _ = self.model.sam_mask_decoder(
                image_embeddings=features.image_embed,
                image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=self.multimask_output,
                repeat_image=False,
                high_res_features=features.high_res,
            )
        low_res, iou = low_res.float(), iou.float()
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        return low_res[rows, best].clamp(-32.0, 32.0), iou[rows, best]

    def _prompt_points(self, prompts: np.ndarray, sizes: np.ndarray, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-pixel boxes ``(N, 4)`` or points ``(N, 2)`` with their images' ``(N, 2)`` ``(W, H)`` -> SAM2's
        ``(N, P, 2)`` float32 coordinates in the 1024 input frame (``x / W * 1024``, the predictor's
        ``transform_coords`` in the same order) and ``(N, P)`` int32 labels (P = 2 box corners, or 1 point)."""
        per_prompt = _BOX_LABELS if prompt == "roi" else (_POSITIVE_POINT,)
        points = torch.from_numpy(prompts.reshape(len(prompts), len(per_prompt), 2)).to(self.device)
        wh = torch.from_numpy(sizes).to(self.device)[:, None, :]
        coords = points / wh * INPUT_SIZE
        labels = torch.tensor(per_prompt, dtype=torch.int32, device=self.device).repeat(len(prompts), 1)
        return coords, labels

    def _split(self, part: str, size: int) -> None:
        self.splits += 1
        if self.splits == 1:  # said once; the count goes to the run log
            log.warning(
                "teacher %s: out of %s memory at a batch of %d, splitting it (and later ones that do not fit)",
                part,
                self.device,
                size,
            )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the failed batch's blocks back before the halves allocate theirs

    # ----------------------------------------------------------------------------------------------
    # one image at a time (verify-logits, the Teacher protocol)

    def set_image(self, rgb: np.ndarray) -> None:
        check_rgb(rgb)
        self._held = self.encode(self.preprocess([torch.from_numpy(rgb)])), (rgb.shape[1], rgb.shape[0])

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> TeacherOutput:
        return self._predict_held(as_rows(boxes_xyxy, 4, "boxes_xyxy"), "roi")

    def predict_points(self, points_xy: np.ndarray) -> TeacherOutput:
        return self._predict_held(as_rows(points_xy, 2, "points_xy"), "point")

    def _predict_held(self, prompts: np.ndarray, prompt: str) -> TeacherOutput:
        if self._held is None:
            raise RuntimeError("call set_image() before predicting")
        features, size = self._held
        coords, labels = self._prompt_points(prompts, np.tile(np.float32(size), (len(prompts), 1)), prompt)
        index = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        return TeacherOutput(*self.decode(features, index, coords, labels))
