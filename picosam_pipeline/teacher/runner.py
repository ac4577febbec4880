"""The teacher pass's unit of work: fill a run of logit-store shards, encoding each image once.

:func:`process_shards` is the task: given the pending shards ``k`` with their ``n <= K`` index rows
(:class:`InstanceRows`, in index order, so an image's instances are contiguous), it streams their images, read
and decoded ahead of compute (:mod:`image_feed`), through the teacher ``teacher.images_per_batch`` at a time
(:meth:`Teacher.predict_images`: SAM2 encodes the batch in one forward and decodes all its prompts together,
:mod:`sam2_batched`), resamples each instance's whole-image logits into its stored crop frame
(:func:`geometry.crop_logits`) and encodes them with the store's codec on the teacher's device
(:func:`stored_codes`); only the stored codes go to the host, where each shard, once complete, is written by a
background thread (:mod:`shard_writer`, which marks it done last). It yields one small summary per shard, never
the logits, and reports the instances of every teacher batch as it finishes (``on_progress``: the progress bar
moves per image on a CPU, not per shard). An image whose instances straddle two shards of the run is encoded once.

The same function runs in the stage's own process (``teacher.executor=local``: one run of every pending shard)
and on dask workers (:mod:`picosam_pipeline.teacher.executors`: runs of consecutive shards per task, where an
image straddling two tasks is encoded by both). Either way the teacher is built once per process, not once
per task (:func:`teacher_session`, a cache keyed by :meth:`TeacherSpec.build_key`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from picosam_pipeline.config import RuntimeConfig, TeacherConfig
from picosam_pipeline.data.images import BadImageError, load_image
from picosam_pipeline.data.index import column_array, read_index, read_index_metadata
from picosam_pipeline.device import Runtime, resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.base import Teacher, TeacherOutput
from picosam_pipeline.teacher.build import build_teacher
from picosam_pipeline.teacher.codec import encode_logits_torch
from picosam_pipeline.teacher.geometry import crop_logits
from picosam_pipeline.teacher.image_feed import gpu_jpeg_bytes, image_batches
from picosam_pipeline.teacher.shard_writer import PendingShard, ShardAssembler, ShardWriter
from picosam_pipeline.teacher.store import open_store

_COLUMNS = ["ann_id", "image_id", "split", "image_path", "width", "height", "bbox", "roi_box", "point", "point_box"]


# --------------------------------------------------------------------------------------------------
# the teacher's rows of the instance index


@dataclass(frozen=True)
class InstanceRows:
    """The teacher's instances: index rows of the selected splits, in index order, as plain arrays.

    Attributes:
        ann_id, image_id: ``(n,)`` int64.
        split, image_path: ``(n,)`` object arrays of str; paths are absolute (workers may run elsewhere).
        size: ``(n, 2)`` int64 image ``(width, height)`` in annotation orientation.
        prompt: ``(n, 4)`` float32 ``(x1, y1, x2, y2)`` box = the COCO bbox (``roi``), or ``(n, 2)`` float32
            ``(x, y)`` positive point (``point``), image pixels.
        crop_box: ``(n, 4)`` int32 student crop ``(x1, y1, x2, y2)``: the index's ``roi_box`` or ``point_box``.
    """

    ann_id: np.ndarray
    image_id: np.ndarray
    split: np.ndarray
    image_path: np.ndarray
    size: np.ndarray
    prompt: np.ndarray
    crop_box: np.ndarray

    def __len__(self) -> int:
        return len(self.ann_id)

    def take(self, rows: slice | np.ndarray) -> InstanceRows:
        """The rows ``rows`` (a slice, or an index array) of every field."""
        return InstanceRows(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def images(self) -> list[tuple[tuple[str, int], slice]]:
        """``((split, image_id), rows)`` per run of consecutive rows of one image, in row order."""
        n = len(self)
        if n == 0:
            return []
        change = (self.image_id[1:] != self.image_id[:-1]) | (self.split[1:] != self.split[:-1])
        starts = np.flatnonzero(np.r_[True, change]).tolist()
        return [((str(self.split[s]), int(self.image_id[s])), slice(s, e)) for s, e in zip(starts, starts[1:] + [n])]

    def digest(self) -> str:
        """sha256 over what the stored bytes depend on besides the pixels: ids, sizes, prompts, crop boxes."""
        h = hashlib.sha256()
        for name in ("ann_id", "image_id", "size", "prompt", "crop_box"):
            array = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}:{array.dtype}:{array.shape};".encode())
            h.update(array.tobytes())
        return h.hexdigest()


def instance_rows(index_path: str, splits: list[str], prompt: str) -> InstanceRows:
    """Read the index rows of ``splits`` (index order) with the prompts and crop boxes of ``prompt`` (roi | point).

    Raises:
        PipelineError: the index is missing, lacks one of ``splits``, or has no instance in them.
    """
    available = list(read_index_metadata(index_path).get("splits", {}))
    missing = [s for s in splits if s not in available]
    if missing:
        raise PipelineError(
            f"teacher.splits: {missing} not in the instance index {index_path!r} (it has {available}); "
            "fix teacher.splits or add the split to prepare.splits and rerun prepare"
        )
    table = read_index(index_path, columns=_COLUMNS)
    table = table.filter(pc.is_in(table["split"], value_set=pa.array(splits)))  # keeps index order
    if table.num_rows == 0:
        raise PipelineError(
            f"teacher.splits {splits}: no instances in {index_path!r}; check prepare's selection "
            "(metrics/prepare.json lists what was dropped)"
        )
    if prompt == "roi":
        x, y, w, h = column_array(table, "bbox").T
        prompts, crop_box = np.stack([x, y, x + w, y + h], axis=1), column_array(table, "roi_box")
    else:
        prompts, crop_box = column_array(table, "point"), column_array(table, "point_box")
    return InstanceRows(
        ann_id=table["ann_id"].to_numpy().astype(np.int64),
        image_id=table["image_id"].to_numpy().astype(np.int64),
        split=np.asarray(table["split"].to_pylist(), dtype=object),
        image_path=np.asarray([os.path.abspath(p) for p in table["image_path"].to_pylist()], dtype=object),
        size=np.stack([table["width"].to_numpy(), table["height"].to_numpy()], axis=1).astype(np.int64),
        prompt=prompts.astype(np.float32),
        crop_box=crop_box.astype(np.int32),
    )


# --------------------------------------------------------------------------------------------------
# one teacher per process


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher pass as a process runs it, shipped with every task; equal specs give bit-identical logits.

    ``teacher`` is the section (checkpoint made absolute); ``device`` the torch device the worker uses ("cpu",
    "cuda" = the worker's first visible GPU, "cuda:N"); ``precision`` "fp32" or "bf16" (autocast); ``seed`` draws
    random weights; ``threads`` the torch threads (0 = every core the process may use).
    """

    teacher: TeacherConfig
    device: str
    precision: str
    seed: int
    threads: int = 0

    @classmethod
    def of(cls, cfg: TeacherConfig, runtime: Runtime, threads: int = 0) -> TeacherSpec:
        """The spec for ``cfg`` on ``runtime``; the checkpoint path is made absolute for workers elsewhere."""
        checkpoint = os.path.abspath(cfg.checkpoint) if cfg.checkpoint else None
        cfg = dataclasses.replace(cfg, onnx_dir=os.path.abspath(cfg.onnx_dir))
        precision = "fp32" if runtime.autocast_dtype is None else "bf16"
        if runtime.autocast_dtype not in (None, torch.bfloat16):
            raise ValueError(f"unsupported autocast dtype {runtime.autocast_dtype}")
        return cls(
            dataclasses.replace(cfg, checkpoint=checkpoint), str(runtime.device), precision, runtime.seed, threads
        )

    def build_key(self) -> str:
        """What the built teacher depends on, the key of the per-process cache: not the codec, crop size or out path."""
        t = self.teacher
        checkpoint = file_key(t.checkpoint) if t.checkpoint and os.path.isfile(t.checkpoint) else None
        return json.dumps(
            [
                t.model,
                checkpoint,
                t.allow_random_weights,
                t.multimask_output,
                t.prompt,
                t.backend,
                t.onnx_dir,
                t.ort_provider,
                t.sam3_path,
                self.device,
                self.precision,
                self.seed,
                self.threads,
            ]
        )

    def runtime(self) -> Runtime:
        return resolve_runtime(RuntimeConfig(device=self.device, precision=self.precision, seed=self.seed))


