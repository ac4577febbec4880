"""A stand-in teacher made from the ground truth: GT masks as logits, written to a real teacher-logit store.

For tests and benchmarks of the stages after the teacher (pack, loader, training) where running SAM2 on
every image would take minutes. Each instance's full-image GT mask becomes whole-image logits
``gain * (2 * mask - 1)`` (``+gain`` inside, ``-gain`` outside), which :func:`geometry.crop_logits`
resamples into the stored frame exactly as the teacher stage resamples SAM2's output. So the store has the
teacher stage's layout and geometry (crop boxes of the chosen prompt convention from the index, stored
boxes with the context margin, the configured codec), and ``logits > 0`` is the GT mask crop up to
boundary pixels. Confidence is 1 for every instance (or the ``confidence`` given). The group attributes say ``teacher.model = "gt-mask"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from picosam_pipeline.data.index import column_array, decode_mask, iter_images, read_index
from picosam_pipeline.teacher.geometry import crop_logits
from picosam_pipeline.teacher.store import PROMPT_CONVENTIONS, LogitStore, create_store, stored_boxes, stored_side


def write_mask_teacher_store(index: str | Path, out: str | Path, *, splits: list[str], prompt: str = "roi",
                             store_size: int = 96, context_margin: float = 0.0, codec: str = "sigmoid_uint8",
                             instances_per_shard: int = 64, gain: float = 4.0, confidence: float = 1.0) -> LogitStore:
    """Write a store for the rows of ``splits`` (in that order, index order within each) and return it open.

    Args:
        index: the instance index (prepare's ``index.parquet``).
        out: the store folder to create (an existing store with the same layout is resumed, like the teacher's).
        prompt: ``roi`` or ``point``: which index box column is the crop box.
        store_size, context_margin, codec, instances_per_shard: as in the ``teacher`` params section.
        gain: ``|logit|`` away from the mask boundary.
        confidence: every instance's confidence (a second stand-in teacher can differ from the first).
    """
    rows = pa.concat_tables([read_index(index, split=split) for split in splits])
    crop_boxes = column_array(rows, f"{prompt}_box").astype(np.int32)
    side = stored_side(store_size, context_margin)
    attrs = {
        "teacher": {"model": "gt-mask", "gain": gain, "description": "GT masks as logits (tests and benchmarks)"},
        "prompt": {"convention": prompt, "description": PROMPT_CONVENTIONS[prompt]},
        "crop": {"store_size": store_size, "context_margin": context_margin, "stored_size": side},
    }
    store = create_store(out, n_instances=rows.num_rows, side=side, instances_per_shard=instances_per_shard,
                         codec=codec, compression_level=5, attrs=attrs)

    logits = np.empty((rows.num_rows, side, side), np.float32)
    start = 0
    for group in tqdm(iter_images(rows), desc="gt-mask teacher", unit="img", leave=False):
        span = slice(start, start + len(group))
        start = span.stop
        masks = np.stack([decode_mask(rle, group.height, group.width) for rle in group.rows["rle_counts"].to_pylist()])
        image_logits = torch.from_numpy(masks).float().mul_(2 * gain).sub_(gain)  # (m, H, W): +gain in, -gain out
        logits[span] = crop_logits(image_logits, (group.width, group.height), crop_boxes[span], store_size,
                                   context_margin).numpy()

    ids = {name: rows[name].to_numpy() for name in ("ann_id", "image_id")}
    boxes = stored_boxes(crop_boxes, store_size, context_margin)
    for k in store.pending_shards():
        part = store.shard_slice(k)
        store.write_shard(k, logits[part], ann_id=ids["ann_id"][part], image_id=ids["image_id"][part],
                          confidence=np.full(part.stop - part.start, confidence, np.float32), crop_box=crop_boxes[part],
                          stored_box=boxes[part])
    return store
