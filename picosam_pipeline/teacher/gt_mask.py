"""A stand-in teacher made from the ground truth: GT masks as logits, written to a real teacher-logit store.

For tests and benchmarks of the stages after the teacher (pack, loader, training) where running SAM2 on
every image would take minutes. Each instance's full-image GT mask becomes whole-image logits
``gain * (2 * mask - 1)`` (``+gain`` inside, ``-gain`` outside), which :func:`geometry.crop_logits`
resamples into the stored frame exactly as the teacher stage resamples SAM2's output. So the store has the
teacher stage's layout and geometry (crop boxes of the chosen prompt convention from the index, stored
boxes with the context margin, the configured codec), and ``logits > 0`` is the GT mask crop up to
boundary pixels. Confidence is 1 for every instance (or the ``confidence`` given). The group attributes say
``teacher.model = "gt-mask"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from picosam_pipeline.data.index import column_array, decode_mask, read_index, stream_images
from picosam_pipeline.parallel import default_workers, ordered_map
from picosam_pipeline.teacher.codec import encode_logits
from picosam_pipeline.teacher.geometry import crop_logits
from picosam_pipeline.teacher.store import PROMPT_CONVENTIONS, LogitStore, create_store, stored_boxes, stored_side


def write_mask_teacher_store(
    index: str | Path,
    out: str | Path,
    *,
    splits: list[str],
    prompt: str = "roi",
    store_size: int = 96,
    context_margin: float = 0.0,
    codec: str = "sigmoid_uint8",
    instances_per_shard: int | str = 64,
    gain: float = 4.0,
    confidence: float = 1.0,
) -> LogitStore:
    """Write a store for the rows of ``splits`` (in that order, index order within each) and return it open.

    Args:
        index: the instance index (prepare's ``index.parquet``).
        out: the store folder to create (an existing store with the same layout is resumed, like the teacher's).
        prompt: ``roi`` or ``point``: which index box column is the crop box.
        store_size, context_margin, codec, instances_per_shard: as in the ``teacher`` params section.
        gain: ``|logit|`` away from the mask boundary.
        confidence: every instance's confidence (a second stand-in teacher can differ from the first).
    """
    # Ids and boxes of every row (about 40 bytes each); the RLEs are streamed image by image (index.stream_images).
    rows = pa.concat_tables(
        [read_index(index, split=split, columns=["ann_id", "image_id", "roi_box", "point_box"]) for split in splits]
    )
    crop_boxes = column_array(rows, f"{prompt}_box").astype(np.int32)
    side = stored_side(store_size, context_margin)
    attrs = {
        "teacher": {"model": "gt-mask", "gain": gain, "description": "GT masks as logits (tests and benchmarks)"},
        "prompt": {"convention": prompt, "description": PROMPT_CONVENTIONS[prompt]},
        "crop": {"store_size": store_size, "context_margin": context_margin, "stored_size": side},
    }
    boxes = stored_boxes(crop_boxes, store_size, context_margin)
    store = create_store(
        out,
        side=side,
        instances_per_shard=instances_per_shard,
        codec=codec,
        compression_level=5,
        attrs=attrs,
        rows=dict(
            ann_id=rows["ann_id"].to_numpy(),
            image_id=rows["image_id"].to_numpy(),
            crop_box=crop_boxes,
            stored_box=boxes,
        ),
    )
    # One shard in memory at a time (float32 (K, S, S)): memory follows the shard size, not the dataset's. Worker
    # processes decode the masks and resample them, an image a job; results come back in order.
    pending = set(store.pending_shards())
    jobs = _image_jobs(
        index,
        splits,
        rows["ann_id"].to_numpy(),
        crop_boxes,
        boxes,
        pending,
        store.instances_per_shard,
        gain,
        store_size,
        context_margin,
        store.codec.name,
    )
    shard, buffer, filled = -1, np.empty((0, side, side), store.codec.dtype), 0
    images = len(np.unique(rows["image_id"].to_numpy()))  # for the progress bar
    for start, logits in tqdm(
        ordered_map(_image_logits, jobs, workers=default_workers(images)),
        total=images,
        desc="gt-mask teacher",
        unit="img",
        leave=False,
    ):
        for row, values in enumerate(logits, start):
            k = row // store.instances_per_shard
            if k not in pending:
                continue
            if k != shard:
                shard, part = k, store.shard_slice(k)
                buffer, filled = np.empty((part.stop - part.start, side, side), store.codec.dtype), 0
            buffer[row - part.start] = values
            filled += 1
            if filled == len(buffer):
                store.write_shard(k, buffer, confidence=np.full(len(buffer), confidence, np.float32), encoded=True)
    return store


def _image_jobs(
    index: str | Path,
    splits: list[str],
    ann_ids: np.ndarray,
    crop_boxes: np.ndarray,
    stored: np.ndarray,
    pending: set[int],
    per_shard: int,
    gain: float,
    store_size: int,
    context_margin: float,
    codec: str,
) -> Iterator[tuple]:
    """One job per image with rows in a pending shard: its first row, masks (RLE, H, W), crop and stored boxes.
    Images are streamed from ``index`` split by split, in the order of the store's rows (``ann_ids``, checked)."""
    start = 0
    groups = (group for split in splits for group in stream_images(index, split, ["rle_counts"]))
    for group in groups:
        if not np.array_equal(group.rows["ann_id"].to_numpy(), ann_ids[start : start + len(group)]):
            raise RuntimeError(f"{index} changed while the GT-mask teacher read it (image {group.image_id})")
        span = slice(start, start + len(group))
        start = span.stop
        if pending.intersection(range(span.start // per_shard, (span.stop - 1) // per_shard + 1)):  # else resumed
            yield (
                span.start,
                group.rows["rle_counts"].to_pylist(),
                group.height,
                group.width,
                crop_boxes[span],
                stored[span],
                gain,
                store_size,
                context_margin,
                codec,
            )


def _image_logits(job: tuple) -> tuple[int, list[np.ndarray]]:
    """``(first row, [(S, S) stored values per instance])`` of one image's job (runs in a worker): the codec's
    values (uint8 for the default codec), encoded here, so a quarter of the float32 bytes travel back."""
    start, rles, height, width, crop_boxes, stored, gain, store_size, context_margin, codec = job
    return start, [
        encode_logits(
            _window_logits(decode_mask(rle, height, width), crop_box, box, gain, store_size, context_margin), codec
        )
        for rle, crop_box, box in zip(rles, crop_boxes, stored)
    ]


def _window_logits(
    mask: np.ndarray, crop_box: np.ndarray, stored_box: np.ndarray, gain: float, store_size: int, context_margin: float
) -> np.ndarray:
    """``(S, S)`` float32 stored logits of one ``(H, W)`` {0, 1} mask, resampled from the window of the image that the
    stored frame's bilinear taps reach (its box grown by one pixel, clipped to the image) instead of the whole
    image: the same values up to float rounding (outside the image both replicate the border), at the cost of the
    box, not of the image."""
    height, width = mask.shape
    x0, y0 = max(0, math.floor(stored_box[0]) - 1), max(0, math.floor(stored_box[1]) - 1)
    x1, y1 = min(width, math.ceil(stored_box[2]) + 1), min(height, math.ceil(stored_box[3]) + 1)
    window = torch.from_numpy(mask[y0:y1, x0:x1] * np.float32(2 * gain) - np.float32(gain))  # +gain in, -gain out
    box = np.asarray(crop_box, np.int64) - np.array([x0, y0, x0, y0])
    return crop_logits(window[None], (x1 - x0, y1 - y0), box[None], store_size, context_margin)[0].numpy()
