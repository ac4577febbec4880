"""Stage ``pack``: instance index + images + teacher-logit store -> WebDataset shards, one set per split.

Reads ``pack.index`` (from prepare), the store of every teacher pass in ``pack.teachers``
(``<pack.stores_dir>/<NAME>.zarr``, from teacher-logits@NAME) and the images the index points to; writes, for
each split in ``pack.splits``, ``<pack.out_dir>/<split>/shard-NNNNNN.tar`` and
``shards.json`` (every shard with its sample count and sha256), plus ``<pack.out_dir>/config.resolved.json``,
``<pack.out_dir>/report.json`` (frame, teachers' codecs, per split: samples, shards, bytes, payload bytes per
member) and ``metrics/pack.json`` (the headline: samples and bytes per sample). The
sample format, frames and pack order are described in ``picosam_pipeline/train/shards.py``.

Joining: index rows and store rows are matched on ``(image_id, ann_id)`` (each store's own id arrays), and
each store's crop boxes must equal the index's boxes of the store's prompt convention, so a store computed
from an older index is refused instead of silently misaligning crops and logits. Every teacher packed must
share one prompt convention and frame (store size, context margin): one sample holds one crop, and that convention
must be the one the params ask for (``teacher.prompt`` of each pass, ``auto`` = the recipe's), so shards of the
other paper's crops are refused before any work. Each split's ``shards.json`` records the convention with its
parameters from the index (``crop``: ``crops.crop_convention``), for the train stage and the student. The pack is
built in ``<out_dir>.partial`` and swapped in at the end, so an interrupted run never leaves a half-written
pack where the loader looks; ``out_dir`` is replaced only when it holds an earlier pack (``outputs.py``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from picosam_pipeline.config import Config, require_inputs
from picosam_pipeline.data.crops import crop_convention
from picosam_pipeline.data.index import column_array, read_index, read_metadata
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.outputs import StageOutput, output_folder, save_resolved, writes_output
from picosam_pipeline.reports import write_metrics, write_report
from picosam_pipeline.teacher.store import LogitStore, open_store
from picosam_pipeline.train.shards import INDEX_COLUMNS, Frame, PackedTeacher, pack_split


def output(cfg: Config) -> StageOutput:
    """``pack.out_dir``: one folder of shards per split (each with its shards.json) and the marker."""
    p = cfg.pack
    inputs = {"pack.index": p.index, **{f"pack.teachers[{name}]": path for name, path in p.store_paths().items()}}
    return StageOutput(
        cfg,
        "pack",
        "pack.out_dir",
        p.out_dir,
        sections=["pack"],
        names=("*/",),
        what="shards",
        inputs=inputs,
        writes={"runtime.metrics_dir": cfg.runtime.metrics_dir},
    )


@writes_output(output)
def run(cfg: Config, runtime: Runtime | None = None) -> dict[str, Any]:
    """Pack every split of ``cfg.pack``; returns samples and bytes per sample per split (no tensors: no device)."""
    p = cfg.pack
    paths = p.store_paths()
    require_inputs(
        {
            "pack.index": p.index,
            **{f"pack.teachers[{name}] (teacher-logits@{name})": path for name, path in paths.items()},
        }
    )
    stores = {name: open_store(path) for name, path in paths.items()}
    frame, convention = common_frame(stores)
    check_convention(cfg, stores)
    prepared = read_metadata(p.index).get("prepare", {})
    crop = crop_convention(
        convention,
        roi_padding=prepared.get("roi_padding", 0.1),
        window=prepared.get("point_crop_size", 96),
        input_size=frame.crop_size,
    )
    metas = {name: store.read_meta() for name, store in stores.items()}  # PipelineError when a pass is unfinished

    building = output_folder(p.out_dir)  # <out_dir>.partial, renamed to out_dir when this returns
    summaries = {}
    for split in p.splits:
        rows = read_index(p.index, split=split, columns=INDEX_COLUMNS)
        teachers = []
        for name, store in stores.items():
            in_store = store_rows(metas[name], rows, split, store.path)
            check_crop_boxes(rows, metas[name]["crop_box"][in_store], convention, store.path)
            teachers.append(PackedTeacher(name, store, metas[name], in_store))
        summaries[split] = pack_split(
            split,
            p.index,
            rows,
            teachers,
            frame,
            building / split,
            samples_per_shard=p.samples_per_shard,
            seed=p.seed,
            jpeg_quality=p.jpeg_quality,
            crop=crop,
        )
    samples = sum(s.samples for s in summaries.values())
    total_bytes = sum(s.bytes for s in summaries.values())
    details = {
        "frame": asdict(frame),
        "crop": crop,
        "teachers": {name: store.codec.name for name, store in stores.items()},
        "splits": {name: asdict(s) for name, s in summaries.items()},
        "total": {
            "samples": samples,
            "shards": sum(s.shards for s in summaries.values()),
            "bytes": total_bytes,
            "bytes_per_sample": total_bytes / samples,
        },
    }
    write_report(building, details)
    save_resolved(cfg, building, ["pack"])

    write_metrics(cfg, "pack", {"samples": samples, "bytes_per_sample": round(total_bytes / samples, 1)})
    return {
        name: {"samples": s.samples, "shards": s.shards, "bytes_per_sample": round(s.bytes_per_sample)}
        for name, s in summaries.items()
    }


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


def check_convention(cfg: Config, stores: dict[str, LogitStore]) -> None:
    """Each store must hold the crops its pass is configured for (``teachers.NAME.prompt`` or ``teacher.prompt``;
    ``auto`` = the recipe's): a store made with the other paper's convention is refused, naming the keys."""
    for name, store in stores.items():
        found = store.attrs.get("prompt", {}).get("convention")
        if name in cfg.teachers:
            key = f"teachers.{name}.prompt" if "prompt" in (cfg.teachers[name] or {}) else "teacher.prompt"
            wanted = cfg.teacher_pass(name).teacher.prompt
        else:
            key, wanted = "teacher.prompt", cfg.teacher.prompt
        if found not in ("roi", "point"):
            raise PipelineError(
                f"{store.path}: the store does not record its crop convention (attribute prompt.convention "
                f"is {found!r}); it was not written by the teacher stage: rerun teacher-logits@{name}"
            )
        if found != wanted:
            raise PipelineError(
                f"{store.path} holds {found} crops but the shards ask for {wanted} crops ({key}={wanted}, recipe.name="
                f"{cfg.recipe.name}); rerun the teacher pass with these params (`dvc repro teacher-logits@{name}` or "
                f"`picosam-pipeline run-stage teacher-logits@{name}`), "
                f"or set recipe.name / {key} to the store's convention"
            )


def store_frame(store: LogitStore) -> Frame:
    """The crop and stored sides of ``store`` (from its ``crop`` attributes, written by the teacher stage)."""
    crop_size = store.attrs.get("crop", {}).get("store_size")
    if not isinstance(crop_size, int) or not 0 < crop_size <= store.side or (store.side - crop_size) % 2:
        raise PipelineError(
            f"{store.path}: attribute crop.store_size is {crop_size!r} for stored logits of side "
            f"{store.side}; the store was not written by the teacher stage, rerun it"
        )
    return Frame(crop_size, store.side)


def store_rows(store_meta: dict[str, np.ndarray], rows: pa.Table, split: str, store_path: Path) -> np.ndarray:
    """Store row of each index row, joined on ``(image_id, ann_id)``; PipelineError when the store lacks some.

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
    """The store's crop boxes must be the index's boxes of the store's prompt convention (else stale store)."""
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
