"""The teacher pass's unit of work: fill one logit-store shard, encoding each of its images once.

:func:`process_shard` is the task: given the ``n <= K`` index rows of shard ``k`` (:class:`InstanceRows`, in
index order, so an image's instances are contiguous), it decodes each image once
(:func:`images.load_image`), encodes it once (:meth:`Teacher.set_image`), decodes all the image's prompts
in ONE batched call (:meth:`~Teacher.predict_boxes` for ``prompt=roi``, :meth:`~Teacher.predict_points` for
``prompt=point``), resamples the whole-image logits into each instance's stored crop frame
(:func:`geometry.crop_logits`) and writes the shard with :meth:`LogitStore.write_shard`, which marks it
done last. It returns a small summary dict, never the logits.

The same function runs in the stage's own process (``teacher.executor=local``) and on dask workers
(:mod:`picosam_pipeline.teacher.executors`). Either way the teacher is built once per process, not once per task
(:func:`teacher_session`, a cache keyed by :meth:`TeacherSpec.build_key`).

Shard boundaries are fixed at multiples of ``K`` (the store's layout), so an image whose instances straddle
a boundary belongs to two tasks. The session remembers the image it encoded last, so when the process that
finished shard ``k`` goes on with shard ``k + 1`` (always with ``executor=local``; with dask when the same
worker takes the next shard) the straddling image is not encoded again. Otherwise it is encoded twice: at
most ``n_shards - 1`` extra encoder passes, e.g. <= 1 in 35 (2.9 %) for COCO's ~7.3 instances per image
at K = 256. The stage reports the count as ``encoder_passes`` vs ``images``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from picosam_pipeline.config import RuntimeConfig, TeacherConfig
from picosam_pipeline.data.images import BadImageError, load_image
from picosam_pipeline.data.index import column_array, read_index, read_metadata
from picosam_pipeline.device import Runtime, resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.geometry import crop_logits
from picosam_pipeline.teacher.models import Teacher, TeacherOutput, build_teacher
from picosam_pipeline.teacher.store import open_store, stored_boxes

_COLUMNS = ["ann_id", "image_id", "split", "image_path", "width", "height", "bbox", "roi_box", "point", "point_box"]
_PREFETCH = 2  # images decoded ahead of the teacher (PIL releases the GIL; on a GPU decoding would otherwise stall it)


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

    def take(self, rows: slice | np.ndarray) -> "InstanceRows":
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
    available = list(read_metadata(index_path).get("splits", {}))
    missing = [s for s in splits if s not in available]
    if missing:
        raise PipelineError(f"teacher.splits: {missing} not in the instance index {index_path!r} (it has {available}); "
                            "fix teacher.splits or add the split to prepare.splits and rerun prepare")
    table = read_index(index_path, columns=_COLUMNS)
    table = table.filter(pc.is_in(table["split"], value_set=pa.array(splits)))  # keeps index order
    if table.num_rows == 0:
        raise PipelineError(f"teacher.splits {splits}: no instances in {index_path!r}; check prepare's selection "
                            "(metrics/prepare.json lists what was dropped)")
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
    def of(cls, cfg: TeacherConfig, runtime: Runtime, threads: int = 0) -> "TeacherSpec":
        """The spec for ``cfg`` on ``runtime``; the checkpoint path is made absolute for workers elsewhere."""
        checkpoint = os.path.abspath(cfg.checkpoint) if cfg.checkpoint else None
        cfg = dataclasses.replace(cfg, onnx_dir=os.path.abspath(cfg.onnx_dir))
        precision = "fp32" if runtime.autocast_dtype is None else "bf16"
        if runtime.autocast_dtype not in (None, torch.bfloat16):
            raise ValueError(f"unsupported autocast dtype {runtime.autocast_dtype}")
        return cls(dataclasses.replace(cfg, checkpoint=checkpoint), str(runtime.device), precision, runtime.seed, threads)

    def build_key(self) -> str:
        """What the built teacher depends on, the key of the per-process cache: not the codec, crop size or out path."""
        t = self.teacher
        checkpoint = file_key(t.checkpoint) if t.checkpoint and os.path.isfile(t.checkpoint) else None
        return json.dumps([t.model, checkpoint, t.allow_random_weights, t.multimask_output, t.prompt, t.backend,
                           t.onnx_dir, t.ort_provider, self.device, self.precision, self.seed, self.threads])

    def runtime(self) -> Runtime:
        return resolve_runtime(RuntimeConfig(device=self.device, precision=self.precision, seed=self.seed))


FileKey = tuple[str, int, int]  # (path, mtime_ns, size)


def file_key(path: str) -> FileKey:
    """Identifies a file's content within a process's lifetime (a rewritten file gets a new key)."""
    stat = os.stat(path)
    return path, stat.st_mtime_ns, stat.st_size


class TeacherSession:
    """A process's teacher plus the key of the image it holds encoded; hold ``lock`` while using it."""

    def __init__(self, key: str, teacher: Teacher) -> None:
        self.key = key
        self.teacher = teacher
        self.encoded: FileKey | None = None
        self.lock = threading.Lock()  # a dask worker with several threads would otherwise interleave images

    def set_image(self, key: FileKey, pixels: np.ndarray) -> None:
        """Encode ``pixels`` (``(H, W, 3)`` uint8 RGB) and remember that the teacher now holds image ``key``."""
        self.encoded = None  # not valid again until set_image has returned
        self.teacher.set_image(pixels)
        self.encoded = key

    def holds(self, path: str) -> bool:
        """Whether the teacher holds ``path`` encoded (False for a file that is gone: decoding it reports that)."""
        try:
            return self.encoded == file_key(path)
        except OSError:
            return False


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
    width, height = (int(v) for v in rows.size[0])
    logits = crop_logits(out.image_logits, (width, height), rows.crop_box, cfg.store_size, cfg.context_margin)
    return logits.cpu().numpy(), out.confidence.cpu().numpy()


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
        raise PipelineError(f"{err} (image {int(rows.image_id[0])}, {len(rows)} instances; it was readable when "
                            "the index was built: restore the file, or rerun prepare to drop it)") from None


