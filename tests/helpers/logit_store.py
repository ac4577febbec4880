"""A small teacher-logit store with deterministic rows and shards: 10 instances of 16x16, 3 per shard (4 shards,
the last holding one). tests/teacher/test_store.py uses it in process and in the writer processes it kills."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.teacher.store import create_store, stored_boxes, teacher_attrs

N, SIDE, K = 10, 16, 3  # 4 shards, the last one holding a single instance


def row_meta(n: int = N) -> dict:
    """The rows' ids and boxes (what the index gives create_store), deterministic."""
    rng = np.random.default_rng(n)
    crop = np.stack([rng.integers(0, 50, n), rng.integers(0, 50, n)], 1).repeat(2, 1) + [0, 0, 40, 40]
    return dict(
        ann_id=np.arange(n) + 1000, image_id=np.arange(n) // 2, crop_box=crop, stored_box=stored_boxes(crop, SIDE, 0.0)
    )


def shard_inputs(k: int, rows: slice, seed: int = 0) -> dict:
    """Deterministic teacher outputs for shard ``k`` of an ``(N, SIDE, SIDE)`` store."""
    rng = np.random.default_rng([seed, k])
    n = rows.stop - rows.start
    return dict(logits=rng.normal(0.0, 8.0, (n, SIDE, SIDE)).astype(np.float32), confidence=rng.uniform(0.5, 1.0, n))


def make_store(path, codec="sigmoid_uint8", n=N, checkpoint_sha256=None, rows=None, **teacher):
    cfg = dataclasses.replace(TeacherConfig(), codec=codec, store_size=SIDE, instances_per_shard=K, **teacher)
    return create_store(
        path,
        side=SIDE,
        instances_per_shard=K,
        codec=codec,
        compression_level=5,
        attrs=teacher_attrs(cfg, checkpoint_sha256=checkpoint_sha256, crop={"roi_padding": 0.1}),
        rows=row_meta(n) if rows is None else rows,
    )


def write(store, shards) -> dict:
    written = {}
    for k in shards:
        written[k] = shard_inputs(k, store.shard_slice(k))
        store.write_shard(k, **written[k])
    return written


def tree(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
