"""Packing the shards of a pack: the instance index joined with the teacher stores, checked, one set per split.

Joining: index rows and store rows are matched on ``(image_id, ann_id)`` (each store's own id arrays,
:func:`store_rows`), and each store's crop boxes must equal the index's boxes of the store's prompt convention
(:func:`check_crop_boxes`), so a store computed from an older index is refused instead of silently misaligning crops
and logits. Every teacher packed must share one prompt convention and frame (store size, context margin,
:func:`common_frame`): one sample holds one crop. Each split's ``shards.json`` records that convention with its
parameters from the index (:func:`shard_crop`) and where the logits come from (``provenance``: each teacher's model
and weights, random or its checkpoint's sha256, and the dataset; :func:`pack_provenance`). The sample format, frames
and pack order are those of :mod:`picosam_pipeline.train.shards`, which writes each split
(:func:`~picosam_pipeline.train.shards.pack_split`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from picosam_pipeline.data.crop_convention import index_crop_params
from picosam_pipeline.data.crops import crop_convention
from picosam_pipeline.data.index import column_array, read_index, read_index_metadata
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.provenance import Provenance, dataset_of_annotations
from picosam_pipeline.teacher.store import LogitStore
from picosam_pipeline.train.shards import INDEX_COLUMNS, Frame, PackedTeacher, SplitSummary, pack_split


def store_convention(name: str, store: LogitStore) -> str:
    """The prompt convention (``roi`` or ``point``) the store of teacher pass ``name`` records
    (``prompt.convention``); PipelineError when it records none (not written by the teacher stage)."""
    found = store.attrs.get("prompt", {}).get("convention")
    if found not in ("roi", "point"):
        raise PipelineError(
            f"{store.path}: the store does not record its crop convention (attribute prompt.convention "
            f"is {found!r}); it was not written by the teacher stage: rerun teacher-logits@{name}"
        )
    return found


def common_frame(stores: dict[str, LogitStore]) -> tuple[Frame, str | None]:
    """The frame and prompt convention every store shares; PipelineError naming the two stores that differ."""
    seen = {
        name: (store_frame(store), store.attrs.get("prompt", {}).get("convention")) for name, store in stores.items()
    }
    (first, (frame, convention)), *rest = seen.items()
    for name, other in rest:
        if other != (frame, convention):
            raise PipelineError(
                f"pack.teachers: teachers {first} and {name} cannot share samples: {first} stored {convention} crops "
                f"of {asdict(frame)}, {name} {other[1]} crops of {asdict(other[0])}; run both passes with the same "
                "teacher.prompt, store_size and context_margin, or pack them apart"
            )
    return frame, convention


def store_frame(store: LogitStore) -> Frame:
    """The crop and stored sides of ``store`` (from its ``crop`` attributes, written by the teacher stage)."""
    crop_size = store.attrs.get("crop", {}).get("store_size")
    if not isinstance(crop_size, int) or not 0 < crop_size <= store.side or (store.side - crop_size) % 2:
        raise PipelineError(
            f"{store.path}: attribute crop.store_size is {crop_size!r} for stored logits of side "
            f"{store.side}; the store was not written by the teacher stage, rerun it"
        )
    return Frame(crop_size, store.side)


def shard_crop(index: str | Path, convention: str, frame: Frame) -> dict[str, Any]:
    """The crop record the shards carry (``crops.crop_convention``): ``convention`` with the parameters the index at
    ``index`` was prepared with, at the frame's crop size."""
    params = index_crop_params(index)
    return crop_convention(
        convention, roi_padding=params.roi_padding, window=params.point_crop_size, input_size=frame.crop_size
    )


def store_rows(store_meta: dict[str, np.ndarray], rows: pa.Table, split: str, store_path: Path) -> np.ndarray:
    """Store row of each index row, joined on ``(image_id, ann_id)``: int64 ``(len(rows),)``; PipelineError when the
    store lacks some, or holds a pair twice.

    Sorted arrays and binary search, not a dict of pairs: at COCO scale that dict took 200 bytes an instance."""
    store_ann, store_image = (store_meta[key].astype(np.int64) for key in ("ann_id", "image_id"))
    by_pair = np.lexsort((store_image, store_ann))  # store rows sorted by ann_id, then image_id
    ann_sorted, image_sorted = store_ann[by_pair], store_image[by_pair]
    if ((ann_sorted[1:] == ann_sorted[:-1]) & (image_sorted[1:] == image_sorted[:-1])).any():
        raise PipelineError(
            f"{store_path}: the teacher store holds some (image_id, ann_id) pairs twice; rerun the teacher stage"
        )
    ann, image = rows["ann_id"].to_numpy(), rows["image_id"].to_numpy()
    lo, hi = np.searchsorted(ann_sorted, ann, "left"), np.searchsorted(ann_sorted, ann, "right")
    found = np.full(len(ann), -1, np.int64)
    unique = np.flatnonzero(hi - lo == 1)  # the usual case: the store has this ann_id once
    match = unique[image_sorted[lo[unique]] == image[unique]]
    found[match] = by_pair[lo[match]]
    for i in np.flatnonzero(hi - lo > 1):  # an ann_id stored for several images: find this row's image among them
        j = lo[i] + np.searchsorted(image_sorted[lo[i] : hi[i]], image[i])
        if j < hi[i] and image_sorted[j] == image[i]:
            found[i] = by_pair[j]
    if (found < 0).any():
        missing = rows["ann_id"].to_numpy()[found < 0]
        raise PipelineError(
            f"{store_path} has no teacher logits for {len(missing)} of the {len(found)} instances of split {split!r} "
            f"(ann_id {missing[:5].tolist()}{' ...' if len(missing) > 5 else ''}): the store was made from another "
            f"index or without this split; add {split!r} to teacher.splits and rerun the teacher stage"
        )
    return found


