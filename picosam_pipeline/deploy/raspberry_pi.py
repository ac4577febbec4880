"""Host-side glue for the Raspberry Pi AI Camera: box or point prompt -> sensor ROI, output tensor -> mask -> overlay.

The package stage copies this file and ``crops.py`` next to the picamera2 script of the deploy folder, where
the pipeline package is not installed; so it needs only numpy and Pillow (both come with picamera2; crops.py
is plain numpy). The pieces that do not need the camera live here and are tested off the Pi::

    crop = contract["crop"]                                   # the convention the student was trained on (export stage)
    roi = prompt_roi(crop, scaler_crop, preview_size, sensor_size(picam2), box=box)   # or point=(x, y) for PicoSAM2
    imx500.set_inference_roi_abs(roi)                         # the IMX500 crops that and resizes it to S x S
    logits = logits_from_outputs(imx500.get_outputs(md), S)   # (S, S) float32 logits
    mask = paste_mask(logits > 0, as_xywh(imx500.get_roi_scaled(request)), (H, W))   # (H, W) bool
    picam2.set_overlay(overlay_rgba(mask))                    # (H, W, 4) uint8, tinted where mask

Coordinate frames: the *preview* is the main stream (``W x H`` px); the *sensor* frame is the IMX500's full
pixel array (4056 x 3040, read with picamera2's public ``camera_properties["PixelArraySize"]``), in which
``ScalerCrop`` (the part of the sensor the preview shows) and the inference ROI are given. The ROI follows the crop
convention the student was trained with, recorded in the contract (``picosam_int8.json``, ``crop``):

* PicoSAM3 ``roi`` (:func:`inference_roi`, ``crops.roi_box``): the box grown by ``roi_padding`` (10 %) of its
  width/height per side, squared on its centre, clipped to the sensor; near an edge the clipped ROI is not square
  and the sensor stretches it, as training did.
* PicoSAM2 ``point`` (:func:`point_roi`, ``crops.point_box``): the ``window`` (96) sensor-pixel window around the
  point, left/top clamped to the sensor, right/bottom clipped, as the PicoSAM2 IMX500 demo does.

The IMX500 takes ROIs with sides of at least 64 sensor pixels (:data:`MIN_ROI_SIDE`); a smaller one is refused.

Input normalisation needs nothing here: the network takes the sensor's RGB as it is and normalises it in
its first layer (see ``deploy/quantize.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

try:  # inside the pipeline
    from picosam_pipeline.data.crops import CONVENTIONS, point_box, roi_box
except ImportError:  # in the deploy folder on the Pi: crops.py is copied beside this file
    from crops import CONVENTIONS, point_box, roi_box  # type: ignore[no-redef]

SENSOR_SIZE = (4056, 3040)  # IMX500 full pixel array (width, height): its PixelArraySize property
MIN_ROI_SIDE = 64  # sensor px: the smallest inference ROI side the IMX500 takes
MASK_COLOUR = (255, 40, 40)  # RGB tint of the overlay
MASK_ALPHA = 150  # overlay opacity, 0..255


class Box(NamedTuple):
    """``(x, y, w, h)`` in pixels of some frame, top-left corner first."""

    x: float
    y: float
    w: float
    h: float


def as_xywh(rect: Any) -> Box:
    """``(x, y, w, h)`` of a libcamera ``Rectangle`` (``x, y, width, height`` attributes) or of a 4-sequence."""
    if hasattr(rect, "width"):
        return Box(rect.x, rect.y, rect.width, rect.height)
    x, y, w, h = rect
    return Box(x, y, w, h)


# --------------------------------------------------------------------------------------------------
# prompt -> ROI


def preview_to_sensor(box: Sequence[float], scaler_crop: Sequence[float], preview_size: tuple[int, int]) -> Box:
    """Map a box from preview pixels to sensor pixels.

    Args:
        box: ``(x, y, w, h)`` in the preview (main stream, ``preview_size = (W, H)``).
        scaler_crop: the request's ``ScalerCrop`` metadata ``(x, y, w, h)``: the sensor area the preview shows.

    The preview is that sensor area scaled to ``W x H``, so ``sensor = crop_xy + preview * crop_wh / (W, H)``.
    """
    x, y, w, h = (float(v) for v in box)
    cx, cy, cw, ch = (float(v) for v in as_xywh(scaler_crop))
    sx, sy = cw / preview_size[0], ch / preview_size[1]
    return Box(cx + x * sx, cy + y * sy, w * sx, h * sy)


def inference_roi(
    box: Sequence[float],
    scaler_crop: Sequence[float],
    preview_size: tuple[int, int],
    *,
    sensor_size: tuple[int, int] = SENSOR_SIZE,
    padding: float = 0.1,
) -> tuple[int, int, int, int]:
    """The IMX500 inference ROI ``(x, y, w, h)`` in sensor pixels for a user box in preview pixels.

    PicoSAM3's crop of the box (``crops.roi_box``: padded by ``padding`` per side, squared, clipped, truncated),
    computed in sensor pixels, which are square, so the ROI is square in the scene as it was in training.

    Raises:
        ValueError: a box without positive width and height, or one outside the sensor area.
    """
    if box[2] <= 0 or box[3] <= 0:
        raise ValueError(
            f"box {tuple(box)}: width and height must be positive (the format is x, y, w, h in preview pixels)"
        )
    sensor_box = preview_to_sensor(box, scaler_crop, preview_size)
    crop, _ = roi_box(tuple(sensor_box), sensor_size[0], sensor_size[1], padding)
    if crop.width <= 0 or crop.height <= 0:
        raise ValueError(f"box {tuple(box)} lies outside the {preview_size[0]}x{preview_size[1]} preview")
    return _large_enough((crop.x1, crop.y1, crop.width, crop.height), f"box {tuple(box)}")


def point_roi(
    point: Sequence[float],
    scaler_crop: Sequence[float],
    preview_size: tuple[int, int],
    *,
    sensor_size: tuple[int, int] = SENSOR_SIZE,
    window: int = 96,
) -> tuple[int, int, int, int]:
    """The IMX500 inference ROI ``(x, y, w, h)`` in sensor pixels for a point ``(x, y)`` in preview pixels.

    PicoSAM2's crop (``crops.point_box``): the point mapped to the sensor (truncated to a whole pixel, as the index's
    integer prompt points are), then the ``window``-px native-resolution window around it, left/top clamped to 0 and
    right/bottom clipped to the sensor. Sensor pixels are native pixels, so the window spans ``window`` of them.

    Raises:
        ValueError: a point outside the preview, or a window the IMX500 cannot take (a side under 64 px).
    """
    x, y = (float(v) for v in point)
    if not (0 <= x < preview_size[0] and 0 <= y < preview_size[1]):
        raise ValueError(f"point {tuple(point)} lies outside the {preview_size[0]}x{preview_size[1]} preview")
    sensor = preview_to_sensor((x, y, 0.0, 0.0), scaler_crop, preview_size)
    crop = point_box(int(sensor.x), int(sensor.y), sensor_size[0], sensor_size[1], window)
    return _large_enough((crop.x1, crop.y1, crop.width, crop.height), f"point {tuple(point)}")


def prompt_roi(
    crop: dict,
    scaler_crop: Sequence[float],
    preview_size: tuple[int, int],
    *,
    sensor_size: tuple[int, int] = SENSOR_SIZE,
    box: Sequence[float] | None = None,
    point: Sequence[float] | None = None,
) -> tuple[int, int, int, int]:
    """The inference ROI of a prompt in the crop convention ``crop`` records (the contract's ``crop``).

    ``roi`` (PicoSAM3) takes ``box``, ``point`` (PicoSAM2) takes ``point``, with the recorded ``roi_padding`` /
    ``window``.

    Raises:
        ValueError: an unknown convention, or the prompt of the other kind (named with the one to give).
    """
    convention = crop.get("convention")
    if convention not in CONVENTIONS:
        raise ValueError(
            f"the contract's crop convention is {convention!r}, expected one of {list(CONVENTIONS)}; "
            "is picosam_int8.json from this pipeline's export stage?"
        )
    kind, paper = CONVENTIONS[convention]
    given = "box" if box is not None else "point" if point is not None else None
    if given != kind:
        raise ValueError(
            f"this network was trained on {paper} {convention} crops, which take a {kind} prompt "
            f"(--{kind}); got {'no prompt' if given is None else 'a ' + given}"
        )
    if kind == "box":
        return inference_roi(
            box, scaler_crop, preview_size, sensor_size=sensor_size, padding=float(crop["roi_padding"])
        )
    return point_roi(point, scaler_crop, preview_size, sensor_size=sensor_size, window=int(crop["window"]))


def sensor_size(picam2: Any) -> tuple[int, int]:
    """The sensor's full pixel array ``(width, height)`` from picamera2's public API.

    ``Picamera2.camera_properties["PixelArraySize"]`` (libcamera's property), else ``Picamera2.sensor_resolution``
    (the native mode), else the IMX500's :data:`SENSOR_SIZE`. (``IMX500`` keeps its own copy in a private method.)
    """
    size = (getattr(picam2, "camera_properties", None) or {}).get("PixelArraySize")
    if size is None:
        size = getattr(picam2, "sensor_resolution", None)
    if size is None:
        return SENSOR_SIZE
    width, height = (int(v) for v in size)
    return width, height


def _large_enough(roi: tuple[int, int, int, int], what: str) -> tuple[int, int, int, int]:
    if min(roi[2], roi[3]) < MIN_ROI_SIDE:
        raise ValueError(
            f"{what}: its inference ROI {roi} (x, y, w, h, sensor px) has a side under the IMX500's minimum "
            f"of {MIN_ROI_SIDE} px; choose a larger object or one farther from the sensor's edge"
        )
    return roi


# --------------------------------------------------------------------------------------------------
# output tensor -> mask in the preview


def logits_from_outputs(outputs: Sequence[np.ndarray] | None, size: int) -> np.ndarray | None:
    """The ``(size, size)`` float32 logits in the list ``IMX500.get_outputs`` returns; None when there is none.

    ``get_outputs`` already dequantises the INT8 tensor to float and lays it out as ``(H, W)`` with singleton
    axes for the channel (and batch with ``add_batch=True``); those are squeezed away. A tensor of any other
    size means the rpk on the camera is not this network.

    Raises:
        ValueError: the first output is not ``size x size`` after squeezing.
    """
    if not outputs:
        return None
    logits = np.squeeze(np.asarray(outputs[0], dtype=np.float32))
    if logits.shape != (size, size):
        raise ValueError(
            f"the network's first output has shape {np.shape(outputs[0])}, expected {size}x{size} logits "
            "(with singleton axes); is network.rpk the packaged PicoSAM model?"
        )
    return logits


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D bool mask to ``(height, width)`` with PIL, as the pipeline resizes masks."""
    from PIL import Image  # picamera2 depends on Pillow, so it is on the Pi

    return np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize((width, height), Image.NEAREST)) > 0


def paste_mask(mask: np.ndarray, roi: Sequence[float], frame_hw: tuple[int, int]) -> np.ndarray:
    """Full-frame ``(H, W)`` bool mask: the ``(S, S)`` crop mask resized into ``roi`` ``(x, y, w, h)``.

    ``roi`` is where the inference crop lies in the frame (``IMX500.get_roi_scaled(request)`` in the preview);
    parts of it outside the frame are dropped.
    """
    out = np.zeros(frame_hw, dtype=bool)
    x, y, w, h = (int(round(v)) for v in as_xywh(roi))
    if w <= 0 or h <= 0:
        return out
    window = resize_nearest(np.asarray(mask, dtype=bool), h, w)
    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, frame_hw[1]), min(y + h, frame_hw[0])
    if x2 > x1 and y2 > y1:
        out[y1:y2, x1:x2] = window[y1 - y : y2 - y, x1 - x : x2 - x]
    return out


def overlay_rgba(mask: np.ndarray, colour: tuple[int, int, int] = MASK_COLOUR, alpha: int = MASK_ALPHA) -> np.ndarray:
    """``(H, W, 4)`` uint8 RGBA overlay for ``Picamera2.set_overlay``: ``colour`` at ``alpha`` on the mask, clear
    elsewhere."""
    out = np.zeros((*mask.shape, 4), dtype=np.uint8)
    out[mask] = (*colour, alpha)
    return out
