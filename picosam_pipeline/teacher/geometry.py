"""Whole-image teacher logits -> each instance's crop frame, in ONE bilinear resampling.

Three frames are involved (all coordinates in image pixels, pixel ``i`` covering ``[i, i + 1)``):

* **Image grid** -- a teacher's output ``(N, h, w)`` covers the whole image ``[0, W] x [0, H]``, stretched:
  grid cell ``(r, c)`` covers ``[c W/w, (c+1) W/w) x [r H/h, (r+1) H/h)`` and its value belongs to the cell
  centre ``((c + 0.5) W/w, (r + 0.5) H/h)``. SAM2 gives ``h = w = 256`` whatever the aspect ratio (it resizes
  the image to 1024x1024 without keeping it); SAM3 gives ``h = H, w = W``.
* **Crop frame** -- the student's ``S x S`` view of a crop box ``(x1, y1, x2, y2)`` from :mod:`crops`
  (PicoSAM3 ROI or PicoSAM2 point window): crop pixel ``u`` has its centre at
  ``x1 + (u + 0.5) * (x2 - x1) / S`` (:func:`crops.crop_pixel_centres`; same for ``y``).
* **Stored frame** -- the crop frame extended by ``k = round(m * S)`` crop pixels on every side (``m`` =
  ``teacher.context_margin``, rounded half up), with the crop frame's pixel pitch, so it is
  ``S_total = S + 2k`` pixels wide (:func:`stored_size`). Stored pixel ``j`` IS crop pixel ``u = j - k``;
  ``stored[:, k:k+S, k:k+S]`` is exactly the student's crop frame (:func:`central_slice`), and shifted
  ``S x S`` windows give train-time jitter of up to ``k`` crop pixels with no second resampling. The stored
  window is the crop box grown by ``k/S`` (= ``m`` up to rounding) of its width / height on each side.

:func:`crop_logits` samples the image grid at the stored frame's pixel centres with ``grid_sample``
(bilinear, ``align_corners=False``). Resampling once avoids the blur of the usual two-step route (upsample
to image size, slice, downsample) and needs no full-resolution intermediate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from picosam_pipeline.data.crops import FloatBox, crop_pixel_centres


def context_pixels(out_size: int, context_margin: float) -> int:
    """``k = round(context_margin * out_size)`` (half up): stored pixels added on each side of the crop frame."""
    if out_size <= 0 or context_margin < 0:
        raise ValueError(f"need out_size > 0 and context_margin >= 0, got {out_size}, {context_margin}")
    return int(math.floor(context_margin * out_size + 0.5))


def stored_size(out_size: int, context_margin: float) -> int:
    """Side of the stored frame, ``S_total = S + 2 * round(m * S)`` (96 and m=0.25 -> 144)."""
    return out_size + 2 * context_pixels(out_size, context_margin)


def central_slice(out_size: int, context_margin: float) -> slice:
    """Rows/columns of the stored frame that form the student's crop frame: ``stored[..., sl, sl]`` is ``S x S``."""
    k = context_pixels(out_size, context_margin)
    return slice(k, k + out_size)


def context_window(box: tuple[float, float, float, float], out_size: int, context_margin: float) -> FloatBox:
    """The crop box grown by ``k`` crop pixels (``k / S`` of its side) on each side; may leave the image.

    The coordinates may be numbers or numpy arrays (one window per element, as :func:`crop_logits` uses it).
    """
    x1, y1, x2, y2 = box
    grow = context_pixels(out_size, context_margin) / out_size
    dx, dy = grow * (x2 - x1), grow * (y2 - y1)
    return FloatBox(x1 - dx, y1 - dy, x2 + dx, y2 + dy)


def crop_logits(
    image_logits: torch.Tensor,
    image_size: tuple[int, int] | np.ndarray,
    crop_boxes: np.ndarray | torch.Tensor,
    out_size: int,
    context_margin: float = 0.0,
) -> torch.Tensor:
    """Resample whole-image logits into each instance's stored crop frame.

    Args:
        image_logits: ``(N, h, w)`` logits (any float dtype) covering the whole image, stretched (see module doc).
        image_size: ``(W, H)`` of the image in pixels, or ``(N, 2)`` int one per logit map (several images
            decoded in one batch, all at the same grid resolution ``h x w``).
        crop_boxes: ``(N, 4)`` integer ``(x1, y1, x2, y2)`` crop boxes from :mod:`crops`, one per logit map,
            inside the image with ``x2 > x1`` and ``y2 > y1``.
        out_size: ``S``, the student's crop resolution.
        context_margin: ``m``; the stored frame extends ``round(m * S)`` crop pixels beyond the crop on each side.

    Returns:
        ``(N, S_total, S_total)`` float32 logits on ``image_logits``' device, ``S_total = stored_size(S, m)``.
        Stored pixel ``(i, j)`` holds the bilinear interpolation of the image grid at image point
        ``(x1 + (j - k + 0.5) (x2 - x1) / S, y1 + (i - k + 0.5) (y2 - y1) / S)``.

    Beyond the outermost cell centres -- the last half cell inside the image, and any part of the context
    margin outside the image -- the border value is replicated (``padding_mode="border"``). Inside the image
    that is exactly what ``F.interpolate(..., align_corners=False)`` does at its edges; outside it there is no
    teacher evidence, and replicating keeps the logit field continuous with its sign: an object cut by the
    image border stays foreground beyond it and background stays background. Zero padding would instead
    write logit 0 (p = 0.5), a fake uncertain band along every image border, and bilinear blending towards it
    would pull the last in-image pixels towards 0.5 as well.
    """
    if image_logits.ndim != 3:
        raise ValueError(f"image_logits must be (N, h, w), got shape {tuple(image_logits.shape)}")
    if isinstance(crop_boxes, torch.Tensor):
        crop_boxes = crop_boxes.detach().cpu().numpy()
    boxes = np.asarray(crop_boxes, dtype=np.float64).reshape(-1, 4)
    n = image_logits.shape[0]
    if boxes.shape[0] != n:
        raise ValueError(f"got {n} logit maps but {boxes.shape[0]} crop boxes")
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if empty.any():
        raise ValueError(f"crop boxes must have x2 > x1 and y2 > y1, got {boxes[empty][:3].tolist()}")
    sizes = np.broadcast_to(np.asarray(image_size, dtype=np.float64).reshape(-1, 2), (n, 2))
    total = stored_size(out_size, context_margin)
    if n == 0:
        return image_logits.new_zeros((0, total, total), dtype=torch.float32)

    # The stored frame is the context window seen at S_total pixels: same pitch as the crop frame. Box columns
    # of shape (N, 1) give every instance's window and its (N, S_total) pixel centres in one call each.
    window = context_window(tuple(boxes.T[:, :, None]), out_size, context_margin)
    xs, ys = crop_pixel_centres(window, total)
    width, height = sizes[:, 0:1], sizes[:, 1:2]
    # Image coordinate -> grid_sample's normalised coordinate. With align_corners=False, -1 and +1 are the
    # OUTER edges of the first and last grid cells, i.e. image x = 0 and x = W, whatever the grid resolution:
    # exactly the stretched whole-image convention of the teacher's output.
    gx = torch.from_numpy(2.0 * xs / width - 1.0).to(device=image_logits.device, dtype=torch.float32)
    gy = torch.from_numpy(2.0 * ys / height - 1.0).to(device=image_logits.device, dtype=torch.float32)
    # grid[n, i, j] = (x of column j, y of row i); the sampling grid is separable per axis.
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    out = F.grid_sample(
        image_logits[:, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[:, 0]