def check_crop_boxes(rows: pa.Table, crop_boxes: np.ndarray, convention: str | None, store_path: Path) -> None:
    """The store's crop boxes (int ``(len(rows), 4)`` ``[x1, y1, x2, y2]``) must be the index's boxes of the store's
    prompt convention (else stale store)."""
    if convention not in ("roi", "point"):
        return
    expected = column_array(rows, f"{convention}_box").astype(np.int64)
    bad = np.flatnonzero((expected != crop_boxes).any(axis=1))
    if len(bad):
        i = int(bad[0])
        raise PipelineError(
            f"{store_path}: crop boxes disagree with the index's {convention}_box for {len(bad)} instances (ann_id "
            f"{rows['ann_id'][i].as_py()}: store {crop_boxes[i].tolist()}, index {expected[i].tolist()}); the index "
            "was rebuilt after the teacher ran: rerun the teacher stage"
        )


def pack_splits(
    index: str | Path,
    stores: dict[str, LogitStore],
    splits: list[str],
    out: Path,
    *,
    frame: Frame,
    convention: str,
    crop: dict[str, Any],
    samples_per_shard: int,
    seed: int,
    jpeg_quality: int,
) -> dict[str, SplitSummary]:
    """Pack each split of ``splits`` into ``out/<split>`` (shards + ``shards.json``, :func:`shards.pack_split`),
    every sample carrying a logits member per store of ``stores`` (in its order). ``frame`` and ``convention``:
    :func:`common_frame` of the stores; ``crop``: :func:`shard_crop`. Each ``shards.json`` records the
    :func:`pack_provenance`. PipelineError when a store's pass is unfinished, lacks some of a split's instances or
    was made from another index."""
    metas = {name: store.read_meta() for name, store in stores.items()}  # PipelineError when a pass is unfinished
    provenance = pack_provenance(stores, index)
    summaries = {}
    for split in splits:
        rows = read_index(index, split=split, columns=INDEX_COLUMNS)
        teachers = []
        for name, store in stores.items():
            in_store = store_rows(metas[name], rows, split, store.path)
            check_crop_boxes(rows, metas[name]["crop_box"][in_store], convention, store.path)
            teachers.append(PackedTeacher(name, store, metas[name], in_store))
        summaries[split] = pack_split(
            split,
            index,
            rows,
            teachers,
            frame,
            out / split,
            samples_per_shard=samples_per_shard,
            seed=seed,
            jpeg_quality=jpeg_quality,
            crop=crop,
            provenance=provenance.as_dict(),
        )
    return summaries


def pack_provenance(stores: dict[str, LogitStore], index: str | Path | None = None) -> Provenance:
    """Each teacher pass's model and weights (from its store) and the dataset of ``index`` (default: the index the
    first store records); the dataset is None when the index does not say (``dataset_of_annotations``)."""
    if index is None:
        rows = next(iter(stores.values())).attrs.get("rows", {}) if stores else {}
        index = rows.get("index") if isinstance(rows, dict) else None
    try:
        splits = read_index_metadata(index).get("splits", {}) if index else {}
    except (PipelineError, OSError, ValueError):  # no readable index: the dataset is not recorded
        splits = {}
    names = {dataset_of_annotations(s.get("annotations", "")) for s in splits.values() if isinstance(s, dict)}
    dataset = names.pop() if len(names) == 1 else None
    return Provenance.from_store_attrs({name: store.attrs for name, store in stores.items()}, dataset)


def pack_report(
    frame: Frame, crop: dict[str, Any], stores: dict[str, LogitStore], summaries: dict[str, SplitSummary]
) -> dict[str, Any]:
    """The pack stage's ``report.json``: frame, crop record, teachers' codecs, provenance (:func:`pack_provenance`),
    per split and total samples, shards and bytes (``total.bytes_per_sample`` unrounded)."""
    samples = sum(s.samples for s in summaries.values())
    total_bytes = sum(s.bytes for s in summaries.values())
    return {
        "frame": asdict(frame),
        "crop": crop,
        "teachers": {name: store.codec.name for name, store in stores.items()},
        "provenance": pack_provenance(stores).as_dict(),
        "splits": {name: asdict(s) for name, s in summaries.items()},
        "total": {
            "samples": samples,
            "shards": sum(s.shards for s in summaries.values()),
            "bytes": total_bytes,
            "bytes_per_sample": total_bytes / samples,
        },
    }