FileKey = tuple[str, int, int]  # (path, mtime_ns, size)


def file_key(path: str) -> FileKey:
    """Identifies a file's content within a process's lifetime (a rewritten file gets a new key)."""
    stat = os.stat(path)
    return path, stat.st_mtime_ns, stat.st_size


class TeacherSession:
    """A process's teacher; hold ``lock`` while using it (a dask worker with several threads would otherwise
    interleave images)."""

    def __init__(self, key: str, teacher: Teacher) -> None:
        self.key = key
        self.teacher = teacher
        self.lock = threading.Lock()


_session: TeacherSession | None = None
_session_lock = threading.Lock()


def teacher_session(spec: TeacherSpec) -> TeacherSession:
    """This process's teacher for ``spec``, built on first use (a different spec replaces it)."""
    global _session
    with _session_lock:
        if _session is None or _session.key != spec.build_key():
            _session = None  # release the old model (and its GPU memory) before building the next
            # threads 0 (a worker of an existing cluster): every core the process may use; a dask worker would
            # otherwise compute with 1 thread, the OMP_NUM_THREADS its nanny sets.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(spec.threads or cores)
            _session = TeacherSession(spec.build_key(), build_teacher(spec.teacher, spec.runtime()))
        return _session


def teacher_metadata(spec: TeacherSpec) -> dict[str, Any]:
    """Build (or reuse) this process's teacher and return its metadata, plus the torch threads it computes with."""
    return {**teacher_session(spec).teacher.metadata, "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------
# per image and per shard


def decode_prompts(teacher: Teacher, cfg: TeacherConfig, rows: InstanceRows) -> TeacherOutput:
    """Decode the prompts of ``rows`` (instances of the image the teacher holds) in ONE batched call."""
    return teacher.predict_boxes(rows.prompt) if cfg.prompt == "roi" else teacher.predict_points(rows.prompt)


def to_stored_frames(out: TeacherOutput, cfg: TeacherConfig, rows: InstanceRows) -> tuple[np.ndarray, np.ndarray]:
    """Whole-image teacher output -> ``logits`` float32 ``(n, S, S)`` in the stored frames of ``rows``
    (``S = geometry.stored_size(store_size, context_margin)``; unbounded logits, SAM2 within +-32) and
    ``confidence`` float32 ``(n,)`` in [0, 1]."""
    logits = crop_logits(out.image_logits, rows.size, rows.crop_box, cfg.store_size, cfg.context_margin)
    return logits.cpu().numpy(), out.confidence.float().cpu().numpy()


def predict_crops(teacher: Teacher, cfg: TeacherConfig, rows: InstanceRows) -> tuple[np.ndarray, np.ndarray]:
    """:func:`decode_prompts` then :func:`to_stored_frames`: the stored logits and confidences of ``rows``."""
    return to_stored_frames(decode_prompts(teacher, cfg, rows), cfg, rows)


def load_pixels(rows: InstanceRows) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of the image of ``rows`` (their first row), oriented as its annotations.

    Raises:
        PipelineError: the file went missing or bad since ``prepare`` checked it (a plain, picklable error,
            so that it reaches the client from a dask worker).
    """
    width, height = (int(v) for v in rows.size[0])
    try:
        return load_image(rows.image_path[0], expected_size=(width, height)).pixels
    except BadImageError as err:
        raise PipelineError(
            f"{err} (image {int(rows.image_id[0])}, {len(rows)} instances; it was readable when "
            "the index was built: restore the file, or rerun prepare to drop it)"
        ) from None


def images_per_batch(cfg: TeacherConfig, device: torch.device) -> int:
    """``teacher.images_per_batch`` resolved: ``auto`` is 1 on a CPU (the lowest memory; larger batches were not
    measured there) and 16 on a GPU (on an H200 the encoder alone gains 3 % from 16 to 64, and the stage was no
    faster at 32 or 48: bench/teacher_gpu.py), 4 on a GPU under 24 GiB; a batch that still does not fit is split
    by the teacher."""
    if cfg.images_per_batch != "auto":
        return int(cfg.images_per_batch)
    if device.type != "cuda":
        return 1
    return 16 if torch.cuda.get_device_properties(device).total_memory >= 24 * 2**30 else 4


def stored_codes(
    outputs: list[TeacherOutput], rows: list[InstanceRows], cfg: TeacherConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's teacher outputs -> the codec's ``(n, S, S)`` values, ``(n,)`` float32 confidences and an ``(n,)`` bool
    mask of the instances whose whole-image logits or confidence hold a NaN or infinity, all computed on the outputs'
    device (crop resampling and codec there: only the small stored tiles cross to the host).

    Outputs on one grid (SAM2's 256x256 for every image) are resampled in one ``grid_sample`` call.
    """
    sizes = np.concatenate([r.size for r in rows])
    boxes = np.concatenate([r.crop_box for r in rows])
    if len({tuple(o.image_logits.shape[1:]) for o in outputs}) == 1:
        logits = crop_logits(
            torch.cat([o.image_logits for o in outputs]), sizes, boxes, cfg.store_size, cfg.context_margin
        )
    else:  # full-resolution outputs (SAM3's geometric path) differ per image
        logits = torch.cat(
            [
                crop_logits(o.image_logits, r.size, r.crop_box, cfg.store_size, cfg.context_margin)
                for o, r in zip(outputs, rows)
            ]
        )
    confidence = torch.cat([o.confidence.float() for o in outputs])
    # Checked on the whole-image logits: the crop of a NaN map can miss its NaN pixels.
    bad = torch.cat([~torch.isfinite(o.image_logits).flatten(1).all(dim=1) for o in outputs]) | ~torch.isfinite(
        confidence
    )
    return encode_logits_torch(logits, cfg.codec, check_finite=False), confidence, bad


def teacher_name(cfg: TeacherConfig) -> str:
    """The teacher as error messages name it: model, and backend or SAM3 prompt path."""
    return f"{cfg.model} (sam3_path {cfg.sam3_path})" if cfg.model == "sam3" else f"{cfg.model} (backend {cfg.backend})"


def refuse_non_finite(bad: np.ndarray, rows: list[InstanceRows], cfg: TeacherConfig) -> None:
    """Raise when a batch's teacher output held NaN or infinite values (``bad``: ``(n,)`` bool over the batch's
    rows, from :func:`stored_codes`): nothing of the batch is stored, and the message names every such instance's
    annotation id and image id, and the teacher."""
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return
    ann = np.concatenate([r.ann_id for r in rows])[bad]
    image = np.concatenate([r.image_id for r in rows])[bad]
    named = ", ".join(f"ann_id {int(a)} of image {int(i)}" for a, i in zip(ann[:8], image[:8]))
    raise PipelineError(
        f"teacher {teacher_name(cfg)} returned NaN/inf logits or confidences for {len(ann)} instance(s): {named}"
        f"{' ...' if len(ann) > 8 else ''}; nothing of them was stored. Check the checkpoint "
        "(`picosam-pipeline fetch`), "
        "try --set runtime.precision=fp32, and report it with these ids if it persists"
    )


def process_shards(
    store_path: str,
    jobs: list[tuple[int, InstanceRows]],
    spec: TeacherSpec,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Compute and write the shards ``jobs`` (``(shard, its index rows)``, ascending) of the store at ``store_path``.

    The rows of all jobs form one stream of images, ``images_per_batch`` per teacher call, so an image whose
    instances straddle two shards is encoded once. Images are read ahead (:mod:`image_feed`); a shard is handed
    to the background writer (:mod:`shard_writer`) as soon as its last row is computed. Yields one summary per
    written shard: ``shard``, ``instances``, and since the previous summary ``encoder_passes`` (images encoded),
    ``seconds``, ``teacher_seconds`` (the teacher calls), ``batch_splits`` (batches split for memory),
    ``images_decoded_on_device``; ``pid``. ``on_progress(instances)`` is called after every teacher batch with the
    number of instances it computed (written or not yet).
    """
    last = time.perf_counter()
    session = teacher_session(spec)
    store = open_store(store_path, writable=True)
    cfg = spec.teacher
    for shard, rows in jobs:
        expected = store.shard_slice(shard)
        if len(rows) != expected.stop - expected.start:
            raise ValueError(
                f"shard {shard}: got {len(rows)} rows, the store expects rows {expected.start}:{expected.stop}"
            )
    shard_jobs = [PendingShard(shard, rows) for shard, rows in jobs]
    if not shard_jobs:
        return
    stream = concat_rows([j.rows for j in shard_jobs])
    groups = [np.arange(sl.start, sl.stop) for _, sl in stream.images()]
    device = torch.device(spec.device)
    per_batch = images_per_batch(cfg, device)
    assembler = ShardAssembler(shard_jobs, store.side, np.dtype(store.codec.dtype))
    counts = {"encoder_passes": 0, "teacher_seconds": 0.0, "images_decoded_on_device": 0}
    splits_seen = getattr(session.teacher, "splits", 0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    batches = image_batches(
        groups,
        lambda i: load_pixels(stream.take(groups[i][:1])),
        lambda i: gpu_jpeg_bytes(stream.image_path[groups[i][0]], tuple(int(v) for v in stream.size[groups[i][0]])),
        per_batch,
        device,
        threads=min(8, max(1, cores // 2)),
    )

    def summaries(written: list[int]) -> Iterator[dict[str, Any]]:
        nonlocal last, splits_seen
        for shard in written:
            now, splits = time.perf_counter(), getattr(session.teacher, "splits", 0)
            rows = store.shard_slice(shard)
            yield {
                "shard": shard,
                "instances": rows.stop - rows.start,
                **counts,
                "seconds": now - last,
                "batch_splits": splits - splits_seen,
                "pid": os.getpid(),
            }
            counts.update(encoder_passes=0, teacher_seconds=0.0, images_decoded_on_device=0)
            last, splits_seen = now, splits

    with session.lock, ShardWriter(store) as writer:
        for batch in batches:
            tick = time.perf_counter()
            batch_rows = [stream.take(g) for g in batch.groups]
            segments = [
                np.unique(assembler.job_of(g), return_counts=True)[1].tolist() for g in batch.groups
            ]  # per shard
            outputs = session.teacher.predict_images(batch.pixels, [r.prompt for r in batch_rows], cfg.prompt, segments)
            codes, confidence, bad = stored_codes(outputs, batch_rows, cfg)
            refuse_non_finite(bad.cpu().numpy(), batch_rows, cfg)  # waits for the device: the batch is done
            codes, confidence = codes.cpu().numpy(), confidence.cpu().numpy()
            counts["teacher_seconds"] += time.perf_counter() - tick
            counts["encoder_passes"] += len(batch.groups)  # each image of the stream is encoded once
            counts["images_decoded_on_device"] += batch.gpu_decoded
            if on_progress is not None:
                on_progress(sum(len(g) for g in batch.groups))
            for j in assembler.add(np.concatenate(batch.groups), codes, confidence):
                writer.submit(shard_jobs[j], *assembler.pop(j))
            yield from summaries(writer.done())
    yield from summaries(writer.done())
    if missing := [j.shard for j, left in zip(shard_jobs, assembler.missing) if left]:
        raise RuntimeError(f"shards {missing[:8]} were not completely computed")  # a bug, not a user error


def run_shards(
    store_path: str, jobs: list[tuple[int, InstanceRows]], spec: TeacherSpec, progress_topic: str | None = None
) -> list[dict[str, Any]]:
    """:func:`process_shards` as one dask task: all its summaries at once. With ``progress_topic`` the instances of
    every teacher batch go to that dask event topic as the batch finishes (the client's progress bar)."""
    return list(process_shards(store_path, jobs, spec, on_progress=_event_logger(progress_topic)))


def _event_logger(topic: str | None) -> Callable[[int], None] | None:
    """``on_progress`` for a dask task: each count logged as an event of ``topic`` (None: no reporting)."""
    if topic is None:
        return None
    from distributed import get_worker

    worker = get_worker()
    return lambda instances: worker.log_event(topic, instances)


def concat_rows(parts: list[InstanceRows]) -> InstanceRows:
    """The rows of ``parts`` one after another."""
    return InstanceRows(
        **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(InstanceRows)}
    )
