"""Decoded images for the teacher, ahead of compute: batches of ``(H, W, 3)`` uint8 tensors on the teacher's device.

:func:`image_batches` reads (and on a CPU decodes) images in a thread pool ``_PREFETCH_BATCHES`` batches ahead
of the teacher, so the teacher never waits for the disk:

* **CPU**: PIL in the threads (:func:`runner.load_pixels`, which orients the image as its annotations and
  names a bad file); PIL releases the GIL while decoding.
* **CUDA**: the threads only read the bytes and check the header; the batch's JPEGs are then decoded on the
  GPU in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG) in the teacher's thread. A file
  the GPU decoder must not take -- not a baseline JPEG with RGB or greyscale pixels, an EXIF rotation to
  apply, a size other than the index's, no end-of-image marker (truncated) -- goes through PIL in the thread
  instead, as does a whole batch the GPU decoder rejects. nvJPEG and libjpeg round their inverse DCTs
  differently, a few grey levels on some pixels; with bf16 on an H200 the stored decisions of the two paths
  agree on 99.8 % of pixels (bench/teacher_gpu.py).
"""

from __future__ import annotations

import io
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from picosam_pipeline.data.images import MAX_IMAGE_BYTES, exif_orientation
from picosam_pipeline.untrusted import UntrustedInputError, read_bounded_bytes

log = logging.getLogger(__name__)
_said = {"gpu_decode": False}  # warn once per process

_PREFETCH_BATCHES = 2  # batches read ahead of the one being computed
_JPEG_EOI = b"\xff\xd9"


@dataclass
class ImageBatch:
    """Up to ``images_per_batch`` consecutive images of the pass.

    Attributes:
        groups: per image, the row numbers (into the pass's rows) of its instances, ``(n_i,)`` int64.
        pixels: per image, ``(H, W, 3)`` uint8 RGB on the teacher's device, oriented as the annotations.
        gpu_decoded: how many of them nvJPEG decoded (the rest went through PIL).
    """

    groups: list[np.ndarray]
    pixels: list[torch.Tensor]
    gpu_decoded: int = 0


def image_batches(
    groups: list[np.ndarray],
    load: Callable[[int], np.ndarray],
    jpeg_source: Callable[[int], bytes | None],
    images_per_batch: int,
    device: torch.device,
    threads: int,
) -> Iterator[ImageBatch]:
    """Yield the images of ``groups`` (one entry per image) in order, ``images_per_batch`` at a time.

    Args:
        groups: per image, its rows; ``load(i)`` decodes image ``i`` with PIL to ``(H, W, 3)`` uint8 (raising a
            clear error for a bad file); ``jpeg_source(i)`` returns its bytes when the GPU decoder may take them,
            else None.
        device: where the pixels go; on CUDA JPEGs are decoded there.
        threads: reader threads.
    """
    gpu = device.type == "cuda"

    def read(i: int) -> tuple[bytes | None, torch.Tensor | None]:
        data = jpeg_source(i) if gpu else None
        return (data, None) if data is not None else (None, torch.from_numpy(load(i)))

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="teacher-read") as pool:
        ahead: deque[Future] = deque()
        todo = iter(range(len(groups)))
        for i in itertools.islice(todo, (_PREFETCH_BATCHES + 1) * images_per_batch):
            ahead.append(pool.submit(read, i))
        for start in range(0, len(groups), images_per_batch):
            count = min(images_per_batch, len(groups) - start)
            items = [ahead.popleft().result() for _ in range(count)]
            for i in itertools.islice(todo, count):
                ahead.append(pool.submit(read, i))
            # nvJPEG runs here, in the teacher's thread, after the previous batch's results reached the host: its
            # output is allocated for the teacher's stream but written on nvJPEG's own stream, which must not
            # overlap queued teacher work (decoding in reader threads while work was queued gave NaN logits).
            pixels, decoded = _to_device(items, device, lambda k, start=start: torch.from_numpy(load(start + k)))
            yield ImageBatch(groups[start : start + count], pixels, decoded)


def _to_device(
    items: list[tuple[bytes | None, torch.Tensor | None]],
    device: torch.device,
    load_on_host: Callable[[int], torch.Tensor],
) -> tuple[list[torch.Tensor], int]:
    """Host-decoded pixels moved to ``device``; JPEG bytes decoded there in one call (PIL if nvJPEG refuses)."""
    pixels: list[torch.Tensor | None] = [None if host is None else host.to(device) for _, host in items]
    jpeg = [k for k, (data, _) in enumerate(items) if data is not None]
    if not jpeg:
        return pixels, 0
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(items[k][0]), dtype=torch.uint8) for k in jpeg]
    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except Exception as err:  # noqa: BLE001 -- one file nvJPEG cannot take fails the whole call: use PIL for it
        if not _said["gpu_decode"]:
            log.warning(
                "decoding JPEGs on %s failed (%s: %s); this batch goes through PIL", device, type(err).__name__, err
            )
            _said["gpu_decode"] = True
        return [p if p is not None else load_on_host(k).to(device) for k, p in enumerate(pixels)], 0
    for k, chw in zip(jpeg, decoded):
        pixels[k] = chw.permute(1, 2, 0)  # (3, H, W) -> (H, W, 3), a view
    return pixels, len(jpeg)


def gpu_jpeg_bytes(path: str, expected_size: tuple[int, int]) -> bytes | None:
    """The file's bytes when nvJPEG can decode it to the image PIL would give (up to rounding; see the module
    doc), else None."""
    try:
        data = read_bounded_bytes(path, f"image {path!r}", MAX_IMAGE_BYTES)  # never a FIFO or a device
        with Image.open(io.BytesIO(data)) as image:  # header only
            plain = (
                image.format == "JPEG"
                and image.mode in ("RGB", "L")
                and image.size == tuple(expected_size)
                and exif_orientation(image) == 1
                and not image.info.get("progressive")
            )
    except (OSError, ValueError, SyntaxError, UntrustedInputError):
        return None  # PIL's full decode in load() reports what is wrong with the file
    return data if plain and data.rstrip(b"\x00").endswith(_JPEG_EOI) else None