def iter_images(rows: InstanceRows, skip_first: bool) -> Iterator[tuple[InstanceRows, np.ndarray | None]]:
    """``(rows of one image, its pixels)`` per image of ``rows``, decoded ``_PREFETCH`` images ahead in a thread.

    With ``skip_first`` the first image is not decoded (its pixels are None: the teacher already holds it).
    """
    groups = [rows.take(sl) for _, sl in rows.images()]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        queue: deque[Future | None] = deque()
        todo = iter(enumerate(groups))

        def submit_next() -> None:
            item = next(todo, None)
            if item is not None:
                i, group = item
                queue.append(None if (i == 0 and skip_first) else pool.submit(load_pixels, group))

        for _ in range(_PREFETCH):
            submit_next()
        for group in groups:
            future = queue.popleft()
            submit_next()
            yield group, None if future is None else future.result()


def process_shard(store_path: str, shard: int, rows: InstanceRows, spec: TeacherSpec) -> dict[str, Any]:
    """Compute and write shard ``shard`` of the store at ``store_path`` from its index ``rows``.

    Returns a small summary: ``shard``, ``instances``, ``images``, ``encoder_passes``, ``seconds`` (the whole
    task), ``teacher_seconds`` (encoder + decoder calls only), ``pid``.
    """
    start = time.perf_counter()
    session = teacher_session(spec)
    store = open_store(store_path, writable=True)
    cfg = spec.teacher
    expected = store.shard_slice(shard)
    if len(rows) != expected.stop - expected.start:
        raise ValueError(f"shard {shard}: got {len(rows)} rows, the store expects rows {expected.start}:{expected.stop}")
    logits, confidence = [], []
    images = encodes = 0
    teacher_seconds = 0.0
    with session.lock:
        # The previous shard's last image, when this process ran that shard, is still encoded.
        for group, pixels in iter_images(rows, skip_first=session.holds(rows.image_path[0])):
            tick = time.perf_counter()
            if pixels is not None:
                session.set_image(file_key(group.image_path[0]), pixels)
                encodes += 1
            out = decode_prompts(session.teacher, cfg, group)
            teacher_seconds += time.perf_counter() - tick
            image_logits, image_confidence = to_stored_frames(out, cfg, group)
            logits.append(image_logits)
            confidence.append(image_confidence)
            images += 1
    store.write_shard(
        shard, np.concatenate(logits), ann_id=rows.ann_id, image_id=rows.image_id,
        confidence=np.concatenate(confidence), crop_box=rows.crop_box, stored_box=stored_boxes(rows.crop_box, cfg.store_size, cfg.context_margin),
    )
    return {"shard": shard, "instances": len(rows), "images": images, "encoder_passes": encodes,
            "seconds": time.perf_counter() - start, "teacher_seconds": teacher_seconds, "pid": os.getpid()}
